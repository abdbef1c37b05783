"""The database-host side of Backhaul: dump, compress, hash and stream to the collector."""
