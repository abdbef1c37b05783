"""How the agent reaches a MongoDB server: its parameters, a client, and the translation
of pymongo's errors.

Every pymongo failure becomes a :class:`~common.errors.DumpError` whose message never
holds the password; settings pymongo rejects become a
:class:`~common.errors.ConfigError`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from bson.errors import BSONError
from pymongo import MongoClient
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

from common.credentials import scrub
from common.errors import BackhaulError, ConfigError, DumpError

_AUTH_FAILED_CODES: Final = frozenset({18, 11})  # AuthenticationFailed, UserNotFound

Client = MongoClient[dict[str, Any]]


@dataclass(frozen=True)
class MongoParams:
    """How to reach a MongoDB server; the password never enters the URI or a repr.

    ``uri`` may carry hosts, a user name and options (TLS, replica set) but no password;
    ``timeout`` bounds connecting and server selection, ``socket_timeout`` one reply.
    """

    uri: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 10.0
    socket_timeout: float = 300.0

    def __post_init__(self) -> None:
        scheme, sep, rest = self.uri.partition("://")
        if not sep or scheme not in ("mongodb", "mongodb+srv"):
            raise ConfigError("MongoDB URI must start with mongodb:// or mongodb+srv://")
        userinfo, at, _ = re.split(r"[/?]", rest, maxsplit=1)[0].rpartition("@")
        if at and ":" in userinfo:
            raise ConfigError("MongoDB URI must not contain a password; give it separately")
        if self.timeout <= 0 or self.socket_timeout <= 0:
            raise ConfigError("MongoDB timeouts must be positive")

    @property
    def hosts(self) -> str:
        """The host list of the URI, for messages."""
        rest = self.uri.partition("://")[2]
        return re.split(r"[/?]", rest, maxsplit=1)[0].rpartition("@")[2]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BulkWriteError):  # its text holds whole documents; keep the first error
        errors = exc.details.get("writeErrors") or [{}]
        first = errors[0]
        return (
            f"{len(errors)} write error(s), first: {first.get('errmsg')} (code {first.get('code')})"
        )
    if isinstance(exc, OperationFailure):
        message = exc.details.get("errmsg") if exc.details else None
        return f"{message or exc} (code {exc.code})"
    return str(exc).split(", Timeout:")[0] or type(exc).__name__


@contextlib.contextmanager
def translate_errors(params: MongoParams, action: str) -> Iterator[None]:
    """Turn pymongo's exceptions into :class:`DumpError` naming ``action`` and the server."""
    try:
        yield
    except OperationFailure as exc:
        if exc.code in _AUTH_FAILED_CODES:
            who = params.username or "(no user)"
            message = f"authentication as {who!r} failed on MongoDB at {params.hosts}"
        else:
            message = f"{action} failed on MongoDB at {params.hosts}: {_describe(exc)}"
        raise DumpError(scrub(message, params.password)) from exc
    except (PyMongoError, BSONError) as exc:
        message = f"{action} failed on MongoDB at {params.hosts}: {_describe(exc)}"
        raise DumpError(scrub(message, params.password)) from exc


def connect(params: MongoParams) -> Client:
    """A client for ``params``; nothing is sent until the first operation.

    Raises :class:`ConfigError` when pymongo rejects the URI or options.
    """
    credentials: dict[str, Any] = {}
    if params.username is not None:
        credentials["username"] = params.username
    if params.password is not None:
        credentials["password"] = params.password
    millis = int(params.timeout * 1000)
    try:
        return MongoClient(
            params.uri,
            serverSelectionTimeoutMS=millis,
            connectTimeoutMS=millis,
            socketTimeoutMS=int(params.socket_timeout * 1000),
            appname="backhaul",
            connect=False,
            **credentials,
        )
    except PyMongoError as exc:
        raise ConfigError(
            scrub(f"MongoDB connection settings are invalid: {exc}", params.password)
        ) from exc


def hello(client: Client, params: MongoParams) -> dict[str, Any]:
    """The first round trip, which also authenticates."""
    try:
        with translate_errors(params, "connecting"):
            return client.admin.command("hello")
    except BackhaulError:
        raise
    except Exception as exc:  # a server that breaks the handshake surfaces as odd exceptions
        message = f"connecting failed on MongoDB at {params.hosts}: {type(exc).__name__}"
        raise DumpError(scrub(message, params.password)) from exc
