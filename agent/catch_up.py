"""Which databases the agent service makes up at start: those whose scheduled run was
missed while it was not running, once each (the rule is
:func:`agent.retry_policy.missed_run`; the records are :mod:`agent.run_state`'s).
"""

from __future__ import annotations

import logging
from datetime import datetime

from agent.config import SourceConfig
from agent.retry_policy import missed_run
from agent.run_state import RunState
from agent.schedule import Schedule
from common.text import escape_control

log = logging.getLogger(__name__)


def plan_catch_ups(
    state: RunState, source: SourceConfig, schedule: Schedule, now: datetime
) -> list[tuple[str, datetime]]:
    """(database, missed scheduled time) for each database of ``source`` to make up.

    A source of ``"all"`` databases makes up those it has records of (the databases it
    backed up before); ``catch_up = false`` makes up none.
    """
    if not source.catch_up:
        return []
    names = state.databases(source.name) if source.databases == "all" else source.databases
    found: list[tuple[str, datetime]] = []
    for database in names:
        record = state.load(source.name, database)
        if record is None:
            log.info("no record of earlier scheduled runs of %s/%s: nothing to make up",
                     source.name, escape_control(database))
            continue
        missed = missed_run(schedule, record.last_scheduled, record.last_success, now)
        if missed is not None:
            found.append((database, missed))
    return found
