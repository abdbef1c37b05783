"""Shared by agent and collector: wire protocol, naming, compression, the integrity
check, logging, errors, secret files (credentials), text shown to people (text) and
file-system helpers (fsutil).
"""
