"""The exception tree shared by agent and collector, with exit and reject codes.

    BackhaulError                  root; every error a user can see derives from it
    ├── ConfigError                bad configuration file or command-line input   exit 2
    ├── ProtocolError              a peer broke the wire protocol                 exit 3
    │   ├── LocalProtocolError     we tried to send something out of order
    │   └── RemoteProtocolError    the peer sent something malformed or out of order
    ├── TransportError             SSH connection, authentication or host key     exit 4
    ├── DumpError                  the database or its dump tool failed          exit 5
    ├── StorageError               the collector could not store a backup         exit 6
    ├── IntegrityError             a checksum, size or format check failed        exit 7
    └── RejectedError              the collector refused a backup (reason given)  exit 8

Exit code 1 is kept for "several backups of one run failed for different reasons".
Each family also has a protocol reject code, so the collector can tell the agent *why*
in one word and the agent can map it back to a family.

Each error also names itself in one word, ``reason``, which the agent puts in REPORTs
(the collector counts it in a metrics label) and logs: the family's own word where it
sets one (``dump`` for every DumpError, a stall included), else its class's name
(``ConfigError`` → ``config``, ``CollectorUnreachableError`` → ``collectorunreachable``).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit statuses, documented in the README."""

    OK = 0
    FAILED = 1
    CONFIG = 2
    PROTOCOL = 3
    TRANSPORT = 4
    DUMP = 5
    STORAGE = 6
    INTEGRITY = 7
    REJECTED = 8


class RejectCode(enum.StrEnum):
    """One-word reasons the collector gives in a REJECT frame."""

    PROTOCOL = "protocol"  # malformed frame, wrong order, unsupported version
    TOO_LARGE = "too_large"  # frame, metadata or stream over a limit
    BAD_NAME = "bad_name"  # database name no server allows
    BAD_TIME = "bad_time"  # start time outside what the collector accepts
    NOT_ALLOWED = "not_allowed"  # database not on this agent's allow-list
    NOT_FOUND = "not_found"  # fetch of a backup that does not exist
    STORAGE = "storage"  # disk full, permissions, I/O error on the collector
    INTEGRITY = "integrity"  # byte count, SHA-256 or format check failed
    ABORTED = "aborted"  # the agent aborted the backup
    BUSY = "busy"  # connection or channel caps reached
    INTERNAL = "internal"  # a bug on the collector; logged there in full


class BackhaulError(Exception):
    """Root of every error Backhaul reports to a user."""

    exit_code: ExitCode = ExitCode.FAILED
    reject_code: RejectCode = RejectCode.INTERNAL

    @property
    def reason(self) -> str:
        """One word for REPORTs, metrics labels and logs (see the module docstring)."""
        return type(self).__name__.removesuffix("Error").lower() or "error"


class ConfigError(BackhaulError):
    """A configuration file or command-line value is wrong; names the file and key."""

    exit_code = ExitCode.CONFIG


class ProtocolError(BackhaulError):
    """The wire protocol was broken; subclasses say by whom."""

    exit_code = ExitCode.PROTOCOL
    reject_code = RejectCode.PROTOCOL


class LocalProtocolError(ProtocolError):
    """We tried to send a frame the protocol does not allow now (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent a malformed, oversized or out-of-order frame."""

    def __init__(self, message: str, code: RejectCode = RejectCode.PROTOCOL) -> None:
        super().__init__(message)
        self.reject_code = code


class TransportError(BackhaulError):
    """The SSH connection failed: unreachable, refused, host key mismatch, lost."""

    exit_code = ExitCode.TRANSPORT


class CollectorUnreachableError(TransportError):
    """No connection to the collector could be made or kept; a later attempt may work."""


class CollectorTrustError(TransportError):
    """The collector's host key is not the pinned one, or it refused this agent's key.

    Retrying cannot help: an administrator has to fix the keys.
    """


class DumpError(BackhaulError):
    """The database or its dump tool failed; carries the tool's exit status and stderr."""

    exit_code = ExitCode.DUMP
    reason = "dump"  # the family's word, whatever the subclass

    def __init__(
        self, message: str, *, returncode: int | None = None, stderr: str = ""
    ) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class StorageError(BackhaulError):
    """The collector could not write, sync or rename a backup."""

    exit_code = ExitCode.STORAGE
    reject_code = RejectCode.STORAGE


class IntegrityError(BackhaulError):
    """A byte count, checksum, compression stream or dump trailer did not check out."""

    exit_code = ExitCode.INTEGRITY
    reject_code = RejectCode.INTEGRITY


class RejectedError(BackhaulError):
    """The collector answered REJECT: ``code`` is its one word (a RejectCode value, compare
    with the enum), ``detail`` its sentence."""

    exit_code = ExitCode.REJECTED

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"collector rejected the backup ({code}): {detail}")
        self.code = code
        self.detail = detail
