"""Shared by agent and collector: wire protocol, naming, compression, logging, errors,
secret files (credentials), text shown to people (text) and file-system helpers (fsutil).
"""
