"""Fixtures that start real servers on loopback for the integration tests.

MongoDB: ``nx_server`` (nx-27017) is shared by the whole session (tests use their own
database names); ``private_nx_server`` belongs to one test, which may kill it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pymongo
import pytest

from agent.engines.mongo_connect import MongoParams
from tests.integration.harness import Deployment
from tests.integration.mariadb_server import MariaDBNotInstalled, MariaDBServer
from tests.integration.mongo_server import NxServer
from tests.integration.pg_sample_data import create_sample_databases as create_pg_samples
from tests.integration.postgres_server import PostgresNotInstalled, PostgresServer
from tests.integration.sample_data import create_sample_databases


class _Server(Protocol):
    def start(self) -> None: ...
    def close(self) -> None: ...


_S = TypeVar("_S", bound=_Server)


def _running(make: Callable[[], _S], not_installed: type[Exception]) -> Iterator[_S]:
    """A started server for a fixture to yield from, closed when the fixture ends; a missing
    install fails the test with its message rather than a traceback."""
    try:
        server = make()
    except not_installed as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    try:
        yield server
    finally:
        server.close()


# -- MariaDB ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDBServer]:
    """One MariaDB server for the whole session; tests must not stop or kill it."""
    yield from _running(MariaDBServer, MariaDBNotInstalled)


@pytest.fixture
def mariadb_fresh() -> Iterator[MariaDBServer]:
    """A MariaDB server of the test's own, for tests that stop, kill or restart it."""
    yield from _running(MariaDBServer, MariaDBNotInstalled)


@pytest.fixture(scope="module")
def samples(mariadb: MariaDBServer) -> list[str]:
    """The tricky sample databases, (re)created once per test module."""
    return create_sample_databases(mariadb)


# -- Deployments ----------------------------------------------------------------------------


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    """Keys and folders of one collector with one agent, db1."""
    deployment = Deployment(tmp_path)
    deployment.add_agent("db1")
    return deployment


# -- MongoDB ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NxServer]:
    """A MongoDB wire-protocol server shared by the session."""
    server = NxServer(tmp_path_factory.mktemp("nx-shared"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_nx_server(tmp_path: Path) -> Iterator[NxServer]:
    """A server for one test alone, free to be killed."""
    server = NxServer(tmp_path / "nx")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def mongo_params(nx_server: NxServer) -> MongoParams:
    """Connection parameters for the shared server, with short timeouts."""
    return MongoParams(nx_server.uri, timeout=3.0, socket_timeout=30.0)


@pytest.fixture(scope="module")
def client(nx_server: NxServer) -> Iterator[pymongo.MongoClient[dict[str, Any]]]:
    """A pymongo client of the shared server, for filling and reading test data."""
    mongo: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(nx_server.uri)
    yield mongo
    mongo.close()


# -- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test module; tests must not stop it."""
    yield from _running(PostgresServer, PostgresNotInstalled)


@pytest.fixture
def postgres_fresh() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, for tests that stop or break it."""
    yield from _running(PostgresServer, PostgresNotInstalled)


@pytest.fixture(scope="module")
def pg_samples(postgres: PostgresServer) -> list[str]:
    """The tricky sample databases, created once per module."""
    return create_pg_samples(postgres)
