"""The backup store on disk: atomic publish, names on disk, inventory, verification
status, listing, and retention with prune. Nothing here knows the wire protocol.
"""
