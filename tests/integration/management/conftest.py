from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from .mgmtkit import Mgmt, PgCluster, mgmt_server, pg_cluster


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    with pg_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def mgmt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mgmt]:
    """A real `meshmgmt serve`, on SQLite and on PostgreSQL (one per test module)."""
    database = None
    if request.param == "postgres":
        cluster: PgCluster = request.getfixturevalue("pg")
        database = cluster.create_database(f"api_{request.module.__name__.rsplit('.', 1)[-1]}")
    tmp: Path = tmp_path_factory.mktemp(f"mgmt-{request.param}")
    with mgmt_server(tmp, database) as server:
        yield server


@pytest.fixture
def sqlite_mgmt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mgmt]:
    with mgmt_server(tmp_path_factory.mktemp("mgmt-sqlite")) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session
