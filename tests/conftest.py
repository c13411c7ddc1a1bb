"""Fixtures: a throwaway PostgreSQL cluster, a fresh database on each backend, and a real uvicorn
server on loopback (helpers in :mod:`tests.support`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from latency_service.testing import PgCluster, Server, pg_bin, stop_server
from tests.support import start_server

# whether the machine running the tests looks busy is its own affair: services and apps built in
# tests never look at the host's load (test_busy_host.py injects a probe and a clock instead)
os.environ.setdefault("GAS_BUSY_CHECK", "false")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (.ci/run installs them with apt-get)")
    cluster = PgCluster(bindir).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gas.db'}"
    return request.getfixturevalue("pg_cluster").create_db()


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[Server]:
    srv = start_server(db_url, tmp_path)
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server per test module and backend, for tests whose assertions hold whatever the
    others stored before them (reads, refusals, jobs they look up by id): each server start is a
    uvicorn plus a device-worker process that imports torch."""
    tmp = tmp_path_factory.mktemp("shared")
    url = f"sqlite:///{tmp / 'gas.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_cluster").create_db()
    srv = start_server(url, tmp)
    try:
        yield srv
    finally:
        stop_server(srv)
