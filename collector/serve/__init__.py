"""The serving path: the SSH server, one session per channel, and the check that proves
an incoming backup whole before it is published.
"""
