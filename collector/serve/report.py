"""REPORT: an agent tells the collector of a failure it could not send as a backup,
or of a restore drill's verdict; each becomes an outcome for metrics and alerts.
"""

from __future__ import annotations

import logging
import secrets

from collector.report.outcomes import Outcome
from collector.serve.context import RequestChannel
from common.errors import RejectCode, RemoteProtocolError
from common.events import Ack, Report
from common.naming import check_database_name
from common.text import escape_control

# The session's logger: the log lines read as they did when this lived in session.py.
log = logging.getLogger("collector.serve.session")


async def serve_report(session: RequestChannel, report: Report) -> None:
    """Log the agent's report, record its outcome and acknowledge it.

    Raises:
        RemoteProtocolError: a drill report that names no storable, allowed database.
    """
    database = report.database
    if database is not None and not (storable(database) and session.database_allowed(database)):
        database = None
    # The agent composed it, its own names already escaped: do not double those escapes.
    message = escape_control(report.message, backslash=False)
    if report.kind != "failure":
        await _drill_report(session, report, database, message)
        return
    log.error("agent %s reports failure (%s) for %s: %s", session.agent,
              escape_control(report.reason), escape_control(database or "-"), message)
    session.ctx.outcomes.finished(Outcome(
        agent=session.agent, database=database, backup_id=secrets.token_hex(6),
        result="failure", reason=escape_control(report.reason), message=message,
        is_report=True,
    ))
    await session.send(Ack())


async def _drill_report(
    session: RequestChannel, report: Report, database: str | None, message: str
) -> None:
    ok = report.kind == "drill_ok"
    if database is None:
        raise RemoteProtocolError("a drill report names a database", RejectCode.NOT_ALLOWED)
    level = logging.INFO if ok else logging.ERROR
    log.log(level, "agent %s restore drill of %s %s: %s", session.agent,
            escape_control(database), "passed" if ok else "FAILED", message)
    session.ctx.outcomes.finished(Outcome(
        agent=session.agent, database=database, backup_id=secrets.token_hex(6),
        result="success" if ok else "failure",
        reason=None if ok else escape_control(report.reason) or "drill",
        message=message, is_drill=True,
    ))
    await session.send(Ack())


def storable(database: str) -> bool:
    """True when the name would be accepted as a backup's database name."""
    try:
        check_database_name(database)
    except RemoteProtocolError:
        return False
    return True
