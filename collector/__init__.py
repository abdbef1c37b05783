"""The backup-host side of Backhaul: SSH server, storage, verification, metrics, alerts."""
