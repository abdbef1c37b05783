"""A dump's bytes on their way to the wire: the tool's pipe read, compressed and hashed,
with a bounded hand-over so a slow link stalls the dump instead of filling memory.
"""
