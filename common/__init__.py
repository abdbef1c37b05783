"""Shared by agent and collector: wire protocol, naming, compression, logging, errors."""
