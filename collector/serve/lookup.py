"""LIST and FETCH: an agent reads back its own backups, for restores and drills."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiofiles

from collector.serve.context import RequestChannel
from collector.store.files import StoredBackup
from common.errors import RejectCode, RemoteProtocolError
from common.events import Data, End, Fetch, FetchMeta, Listing, ListRequest
from common.frames import MAX_CONTROL_PAYLOAD
from common.naming import check_database_name

# The session's logger: the log lines read as they did when this lived in session.py.
log = logging.getLogger("collector.serve.session")
FETCH_CHUNK = 256 * 1024


async def serve_list(session: RequestChannel, request: ListRequest) -> None:
    """Send the agent's backups (of one database, or all), newest first as many as fit.

    Raises:
        RemoteProtocolError: the database name is not a storable one.
    """
    if request.database is not None:
        check_database_name(request.database)
    backups = await asyncio.to_thread(session.ctx.store.backups, session.agent, request.database)
    summaries: list[dict[str, Any]] = []
    budget = MAX_CONTROL_PAYLOAD - 1024
    for backup in reversed(backups):  # newest first, as many as fit
        summary = _summary(backup)
        budget -= len(json.dumps(summary, ensure_ascii=False).encode()) + 8
        if budget < 0:
            break
        summaries.append(summary)
    await session.send(Listing(tuple(reversed(summaries))))


async def serve_fetch(session: RequestChannel, request: Fetch) -> None:
    """Send one of the agent's backups: FETCH_META, its bytes as DATA, then END.

    Raises:
        RemoteProtocolError: a bad database name, or no such backup (``not_found``).
    """
    check_database_name(request.database)
    folder = session.ctx.store.database_folder(session.agent, request.database)
    match = [b for b in await asyncio.to_thread(session.ctx.store.backups, session.agent,
                                                request.database)
             if b.name == request.name]
    if not match:
        raise RemoteProtocolError(
            f"no backup {request.name!r} of {request.database!r}", RejectCode.NOT_FOUND
        )
    backup = match[0]
    await session.send(FetchMeta(backup.name, backup.manifest))
    sent = 0
    async with aiofiles.open(folder / backup.name, "rb") as handle:
        while chunk := await handle.read(min(FETCH_CHUNK, session.peer_max_data)):
            await session.send(Data(chunk))
            sent += len(chunk)
    await session.send(End(sent, str(backup.manifest.get("sha256", "")), {}))
    log.info("agent %s fetched %s (%d bytes)", session.agent, backup.name, sent)


def _summary(backup: StoredBackup) -> dict[str, Any]:
    manifest = backup.manifest
    return {
        "name": backup.name,
        "database": manifest.get("database"),
        "size": manifest.get("size"),
        "sha256": manifest.get("sha256"),
        "started_at": manifest.get("started_at"),
        "engine": manifest.get("engine"),
        "verified": bool(manifest.get("verified")),
    }
