"""Where a SQL server is and who the agent is on it: the parameters MySQL/MariaDB and
PostgreSQL share.

The password is in memory only: it never shows in a repr, a message or a log line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerParams:
    """How to reach a server; ``socket``, when set, wins over host and port.

    Engines subclass it without new fields (and without ``@dataclass``, which would
    replace the repr that hides the password).
    """

    host: str
    port: int
    socket: str | None
    user: str
    password: str | None

    def __repr__(self) -> str:
        password = "None" if self.password is None else "'***'"
        return (
            f"{type(self).__name__}(host={self.host!r}, port={self.port!r}, "
            f"socket={self.socket!r}, user={self.user!r}, password={password})"
        )

    @property
    def endpoint(self) -> str:
        """Where the server is, for messages: the socket path or ``host:port``."""
        if self.socket:
            return f"socket {self.socket}"
        return f"{self.host}:{self.port}"
