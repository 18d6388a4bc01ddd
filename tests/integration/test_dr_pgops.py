"""DR operations on a real primary + streaming standby: fence, unfence, the fence command, catch-up,
promotion, and rejoin with pg_rewind (a full failover, then a zero-loss switchover back).

One module-scoped pair serves the tests that leave roles as they found them (fencing, catch-up, rejoin's
refusals); the failover test starts its own pair, since it swaps the roles twice.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import anyio
import asyncpg
import pytest

from kybdr_agent.dr.pgops import (
    DRError,
    FenceResult,
    PromoteResult,
    fence,
    promote,
    run_fence_command,
    unfence,
    wait_caught_up,
)
from kybdr_agent.dr.rejoin import RejoinResult, rejoin
from kybdr_agent.postgres.cluster import PG_BIN, free_port
from kybdr_agent.postgres.connection import Connection
from tests.dr_cluster import Node, Pair, start_pair

DB = "postgres"
T = TypeVar("T")


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with start_pair() as started:
        yield started


def _run(call: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await call()

    return anyio.run(main)


def _closed_port_connection() -> Connection:
    return Connection.from_settings(f"host=127.0.0.1 port={free_port()} user=postgres", None, PG_BIN, 5.0)


def _write_error(pair: Pair, node: Node) -> str:
    """Try a write over TCP as a fresh client; the server's refusal ("" if the write succeeded)."""

    async def attempt() -> str:
        async with pair.connection(node).connect(DB) as session:
            try:
                await session.execute("CREATE TABLE IF NOT EXISTS fence_probe(x int)")
                await session.execute("INSERT INTO fence_probe VALUES (1)")
            except asyncpg.PostgresError as exc:
                return str(exc)
        return ""

    return anyio.run(attempt)


# --------------------------------------------------------------------------------------------- fencing


def test_fence_makes_writes_fail_ends_sessions_and_survives_restart(pair: Pair) -> None:
    primary = pair.primary
    conn = pair.connection(primary)
    primary.psql(DB, "CREATE TABLE IF NOT EXISTS before_fence(x int)")

    async def scenario() -> tuple[FenceResult, str, str]:
        async with conn.connect(DB) as victim:
            await victim.execute("BEGIN")
            await victim.execute("INSERT INTO before_fence VALUES (1)")
            result = await fence(conn, database=DB, timeout=10)
            try:
                await victim.execute("INSERT INTO before_fence VALUES (2)")
                after = "still alive"
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                after = type(exc).__name__
        async with conn.connect(DB) as fresh:
            shown = await fresh.fetchval("SHOW default_transaction_read_only")
        return result, after, shown

    result, after, shown = anyio.run(scenario)
    assert result.fenced, result
    assert result.reachable
    assert result.how == "sql"
    assert result.lsn is not None
    assert result.lsn >= int(primary.psql(DB, "SELECT pg_current_wal_flush_lsn() - '0/0'")) - 10**6
    assert after != "still alive"  # the open read-write transaction's session was terminated
    assert shown == "on"
    assert "read-only" in _write_error(pair, primary)
    assert primary.psql(DB, "SELECT count(*) FROM before_fence") == "0"  # it never committed

    assert _run(partial(fence, conn, database=DB, timeout=10)).fenced  # idempotent

    pair.restart(primary)
    assert "read-only" in _write_error(pair, primary)  # postgresql.auto.conf kept the fence

    _run(partial(unfence, conn, database=DB, timeout=10))
    assert _write_error(pair, primary) == ""
    _run(partial(unfence, conn, database=DB, timeout=10))  # idempotent
    pair.wait_streaming(pair.standby)


def test_fence_unreachable_server_is_a_result_within_the_bound() -> None:
    started = time.monotonic()
    result = _run(partial(fence, _closed_port_connection(), database=DB, timeout=3))
    assert not result.fenced
    assert not result.reachable
    assert "cannot connect" in result.detail
    assert time.monotonic() - started < 3 + 2  # the bound holds (with slack for a loaded machine)


def test_unfence_unreachable_raises() -> None:
    with pytest.raises(DRError, match="lifting the read-only fence"):
        _run(partial(unfence, _closed_port_connection(), database=DB, timeout=3))


def test_fence_with_a_wrong_password_fails_without_showing_it(pair: Pair, tmp_path: Path) -> None:
    wrong = tmp_path / "pw"
    wrong.write_text("not-the-password\n")
    conn = Connection.from_settings(pair.dsn(pair.primary), wrong, PG_BIN, 5.0)
    result = _run(partial(fence, conn, database=DB, timeout=5))
    assert not result.fenced
    assert result.reachable  # the server answered: never "unreachable", or a caller would promote beside it
    assert "password authentication failed" in result.detail
    assert "not-the-password" not in result.detail


def test_fence_command_exit_status_output_and_timeout() -> None:
    reads_env = [sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ['X'] == '1' else 1)"]
    ok = _run(partial(run_fence_command, reads_env, env={"X": "1"}, timeout=10))
    assert ok.fenced, ok
    assert ok.how == "command"
    assert ok.lsn is None

    failing = [sys.executable, "-c", "import sys; sys.stderr.write('cannot reach host\\n'); sys.exit(3)"]
    bad = _run(partial(run_fence_command, failing, env={}, timeout=10))
    assert not bad.fenced
    assert bad.reachable  # a failed hook never counts as "unreachable": the caller must not just wait
    assert "status 3" in bad.detail
    assert "cannot reach host" in bad.detail

    started = time.monotonic()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    hung = _run(partial(run_fence_command, sleeper, env={}, timeout=0.5))
    assert not hung.fenced
    assert "did not finish" in hung.detail
    assert time.monotonic() - started < 30  # killed, not waited for

    missing = _run(partial(run_fence_command, ["/nonexistent/fence"], env={}, timeout=5))
    assert not missing.fenced
    assert "could not be started" in missing.detail


# ------------------------------------------------------------------------------------ catch-up, refusals


def test_wait_caught_up_reaches_the_primary_lsn_and_times_out_on_an_impossible_one(pair: Pair) -> None:
    pair.primary.psql(
        DB, "CREATE TABLE IF NOT EXISTS catchup(x int); INSERT INTO catchup SELECT generate_series(1, 1000)"
    )
    target = int(pair.primary.psql(DB, "SELECT pg_current_wal_lsn() - '0/0'"))
    standby = pair.connection(pair.standby)
    received, replayed = _run(partial(wait_caught_up, standby, database=DB, timeout=30, at_least_lsn=target))
    assert replayed is not None
    assert replayed >= target
    assert received is not None
    assert pair.standby.psql(DB, "SELECT count(*) FROM catchup") == pair.primary.psql(
        DB, "SELECT count(*) FROM catchup"
    )

    with pytest.raises(DRError, match="not caught up after"):
        _run(partial(wait_caught_up, standby, database=DB, timeout=0.5, at_least_lsn=target + 10**12))


def test_promote_refuses_when_the_standby_cannot_catch_up_and_leaves_it_a_standby(pair: Pair) -> None:
    standby = pair.connection(pair.standby)
    far = int(pair.primary.psql(DB, "SELECT pg_current_wal_lsn() - '0/0'")) + 10**12
    with pytest.raises(DRError, match="not caught up"):
        _run(partial(promote, standby, database=DB, catchup_timeout=0.5, promote_timeout=5, at_least_lsn=far))
    assert pair.standby.in_recovery()


def test_rejoin_without_wal_log_hints_or_checksums_is_refused_clearly() -> None:
    with start_pair(extra_conf={"wal_log_hints": "off"}) as pair:
        old, dr = pair.connection(pair.primary), pair.connection(pair.standby)
        _run(partial(promote, dr, database=DB, catchup_timeout=30, promote_timeout=30))
        with pytest.raises(DRError, match="cannot be rewound: it has neither wal_log_hints = on nor data checksums"):
            _run(
                partial(rejoin, pgdata=pair.primary.data_dir, local=old, new_primary=dr, pg_bin_dir=PG_BIN, timeout=30)
            )
        assert pair.primary.is_running()  # refused before stopping anything


def test_rejoin_refusals_touch_nothing(pair: Pair, tmp_path: Path) -> None:
    primary, standby = pair.connection(pair.primary), pair.connection(pair.standby)
    with pytest.raises(DRError, match="not a PostgreSQL data directory"):
        _run(partial(rejoin, pgdata=tmp_path, local=primary, new_primary=standby, pg_bin_dir=PG_BIN, timeout=10))
    with pytest.raises(DRError, match="still in recovery"):
        _run(
            partial(
                rejoin, pgdata=pair.primary.data_dir, local=primary, new_primary=standby, pg_bin_dir=PG_BIN, timeout=10
            )
        )
    with pytest.raises(DRError, match="IS the new primary"):
        _run(
            partial(
                rejoin, pgdata=pair.primary.data_dir, local=primary, new_primary=primary, pg_bin_dir=PG_BIN, timeout=10
            )
        )
    assert pair.primary.is_running()
    assert not pair.primary.in_recovery()
    pair.wait_streaming(pair.standby)


# ------------------------------------------------------------------------- failover, rejoin, switchover


class SequenceWriter:
    """Inserts 1, 2, 3… into ``seq`` on one server as fast as it acknowledges, in its own thread; records
    which numbers were acknowledged (committed with synchronous_commit = on)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.acked: list[int] = []
        self.refusals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: anyio.run(self._loop), daemon=True)

    def __enter__(self) -> SequenceWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    async def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                async with self.conn.connect(DB) as session:
                    while not self._stop.is_set():
                        try:
                            await session.execute("INSERT INTO seq VALUES ($1)", n + 1)
                        except asyncpg.ReadOnlySQLTransactionError:
                            self.refusals += 1
                            await anyio.sleep(0.01)
                            continue
                        n += 1
                        self.acked.append(n)
            except Exception:  # noqa: BLE001 - terminated by the fence, or the server stopped: reconnect
                self.refusals += 1
                await anyio.sleep(0.02)


def _rows(node: Node, table: str) -> set[int]:
    return {int(x) for x in node.psql(DB, f"SELECT x FROM {table}").split()}


def test_failover_rejoin_and_zero_loss_switchover_back() -> None:
    with start_pair() as pair:
        old, dr = pair.primary, pair.standby
        old_conn, dr_conn = pair.connection(old), pair.connection(dr)
        old.psql(DB, "CREATE TABLE t(x int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)")
        old.psql(DB, "CREATE TABLE seq(x int PRIMARY KEY)")
        pair.wait_replayed(dr, old.psql(DB, "SELECT pg_current_wal_lsn()"))

        # A standby fenced by mistake must still be promotable (promote lifts the fence).
        assert _run(partial(fence, dr_conn, database=DB, timeout=10)).fenced
        # Failover: the DR side is promoted while the old primary still runs and takes a write the DR side
        # never sees (the divergence pg_rewind must undo); then the old primary dies.
        first = _run(partial(promote, dr_conn, database=DB, catchup_timeout=30, promote_timeout=30))
        assert isinstance(first, PromoteResult)
        assert first.timeline == 2
        assert not dr.in_recovery()
        old.psql(DB, "INSERT INTO t VALUES (-1)")  # lost by design: written to the fenced-off side
        pair.crash(old)
        assert _write_error(pair, dr) == ""
        dr.psql(DB, "INSERT INTO t VALUES (1001)")

        again = _run(partial(promote, dr_conn, database=DB, catchup_timeout=5, promote_timeout=5))
        assert again.timeline == first.timeline  # idempotent: no second promotion
        assert again.promoted_lsn == first.promoted_lsn

        # Rejoin the crashed old primary as a standby of the DR side.
        joined = _run(
            partial(
                rejoin,
                pgdata=old.data_dir,
                local=old_conn,
                new_primary=dr_conn,
                pg_bin_dir=PG_BIN,
                timeout=120,
                log_file=old.log_file,
            )
        )
        assert isinstance(joined, RejoinResult)
        assert joined.rewound, joined.detail
        assert joined.streaming
        assert joined.timeline == 2
        assert old.in_recovery()
        auto_conf = (old.data_dir / "postgresql.auto.conf").read_text()
        assert pair.primary.superuser_password not in auto_conf
        assert f"port = {old.port}" in (old.data_dir / "postgresql.conf").read_text()  # its own config back
        dr.psql(DB, "INSERT INTO t VALUES (1002)")
        pair.wait_replayed(old, dr.psql(DB, "SELECT pg_current_wal_lsn()"))
        rows = _rows(old, "t")
        assert {1001, 1002} <= rows
        assert -1 not in rows  # rewound away

        # Rejoining again is a no-op on a streaming standby.
        noop = _run(
            partial(rejoin, pgdata=old.data_dir, local=old_conn, new_primary=dr_conn, pg_bin_dir=PG_BIN, timeout=60)
        )
        assert not noop.rewound
        assert not noop.stopped_local

        # Zero-loss switchover back while a writer hammers the DR side.
        with SequenceWriter(dr_conn) as writer:
            deadline = time.monotonic() + 30
            while len(writer.acked) < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            fenced = _run(partial(fence, dr_conn, database=DB, timeout=10))
            assert fenced.fenced, fenced.detail
            assert fenced.lsn is not None
            back = _run(
                partial(promote, old_conn, database=DB, catchup_timeout=30, promote_timeout=30, at_least_lsn=fenced.lsn)
            )
            time.sleep(0.2)  # the writer keeps trying the fenced side: refused
        assert back.timeline == 3
        assert back.replay_lsn is not None
        assert back.replay_lsn >= fenced.lsn
        acked = set(writer.acked)
        assert len(acked) >= 200
        assert writer.refusals > 0
        assert acked <= _rows(old, "seq")  # no acknowledged write lost
        assert _rows(old, "seq") == _rows(dr, "seq")  # and the fenced side took nothing more

        rejoined = _run(
            partial(
                rejoin,
                pgdata=dr.data_dir,
                local=dr_conn,
                new_primary=old_conn,
                pg_bin_dir=PG_BIN,
                timeout=120,
            )
        )
        assert (dr.data_dir / "log" / "kybdr-rejoin-start.log").exists()  # pg_ctl start -l by default
        assert rejoined.streaming
        assert rejoined.timeline == 3
        assert dr.psql(DB, "SHOW default_transaction_read_only") == "off"  # the fence went with the rejoin
        old.psql(DB, "INSERT INTO t VALUES (2001)")
        pair.wait_replayed(dr, old.psql(DB, "SELECT pg_current_wal_lsn()"))
        assert 2001 in _rows(dr, "t")
        assert _write_error(pair, old) == ""
