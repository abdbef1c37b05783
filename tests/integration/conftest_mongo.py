"""pytest plugin: nx-27017 servers for the MongoDB tests (``-p tests.integration.conftest_mongo``).

``nx_server`` is shared by the whole session (tests use their own database names);
``private_nx_server`` belongs to one test, which may kill it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest

from agent.engines.mongo_dump import MongoParams
from tests.integration.mongo_server import NxServer


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
