"""The database misbehaving mid-dump: server timeouts, terminated backends, an immediate shutdown.

Every backup ends one of two ways: a good backup that restores (when pg_dump itself finished, which proves
the dump complete and consistent), or one paragraph naming what failed, with the upload aborted and
nothing left — never an asyncpg traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kybdr_agent.postgres.cluster import PG_BIN, Cluster, start_cluster
from tests.faults.report import FaultTally
from tests.support import (
    KYBDR,
    agent_config,
    cli_json,
    create_incompressible_database,
    create_mixed_database,
    run_cli,
    unique_db,
)


def _key(tmp: Path) -> Path:
    key = tmp / "master.key"
    key.write_text("cd" * 32 + "\n")
    key.chmod(0o600)
    return key


def _leftovers(repo: Path) -> list[str]:
    """Anything in a folder repository that is not part of a complete backup (empty folders included)."""
    found: list[str] = []
    for path in repo.rglob("*"):
        empty_folder = path.is_dir() and not any(path.iterdir())
        if empty_folder or (path.is_file() and not (path.parent / "manifest.json").exists()):
            found.append(str(path))
    return found


def _start_backup(config: Path, database: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*KYBDR, "--config", str(config), "backup", "--database", database],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class TableLock:
    """Holds ACCESS EXCLUSIVE on a table from a psql session, so pg_dump waits there: a wide, certain
    "mid-dump" moment, with both the agent's snapshot session and pg_dump's connected."""

    def __init__(self, cluster: Cluster, database: str, table: str) -> None:
        self.cluster = cluster
        self.database = database
        self.proc = subprocess.Popen(
            [str(PG_BIN / "psql"), "-X", "-q", "-d", database],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **cluster.env()},
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"begin; lock table {table} in access exclusive mode; select pg_sleep(600);\n".encode())
        self.proc.stdin.flush()
        _wait_for(
            lambda: (
                cluster.psql(
                    database, "select count(*) from pg_locks where mode = 'AccessExclusiveLock' and granted"
                ).strip()
                != "0"
            ),
            "the table lock",
        )

    def release(self) -> None:
        """End the holding session on the server too: a backend in pg_sleep does not notice its client
        going away, and would hold the lock for the full ten minutes."""
        if self.cluster.process.poll() is None:
            self.cluster.psql(
                "postgres",
                "select pg_terminate_backend(pid) from pg_stat_activity "
                f"where datname = '{self.database}' and query like '%pg_sleep(600)%' and pid <> pg_backend_pid()",
            )
        self.proc.kill()
        self.proc.wait()


def _pg_dump_waiting(cluster: Cluster, database: str) -> bool:
    query = (
        "select count(*) from pg_stat_activity "
        f"where datname = '{database}' and application_name = 'pg_dump' and wait_event_type = 'Lock'"
    )
    return cluster.psql("postgres", query).strip() == "1"


@pytest.fixture(scope="module")
def locked_db(pg: Cluster) -> str:
    name = unique_db("dbfault")
    create_mixed_database(pg, name, rows=1000)
    return name


def _child_pids(program: str, database: str) -> list[int]:
    """Processes running ``program`` for ``database`` (by PGDATABASE in their environment: the agent puts
    the name there, never on the command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv0.endswith(program.encode()) and f"PGDATABASE={database}".encode() in environ:
            found.append(int(entry.name))
    return found


def _session_idle_in_transaction(cluster: Cluster, database: str) -> bool:
    query = (
        "select count(*) from pg_stat_activity "
        f"where datname = '{database}' and state = 'idle in transaction' and application_name <> 'pg_dump'"
    )
    return cluster.psql("postgres", query).strip() == "1"


def test_idle_in_transaction_timeout_does_not_kill_the_snapshot(pg: Cluster, tmp_path: Path) -> None:
    """The agent's snapshot session sits idle in transaction while pg_dump works; a database setting of
    1 s must not end it (it did: an InterfaceError traceback, a data object without a manifest)."""
    database = unique_db("idle")
    create_incompressible_database(pg, database, megabytes=16)
    pg.psql("postgres", f"alter database {database} set idle_in_transaction_session_timeout = '1s'")
    pg.psql("postgres", f"alter database {database} set statement_timeout = '1s'")
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=_key(tmp_path))
    backup = _start_backup(config, database)
    deadline = time.monotonic() + 30
    while not (dumps := _child_pids("pg_dump", database)):
        assert backup.poll() is None, backup.communicate()
        assert time.monotonic() < deadline, "pg_dump never started"
    # Freeze pg_dump until the agent's session has sat idle in its transaction for longer than 1 s.
    for pid in dumps:
        os.kill(pid, signal.SIGSTOP)
    try:
        _wait_for(lambda: _session_idle_in_transaction(pg, database), "the snapshot session to go idle")
        time.sleep(2.5)
    finally:
        for pid in dumps:
            os.kill(pid, signal.SIGCONT)
    stdout, stderr = backup.communicate(timeout=120)
    tally = FaultTally(fault="idle_in_transaction_session_timeout = 1s", injected=1, attempted=1)
    if backup.returncode == 0 and run_cli(config, "validate", stdout.strip(), "--level", "full").returncode == 0:
        tally.restorable = 1
    elif backup.returncode == 1 and "Traceback" not in stderr:
        tally.failed_cleanly = 1
    tally.left_behind = len(_leftovers(repo))
    tally.assert_clean()
    assert tally.restorable == 1, stderr


def _terminate_mid_dump(
    pg: Cluster, tmp_path: Path, database: str, which: str
) -> tuple[Path, Path, subprocess.Popen[str]]:
    """Start a backup, wait until pg_dump is blocked on a table lock, terminate the backends ``which``
    selects, release the lock; the repository, the config and the still-running backup."""
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=_key(tmp_path))
    lock = TableLock(pg, database, "events")
    try:
        backup = _start_backup(config, database)
        _wait_for(lambda: _pg_dump_waiting(pg, database), "pg_dump to wait on the lock")
        pg.psql(
            "postgres",
            f"select pg_terminate_backend(pid) from pg_stat_activity where datname = '{database}' and {which}",
        )
    finally:
        lock.release()
    return repo, config, backup


def test_terminating_pg_dumps_backend_fails_cleanly(pg: Cluster, tmp_path: Path, locked_db: str) -> None:
    repo, config, backup = _terminate_mid_dump(pg, tmp_path, locked_db, "application_name = 'pg_dump'")
    _, stderr = backup.communicate(timeout=60)
    tally = FaultTally(fault="pg_dump's backend terminated", injected=1, attempted=1)
    if backup.returncode == 1 and "pg_dump" in stderr and "Traceback" not in stderr:
        tally.failed_cleanly = 1
    tally.left_behind = len(_leftovers(repo))
    tally.assert_clean()
    assert cli_json(config, "list") == []


def test_the_agents_own_session_killed_still_makes_a_good_backup(pg: Cluster, tmp_path: Path, locked_db: str) -> None:
    """pg_dump imported the snapshot when it started; the agent's session dying later changes nothing
    about the dump's consistency, so the backup completes (with the rows counted so far) and restores."""
    the_agents_own = (
        "application_name <> 'pg_dump' and backend_type = 'client backend' and query not like '%pg_sleep(600)%'"
    )
    repo, config, backup = _terminate_mid_dump(pg, tmp_path, locked_db, the_agents_own)
    stdout, stderr = backup.communicate(timeout=60)
    tally = FaultTally(fault="the agent's snapshot session terminated", injected=1, attempted=1)
    backup_id = stdout.strip()
    target = unique_db("after_kill")
    if backup.returncode == 0 and run_cli(config, "restore", backup_id, "--target-database", target).returncode == 0:
        tally.restorable = 1
    elif backup.returncode == 1 and "Traceback" not in stderr:
        tally.failed_cleanly = 1
    tally.left_behind = len(_leftovers(repo))
    tally.assert_clean()
    assert tally.restorable == 1, stderr
    assert int(pg.psql(target, "select count(*) from accounts")) == 1000


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    with start_cluster() as cluster:
        yield cluster


def test_immediate_shutdown_mid_dump_fails_with_pg_dumps_error(own_cluster: Cluster, tmp_path: Path) -> None:
    database = unique_db("shutdown")
    create_mixed_database(own_cluster, database, rows=500)
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, own_cluster, repository=f'url = "file://{repo}"', key_file=_key(tmp_path))
    lock = TableLock(own_cluster, database, "events")
    try:
        backup = _start_backup(config, database)
        _wait_for(lambda: _pg_dump_waiting(own_cluster, database), "pg_dump to wait on the lock")
        own_cluster.process.send_signal(signal.SIGQUIT)  # what pg_ctl stop -m immediate sends
        own_cluster.process.wait(timeout=30)
        _, stderr = backup.communicate(timeout=60)
    finally:
        lock.release()
    tally = FaultTally(fault="immediate shutdown mid-dump", injected=1, attempted=1)
    # pg_dump's own words, not a client library's traceback about the agent's connection.
    if backup.returncode == 1 and "pg_dump exited with status 1" in stderr and "Traceback" not in stderr:
        tally.failed_cleanly = 1
    tally.left_behind = len(_leftovers(repo))
    tally.assert_clean()
