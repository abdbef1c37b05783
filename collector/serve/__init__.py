"""The serving path: the SSH server and one session per channel, which proves each
incoming backup whole (with :mod:`common.integrity`) before it is published.
"""
