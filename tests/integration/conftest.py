"""Fixtures that start real servers on loopback for the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Deployment
from mariadb_server import MariaDBNotInstalled, MariaDBServer
from pg_sample_data import create_sample_databases as create_pg_samples
from postgres_server import PostgresNotInstalled, PostgresServer
from sample_data import create_sample_databases

# -- MariaDB ---------------------------------------------------------------------------------


def _new_mariadb() -> MariaDBServer:
    try:
        server = MariaDBServer()
    except MariaDBNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDBServer]:
    """One MariaDB server for the whole session; tests must not stop or kill it."""
    server = _new_mariadb()
    yield server
    server.close()


@pytest.fixture
def mariadb_fresh() -> Iterator[MariaDBServer]:
    """A MariaDB server of the test's own, for tests that stop, kill or restart it."""
    server = _new_mariadb()
    yield server
    server.close()


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


# -- PostgreSQL ------------------------------------------------------------------------------


def _new_postgres() -> PostgresServer:
    try:
        server = PostgresServer()
    except PostgresNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test module; tests must not stop it."""
    server = _new_postgres()
    yield server
    server.close()


@pytest.fixture
def postgres_fresh() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, for tests that stop or break it."""
    server = _new_postgres()
    yield server
    server.close()


@pytest.fixture(scope="module")
def pg_samples(postgres: PostgresServer) -> list[str]:
    """The tricky sample databases, created once per module."""
    return create_pg_samples(postgres)
