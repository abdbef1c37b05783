"""Each database engine the agent backs up: discovery, preflight and the dump stream.
An engine knows its database and its tools, and nothing of SSH or of the collector.
"""
