"""Fixtures of the component tests: one small database on the session's cluster, and per test a folder
repository, a state directory and a clock the test moves by hand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kybdr_agent.config import AgentSettings
from kybdr_agent.postgres.cluster import Cluster
from tests.component.harness import ManualClock, write_settings
from tests.support import unique_db


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def database(pg: Cluster) -> Iterator[str]:
    """A few hundred rows in two tables: enough for a drill to compare row counts, small enough that a
    backup takes a fraction of a second."""
    name = unique_db("component")
    pg.psql("postgres", f'create database "{name}"')
    pg.psql(
        name,
        "create table accounts (id int primary key, name text not null); "
        "insert into accounts select g, 'account ' || g from generate_series(1, 300) g; "
        "create table notes (id int references accounts, body text); "
        "insert into notes select 1 + g % 300, md5(g::text) from generate_series(1, 500) g;",
    )
    yield name
    pg.psql("postgres", f'drop database if exists "{name}" with (force)', check=False)


@pytest.fixture
def settings(tmp_path: Path, pg: Cluster, database: str) -> AgentSettings:
    return write_settings(tmp_path, pg, database)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()
