"""Fixtures that start real servers on loopback for the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mariadb_server import MariaDBNotInstalled, MariaDBServer

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
