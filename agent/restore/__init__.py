"""Backups back from the collector into a database: restore, drill, and each engine's
loader and the checks a target must pass before anything is written.
"""
