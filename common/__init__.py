"""Shared by agent and collector: wire protocol, naming, compression, the integrity
check, logging, errors."""
