"""The one word each error gives for REPORTs, metrics labels and drill results.

The words are pinned: the collector counts them in a metrics label and alerts quote
them, so a renamed class must not quietly change what an administrator sees.
"""

from __future__ import annotations

import pytest

from agent.restore.drill import DrillResult
from agent.restore.restore import NoBackupError, RestoreFailedError
from agent.stream.stages import DumpStalled
from common.errors import (
    BackhaulError,
    CollectorTrustError,
    CollectorUnreachableError,
    ConfigError,
    DumpError,
    IntegrityError,
    LocalProtocolError,
    ProtocolError,
    RejectedError,
    RemoteProtocolError,
    StorageError,
    TransportError,
)

REASONS: list[tuple[BackhaulError, str]] = [
    (BackhaulError("x"), "backhaul"),
    (ConfigError("x"), "config"),
    (ProtocolError("x"), "protocol"),
    (LocalProtocolError("x"), "localprotocol"),
    (RemoteProtocolError("x"), "remoteprotocol"),
    (TransportError("x"), "transport"),
    (CollectorUnreachableError("x"), "collectorunreachable"),
    (CollectorTrustError("x"), "collectortrust"),
    (DumpError("x", returncode=2, stderr="boom"), "dump"),
    (DumpStalled("x"), "dump"),
    (StorageError("x"), "storage"),
    (IntegrityError("x"), "integrity"),
    (RejectedError("busy", "too many uploads"), "rejected"),
    (NoBackupError("x"), "no_backup"),
    (RestoreFailedError(IntegrityError("x"), "dropped again"), "integrity"),
]


@pytest.mark.parametrize(("error", "reason"), REASONS, ids=lambda v: type(v).__name__)
def test_each_error_names_itself_in_one_fixed_word(error: BackhaulError, reason: str) -> None:
    assert error.reason == reason


DRILL_REASONS: list[tuple[BackhaulError, str]] = [
    (DumpError("mariadb exited with status 1"), "restore"),
    (DumpStalled("x"), "restore"),
    (IntegrityError("x"), "integrity"),
    (NoBackupError("x"), "no_backup"),
    (ConfigError("x"), "config"),
    (TransportError("x"), "transport"),
    (CollectorUnreachableError("x"), "collectorunreachable"),
    (RejectedError("not_found", "no such backup"), "rejected"),
    (RemoteProtocolError("x"), "remoteprotocol"),
    (RestoreFailedError(DumpError("pg_restore exited with status 1"), "dropped"), "restore"),
    (RestoreFailedError(IntegrityError("x"), "dropped again"), "integrity"),
]


@pytest.mark.parametrize(("error", "reason"), DRILL_REASONS, ids=lambda v: type(v).__name__)
def test_a_drill_stopped_by_an_error_reports_its_word(error: BackhaulError, reason: str) -> None:
    """As the error's own word, except that a failing database tool is the restore's."""
    result = DrillResult.stopped_by(error, "db_20261126.sql.zst")
    assert (result.ok, result.reason, result.message) == (False, reason, str(error))
    assert result.backup == "db_20261126.sql.zst"


def test_rejected_error_keeps_the_collectors_code_and_sentence_apart() -> None:
    error = RejectedError("busy", "too many uploads")
    assert (error.code, error.detail) == ("busy", "too many uploads")
    assert "(busy): too many uploads" in str(error)
