"""Restores never destroy what they were not told to: a target holding anything at all survives without
--force, --force says which sessions it terminates, and scratch databases nobody holds do not outlive the
next restore (while one somebody holds is left alone)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kybdr_agent.postgres.cluster import PG_BIN, Cluster
from tests.faults.report import FaultTally
from tests.support import agent_config, cli_json, create_mixed_database, run_cli, unique_db


@pytest.fixture(scope="module")
def source_db(pg: Cluster) -> str:
    name = unique_db("safe")
    create_mixed_database(pg, name, rows=500)
    return name


@pytest.fixture(scope="module")
def setup(pg: Cluster, source_db: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A folder repository with one backup of the source database."""
    tmp = tmp_path_factory.mktemp("restore-safety")
    key = tmp / "master.key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    config = agent_config(tmp, pg, repository=f'url = "file://{tmp / "repo"}"', key_file=key)
    made = cli_json(config, "backup", "--database", source_db)
    return config, str(made["id"])


def _databases(pg: Cluster) -> set[str]:
    return set(pg.psql("postgres", "select datname from pg_database").split())


# Each puts exactly one kind of content into an otherwise fresh database; (setup SQL on the target,
# SQL on the maintenance database, a query whose answer proves the content survived).
CONTENTS = {
    "schema": ("create schema kept", "", "select count(*) from pg_namespace where nspname = 'kept'"),
    "enum": ("create type mood as enum ('ok')", "", "select count(*) from pg_type where typname = 'mood'"),
    "domain": (
        "create domain posint as int check (value > 0)",
        "",
        "select count(*) from pg_type where typname = 'posint'",
    ),
    "text search configuration": (
        "create text search configuration kept_ts (copy = simple)",
        "",
        "select count(*) from pg_ts_config where cfgname = 'kept_ts'",
    ),
    "database setting": (
        "",
        "alter database {db} set work_mem = '7MB'",
        "select count(*) from pg_db_role_setting "
        "where setdatabase = (select oid from pg_database where datname = current_database())",
    ),
    "owner": (
        "",
        "do $$ begin if not exists (select from pg_roles where rolname = 'kybdr_owner') "
        "then create role kybdr_owner; end if; end $$; alter database {db} owner to kybdr_owner",
        "select count(*) from pg_database "
        "where datname = current_database() and pg_get_userbyid(datdba) = 'kybdr_owner'",
    ),
    "comment": (
        "",
        "comment on database {db} is 'precious'",
        "select count(*) from pg_database "
        "where datname = current_database() and shobj_description(oid, 'pg_database') = 'precious'",
    ),
    "grant on public": (
        "grant create on schema public to public",
        "",
        "select count(*) from pg_namespace where nspname = 'public' and nspacl::text like '%=UC/%'",
    ),
    "comment on public": (
        "comment on schema public is 'mine'",
        "",
        "select count(*) from pg_description where description = 'mine'",
    ),
}


@pytest.mark.parametrize("kind", sorted(CONTENTS))
def test_a_target_with_any_content_is_never_replaced_without_force(
    pg: Cluster, setup: tuple[Path, str], kind: str
) -> None:
    config, backup_id = setup
    target = unique_db("occupied")
    pg.psql("postgres", f'create database "{target}"')
    on_target, on_maintenance, proof = CONTENTS[kind]
    if on_target:
        pg.psql(target, on_target)
    if on_maintenance:
        pg.psql("postgres", on_maintenance.format(db=f'"{target}"'))
    assert pg.psql(target, proof).strip() == "1"

    refused = run_cli(config, "restore", backup_id, "--target-database", target)

    tally = FaultTally(fault=f"restore over a target holding a {kind}", injected=1, attempted=1)
    survived = (
        pg.psql(target, proof).strip() == "1"
        and pg.psql(target, "select to_regclass('accounts') is null").strip() == "t"
    )
    if refused.returncode == 1 and "--force" in refused.stderr and survived and "Traceback" not in refused.stderr:
        tally.failed_cleanly = 1
    else:
        tally.left_behind = 1
    tally.assert_clean()
    assert not [d for d in _databases(pg) if d.startswith("kybdr_restore_")]


def test_a_fresh_empty_target_is_replaced_without_force(pg: Cluster, setup: tuple[Path, str]) -> None:
    config, backup_id = setup
    target = unique_db("fresh")
    pg.psql("postgres", f'create database "{target}"')
    done = run_cli(config, "restore", backup_id, "--target-database", target, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["replaced_existing"] is True
    assert int(pg.psql(target, "select count(*) from accounts")) == 500


@pytest.fixture
def connected_session(pg: Cluster) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    target = unique_db("busy")
    pg.psql("postgres", f'create database "{target}"')
    pg.psql(target, "create table t (x int)")
    session = subprocess.Popen(
        [str(PG_BIN / "psql"), "-X", "-q", "-d", target, "-c", "select pg_sleep(600)"],
        env={**__import__("os").environ, **pg.env()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while pg.psql("postgres", f"select count(*) from pg_stat_activity where datname = '{target}'").strip() == "0":
        assert time.monotonic() < deadline, "the client session never connected"
        time.sleep(0.1)
    try:
        yield target, session
    finally:
        session.kill()
        session.wait()


def test_force_says_how_many_sessions_it_terminates(
    pg: Cluster, setup: tuple[Path, str], connected_session: tuple[str, subprocess.Popen[bytes]]
) -> None:
    config, backup_id = setup
    target, session = connected_session
    done = run_cli(config, "restore", backup_id, "--target-database", target, "--force", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["terminated_sessions"] == 1
    assert any("1 client session" in notice for notice in result["notices"])
    assert "1 client session(s) connected now" in done.stderr  # said before the restore ran
    assert session.wait(timeout=20) != 0  # its connection was terminated
    assert int(pg.psql(target, "select count(*) from accounts")) == 500


def test_without_force_a_target_in_use_is_not_terminated(
    pg: Cluster, setup: tuple[Path, str], connected_session: tuple[str, subprocess.Popen[bytes]]
) -> None:
    config, backup_id = setup
    target, session = connected_session
    refused = run_cli(config, "restore", backup_id, "--target-database", target)
    assert refused.returncode == 1
    assert session.poll() is None  # still connected: nothing was terminated
    assert "Traceback" not in refused.stderr


def test_leftover_scratch_databases_go_at_the_next_restore_unless_held(pg: Cluster, setup: tuple[Path, str]) -> None:
    config, backup_id = setup
    dead = "kybdr_restore_0badc0ffee00"
    held = "kybdr_drill_0c0ffee0000a"
    pg.psql("postgres", f"create database {dead}")
    pg.psql("postgres", f"create database {held}")
    holder = subprocess.Popen(
        [str(PG_BIN / "psql"), "-X", "-q", "-d", "postgres"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={**__import__("os").environ, **pg.env()},
    )
    assert holder.stdin is not None
    holder.stdin.write(f"select pg_advisory_lock({0x6B796264}, hashtext('{held}'));\nselect pg_sleep(600);\n".encode())
    holder.stdin.flush()
    deadline = time.monotonic() + 20
    while pg.psql("postgres", "select count(*) from pg_locks where locktype = 'advisory'").strip() == "0":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    try:
        target = unique_db("after")
        done = run_cli(config, "restore", backup_id, "--target-database", target)
        assert done.returncode == 0, done.stderr
        names = _databases(pg)
        tally = FaultTally(fault="scratch database left by a killed restore", injected=1, attempted=1, restorable=1)
        tally.left_behind = int(dead in names)
        tally.assert_clean()
        assert held in names  # a drill in progress elsewhere keeps its scratch database
    finally:
        holder.kill()
        holder.wait()
        pg.psql("postgres", f"drop database if exists {held}")


def test_a_scratch_name_is_refused_as_a_target(setup: tuple[Path, str]) -> None:
    config, backup_id = setup
    refused = run_cli(config, "restore", backup_id, "--target-database", "kybdr_restore_mine")
    assert refused.returncode == 1
    assert "scratch" in refused.stderr


def test_the_daemon_drops_unheld_scratch_databases_and_shows_those_it_must_keep(
    pg: Cluster, tmp_path: Path, key_file: Path, source_db: str
) -> None:
    from tests.daemon_support import start_daemon
    from tests.integration.test_daemon import daemon_config

    dead = "kybdr_drill_0dead0000001"
    kept = "kybdr_restore_0keep0000001"
    pg.psql("postgres", f"create database {dead}")
    pg.psql("postgres", f"create database {kept}")
    pg.psql("postgres", f"comment on database {kept} is 'kybdr-agent: keep: the restored copy of app'")
    config, socket_path = daemon_config(tmp_path, pg, key_file, databases=[source_db])
    agent = start_daemon(config, socket_path, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (health := agent.request("GET", "/healthz").body).get("housekeeping"):
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        housekeeping = health["housekeeping"]
        assert dead in housekeeping["dropped_scratch"], housekeeping
        assert kept in housekeeping["scratch_not_dropped"], housekeeping
        names = _databases(pg)
        tally = FaultTally(fault="scratch databases at daemon start", injected=2, attempted=0)
        tally.left_behind = int(dead in names) + int(kept not in names)  # the kept one must survive
        tally.assert_clean()
    finally:
        assert agent.stop() == 0, agent.log()
        pg.psql("postgres", f"drop database if exists {kept}")
