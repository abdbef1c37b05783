"""The SSH connection to the collector and every request that rides it: upload channels,
LIST, FETCH and REPORT, and the bounded retries around them.
"""
