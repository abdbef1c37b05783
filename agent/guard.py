"""What surrounds every backup of a database on this host, whoever starts it: the
database's lock (:mod:`agent.db_lock`), and the record of how the run went
(:mod:`agent.run_state`), written while the lock is still held.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from agent.config import AgentConfig, SourceConfig
from agent.db_lock import DatabaseBusyError, hold_database
from agent.run_state import RunState
from agent.runner import BackupResult, Guard
from common.errors import ConfigError
from common.text import escape_control

log = logging.getLogger(__name__)


def database_guard(
    config: AgentConfig,
    command: str,
    *,
    wait: bool = False,
    scheduled: datetime | None = None,
) -> Guard:
    """A :data:`agent.runner.Guard` for ``command`` (as the lock shows it to others).

    ``scheduled``: the scheduled time this run stands for, recorded once the attempt has
    ended (success or failure; a run cut short by a stop is not recorded, so it is made
    up at the next start). A success is always recorded.
    """

    async def guard(
        source: SourceConfig, database: str, backup: Callable[[], Awaitable[BackupResult]]
    ) -> BackupResult:
        try:
            async with hold_database(config.run_dir, source.name, database, command, wait=wait):
                result = await backup()
                if result.ok or scheduled is not None:
                    RunState(config.state_dir).record(
                        source.name,
                        database,
                        scheduled=scheduled,
                        success=datetime.now(UTC) if result.ok else None,
                    )
                return result
        except (DatabaseBusyError, ConfigError) as exc:  # the lock's: nothing was touched
            log.error("backup of %s/%s not started: %s", source.name, escape_control(database), exc)
            return BackupResult(
                source.name, database, False, error=str(exc), exit_code=exc.exit_code, cause=exc
            )

    return guard
