"""DR probes (issue 9, item 1) against real parts: a PostgreSQL primary with a streaming standby, scripted
HTTP servers for the health URLs, witnesses and the peer, and a TCP proxy that blackholes or cuts links.

What matters most here is the bound: a probe of a target that accepts and never answers (a hung health
URL, a blackholed database port) must come back unreachable within its timeout, TCP connect included, and
a round of probes must take about as long as its slowest probe, not the sum. Timing checks are loose
(several times the timeout) so a busy machine cannot fail them; a hang would fail them by far.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import aiohttp
import anyio
import pytest

from kybdr_agent.dr.observations import DbProbe, Observations, PeerProbe
from kybdr_agent.dr.probes import PEER_PATH, Prober, ProbeTargets, probe_db, probe_http, probe_peer
from kybdr_agent.postgres.cluster import free_port
from kybdr_agent.postgres.connection import Connection
from tests.dr_cluster import Pair, start_pair
from tests.dr_net import ScriptedHttpServer, TcpProxy, WriteProber

T = TypeVar("T")
TIMEOUT = 1.0
# Loose: a bounded probe takes TIMEOUT plus scheduling noise; an unbounded one would take far longer.
BOUND = 3 * TIMEOUT
FIXED_NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
PEER_VIEW = {"role": "primary", "db_reachable": True, "db_writable": True, "fenced": False, "active": "primary"}


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with start_pair() as started:
        yield started


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return anyio.run(main)


def timed(make: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    started = time.monotonic()
    result = run(make)
    return result, time.monotonic() - started


def http(make: Callable[[aiohttp.ClientSession], Awaitable[T]]) -> tuple[T, float]:
    async def with_session() -> T:
        async with aiohttp.ClientSession() as session:
            return await make(session)

    return timed(with_session)


# --- databases ------------------------------------------------------------------------------------------


def test_primary_probe_reports_a_writable_server_on_its_wal_timeline(pair: Pair) -> None:
    probe = run(lambda: probe_db("primary", pair.connection(pair.primary), TIMEOUT, "postgres"))
    assert probe.reachable, probe.error
    assert probe.in_recovery is False
    assert probe.read_only is False
    assert probe.writable
    assert probe.timeline == 1
    assert isinstance(probe.current_lsn, int)
    assert probe.current_lsn > 0
    assert (probe.receive_lsn, probe.replay_lsn, probe.last_receipt, probe.streaming) == (None, None, None, None)
    assert probe.latency_s is not None
    assert probe.error == ""


def test_standby_probe_reports_streaming_lsns_and_a_recent_receipt(pair: Pair) -> None:
    written = pair.primary.psql("postgres", "CREATE TABLE IF NOT EXISTS t_probe(x int); SELECT pg_current_wal_lsn()")
    pair.wait_replayed(pair.standby, written)
    primary = run(lambda: probe_db("primary", pair.connection(pair.primary), TIMEOUT, "postgres"))
    probe = run(lambda: probe_db("dr", pair.connection(pair.standby), TIMEOUT, "postgres"))
    assert probe.reachable, probe.error
    assert probe.region == "dr"
    assert probe.in_recovery is True
    assert not probe.writable
    assert probe.streaming is True
    assert probe.timeline == primary.timeline == 1
    assert probe.current_lsn is None
    assert isinstance(probe.receive_lsn, int)
    assert isinstance(probe.replay_lsn, int)
    hi, lo = written.split("/")
    assert probe.replay_lsn >= (int(hi, 16) << 32) + int(lo, 16)
    assert probe.receive_lsn >= probe.replay_lsn
    assert primary.current_lsn is not None
    assert probe.receive_lsn <= primary.current_lsn
    assert probe.last_receipt is not None
    assert probe.last_receipt.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - probe.last_receipt) < timedelta(seconds=60)


def test_a_database_fenced_read_only_is_reachable_but_not_writable(pair: Pair) -> None:
    # default_transaction_read_only set on one database only, so the shared pair is not fenced for others.
    pair.primary.psql("postgres", "CREATE DATABASE fenced_db")
    pair.primary.psql("postgres", "ALTER DATABASE fenced_db SET default_transaction_read_only = on")
    probe = run(lambda: probe_db("primary", pair.connection(pair.primary), TIMEOUT, "fenced_db"))
    assert probe.reachable, probe.error
    assert probe.in_recovery is False
    assert probe.read_only is True
    assert not probe.writable


def test_a_blackholed_database_is_unreachable_within_the_timeout(pair: Pair) -> None:
    with TcpProxy("127.0.0.1", pair.primary.port) as proxy:
        conn = pair.connection(pair.primary, port=proxy.port, connect_timeout=60)  # the probe's bound wins
        assert run(lambda: probe_db("primary", conn, TIMEOUT, "postgres")).reachable
        proxy.set("blackhole")
        probe, elapsed = timed(lambda: probe_db("primary", conn, TIMEOUT, "postgres"))
        assert not probe.reachable
        assert elapsed < BOUND
        assert "timed out" in probe.error
        assert pair.primary.superuser_password not in probe.error
        proxy.set("delay", delay_ms=int(TIMEOUT * 400))  # a few round trips at 0.4 s each: over the bound
        probe, elapsed = timed(lambda: probe_db("primary", conn, TIMEOUT, "postgres"))
        assert not probe.reachable
        assert elapsed < BOUND
        proxy.set("refuse")
        probe, elapsed = timed(lambda: probe_db("primary", conn, TIMEOUT, "postgres"))
        assert not probe.reachable
        assert elapsed < BOUND
        assert probe.error.startswith("connect")
        proxy.set("pass")
        assert run(lambda: probe_db("primary", conn, TIMEOUT, "postgres")).reachable


def test_a_slow_link_is_bounded_whichever_step_it_stalls(pair: Pair) -> None:
    # Per-chunk delays that make the deadline fall in the connect handshake or in the query: either way
    # the probe returns within the bound (a timed-out session is dropped, never politely closed).
    with TcpProxy("127.0.0.1", pair.primary.port) as proxy:
        conn = pair.connection(pair.primary, port=proxy.port, connect_timeout=60)
        for delay_ms in (90, 160):
            proxy.set("delay", delay_ms=delay_ms)
            probe, elapsed = timed(lambda: probe_db("primary", conn, TIMEOUT, "postgres"))
            assert elapsed < BOUND, (delay_ms, probe)


def test_a_pg_monitor_role_is_enough_to_probe(pair: Pair) -> None:
    password = pair.primary.superuser_password
    pair.primary.psql("postgres", f"CREATE ROLE dr_probe LOGIN PASSWORD '{password}' IN ROLE pg_monitor")
    pair.wait_replayed(pair.standby, pair.primary.psql("postgres", "SELECT pg_current_wal_lsn()"))
    for region, node in (("primary", pair.primary), ("dr", pair.standby)):
        dsn = f"host=127.0.0.1 port={node.port} user=dr_probe"
        conn = Connection.from_settings(dsn, pair.password_file, None, 5)
        probe = run(lambda conn=conn, region=region: probe_db(region, conn, TIMEOUT, "postgres"))  # type: ignore[misc]
        assert probe.reachable, probe.error
        assert probe.timeline == 1
        if region == "dr":
            assert probe.streaming is True
            assert probe.last_receipt is not None


def test_wrong_password_and_closed_port_are_unreachable_without_the_password(pair: Pair, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    bad = Connection.from_settings(pair.dsn(pair.primary), wrong, None, 5)
    probe = run(lambda: probe_db("primary", bad, TIMEOUT, "postgres"))
    assert not probe.reachable
    assert "password authentication failed" in probe.error
    assert "not-the-password" not in probe.error
    closed = pair.connection(pair.primary, port=free_port())
    probe = run(lambda: probe_db("dr", closed, TIMEOUT, "postgres"))
    assert not probe.reachable
    assert probe.error.startswith("connect")
    assert pair.primary.superuser_password not in probe.error


def test_timelines_after_the_primary_dies_and_the_standby_is_promoted() -> None:
    # Its own pair: this one is destroyed. The standby without a WAL receiver still reports its timeline
    # (from its control file), and the promoted server reports the new timeline at once (from its WAL
    # file name), before any checkpoint could have recorded it.
    with start_pair() as own:
        standby = own.connection(own.standby)
        own.crash(own.primary)
        probe = run(lambda: probe_db("primary", own.connection(own.primary), TIMEOUT, "postgres"))
        assert not probe.reachable
        deadline = time.monotonic() + 30
        orphan: DbProbe | None = None
        while time.monotonic() < deadline:
            orphan = run(lambda: probe_db("dr", standby, TIMEOUT, "postgres"))
            if orphan.streaming is False:
                break
            time.sleep(0.1)
        assert orphan is not None
        assert orphan.reachable, orphan.error
        assert orphan.in_recovery is True
        assert orphan.streaming is False
        assert orphan.timeline == 1
        assert orphan.replay_lsn is not None
        own.standby.psql("postgres", "SELECT pg_promote(true, 30)")
        promoted = run(lambda: probe_db("dr", standby, TIMEOUT, "postgres"))
        assert promoted.reachable, promoted.error
        assert promoted.in_recovery is False
        assert promoted.writable
        assert promoted.timeline == 2
        assert promoted.current_lsn is not None
        assert promoted.current_lsn >= orphan.replay_lsn
        assert (promoted.receive_lsn, promoted.replay_lsn, promoted.streaming) == (None, None, None)


# --- health URLs, witnesses, the peer -------------------------------------------------------------------


def test_health_url_ok_fail_hang_down() -> None:
    with ScriptedHttpServer() as server:
        probe, _ = http(lambda s: probe_http(s, "primary", server.url + "/health", TIMEOUT))
        assert (probe.reachable, probe.ok, probe.status, probe.error) == (True, True, 200, "")
        assert probe.latency_s is not None
        server.set("fail")
        probe, _ = http(lambda s: probe_http(s, "primary", server.url + "/health", TIMEOUT))
        assert (probe.reachable, probe.ok, probe.status) == (True, False, 503)
        server.set("hang")
        probe, elapsed = http(lambda s: probe_http(s, "primary", server.url + "/health", TIMEOUT))
        assert (probe.reachable, probe.ok, probe.status) == (False, False, None)
        assert probe.error == "timed out"
        assert elapsed < BOUND
        server.set("down")
        probe, elapsed = http(lambda s: probe_http(s, "primary", server.url + "/health", TIMEOUT))
        assert (probe.reachable, probe.ok) == (False, False)
        assert "refused" in probe.error.lower()
        server.set("ok")
        probe, _ = http(lambda s: probe_http(s, "primary", server.url + "/health", TIMEOUT))
        assert probe.ok
        assert server.requests["/health"] == 4  # the down one never arrived


def test_health_url_behind_a_blackhole_is_bounded_including_connect() -> None:
    with ScriptedHttpServer() as server, TcpProxy("127.0.0.1", server.port, mode="blackhole") as proxy:
        probe, elapsed = http(lambda s: probe_http(s, "dr", f"http://127.0.0.1:{proxy.port}/", TIMEOUT))
        assert not probe.reachable
        assert elapsed < BOUND
        assert server.total_requests == 0


def test_peer_view_with_and_without_a_valid_token() -> None:
    with ScriptedHttpServer(token="s3cret-token") as peer:
        peer.set_path(PEER_PATH, json_body=PEER_VIEW)
        probe, _ = http(lambda s: probe_peer(s, peer.url, "s3cret-token", TIMEOUT))
        assert probe == PeerProbe(
            reachable=True, role="primary", db_reachable=True, db_writable=True, fenced=False, active="primary"
        )
        assert peer.last_headers["authorization"] == "Bearer s3cret-token"
        # A wrong or missing token: the peer answered (the path works) but gave no view.
        for token in ("wrong-token", None):
            probe, _ = http(lambda s, token=token: probe_peer(s, peer.url + "/", token, TIMEOUT))
            assert probe.reachable
            assert (probe.role, probe.db_reachable, probe.active) == (None, None, None)
            assert "401" in probe.error
            assert "s3cret" not in probe.error
            assert "wrong-token" not in probe.error
        peer.set_path(PEER_PATH, json_body={**PEER_VIEW, "active": "mars"})
        probe, _ = http(lambda s: probe_peer(s, peer.url, "s3cret-token", TIMEOUT))
        assert probe.reachable
        assert probe.role is None
        assert "not a valid view" in probe.error
        peer.set_path(PEER_PATH, body=b"<html>not json</html>")
        probe, _ = http(lambda s: probe_peer(s, peer.url, "s3cret-token", TIMEOUT))
        assert (probe.reachable, probe.role) == (True, None)
        peer.set("hang")
        probe, elapsed = http(lambda s: probe_peer(s, peer.url, "s3cret-token", TIMEOUT))
        assert not probe.reachable
        assert elapsed < BOUND
        peer.set("down")
        probe, _ = http(lambda s: probe_peer(s, peer.url, "s3cret-token", TIMEOUT))
        assert not probe.reachable
        assert "s3cret" not in probe.error


# --- a whole round --------------------------------------------------------------------------------------


def test_observe_probes_everything_at_once(pair: Pair) -> None:
    with (
        ScriptedHttpServer() as primary_health,
        ScriptedHttpServer(mode="fail") as dr_health,
        ScriptedHttpServer() as witness_ok,
        ScriptedHttpServer(mode="fail") as witness_fail,
        ScriptedHttpServer(mode="down") as witness_down,
        ScriptedHttpServer(token="tok") as peer,
    ):
        peer.set_path(PEER_PATH, json_body=PEER_VIEW)
        targets = ProbeTargets(
            health={"primary": primary_health.url + "/health", "dr": dr_health.url + "/health"},
            dbs={"primary": pair.connection(pair.primary), "dr": pair.connection(pair.standby)},
            witnesses=(witness_ok.url, witness_fail.url, witness_down.url),
            peer_url=peer.url,
            peer_token="tok",
            timeout=TIMEOUT,
        )

        async def two_rounds() -> list[Observations]:
            prober = Prober(targets, clock=lambda: FIXED_NOW)
            try:
                return [await prober.observe(), await prober.observe()]
            finally:
                await prober.aclose()

        rounds = run(two_rounds)
    for seen in rounds:
        assert seen.at == FIXED_NOW
        obs = seen.to_json()
        assert obs["health"]["primary"]["ok"] is True
        assert obs["health"]["dr"]["ok"] is False
        assert obs["health"]["dr"]["status"] == 503
        assert obs["db"]["primary"]["writable"] is True
        assert obs["db"]["dr"]["in_recovery"] is True
        assert obs["db"]["dr"]["streaming"] is True
        # Witnesses in configured order, each with its URL as target.
        assert [(w["target"], w["reachable"], w["ok"]) for w in obs["witnesses"]] == [
            (witness_ok.url, True, True),
            (witness_fail.url, True, False),
            (witness_down.url, False, False),
        ]
        assert obs["peer"]["role"] == "primary"
        assert obs["peer"]["active"] == "primary"


def test_observe_takes_the_slowest_probe_not_the_sum(pair: Pair) -> None:
    with (
        ScriptedHttpServer(mode="hang") as hung,
        TcpProxy("127.0.0.1", pair.primary.port, mode="blackhole") as proxy,
    ):
        targets = ProbeTargets(
            health={"primary": hung.url, "dr": hung.url + "/dr"},
            dbs={"primary": pair.connection(pair.primary, port=proxy.port), "dr": pair.connection(pair.standby)},
            witnesses=(hung.url + "/w1", hung.url + "/w2", hung.url + "/w3"),
            peer_url=hung.url,
            peer_token=None,
            timeout=TIMEOUT,
        )

        async def one_round() -> Observations:
            prober = Prober(targets, clock=lambda: datetime.now(UTC))
            try:
                return await prober.observe()
            finally:
                await prober.aclose()

        seen, elapsed = timed(one_round)
    # Seven probes hang for TIMEOUT each: in sequence that is 7 s; at once, about 1 s.
    assert elapsed < BOUND
    assert [h.reachable for h in seen.health.values()] == [False, False]
    assert [w.reachable for w in seen.witnesses] == [False, False, False]
    assert seen.peer.reachable is False
    assert seen.db["primary"].reachable is False
    assert seen.db["dr"].reachable is True


def test_nothing_configured_is_an_empty_round() -> None:
    targets = ProbeTargets(health={}, dbs={}, witnesses=(), peer_url=None, peer_token=None, timeout=TIMEOUT)

    async def one_round() -> Observations:
        prober = Prober(targets, clock=lambda: FIXED_NOW)
        try:
            return await prober.observe()
        finally:
            await prober.aclose()

    seen = run(one_round)
    assert seen.to_json() == {"at": FIXED_NOW.isoformat(), "health": {}, "db": {}, "witnesses": [], "peer": None}


def test_write_prober_sees_one_writer_and_catches_two(pair: Pair) -> None:
    # The split-brain instrument itself: primary and standby → only the primary accepts; the primary twice
    # (directly and through a proxy) → every tick has two accepted writes, which it must report.
    with TcpProxy("127.0.0.1", pair.primary.port) as proxy:
        dsns = {"primary": pair.dsn(pair.primary), "standby": pair.dsn(pair.standby)}
        with WriteProber(dsns, password_file=pair.password_file) as prober:
            time.sleep(0.8)
        assert prober.accepted("primary") > 0
        assert prober.accepted("standby") == 0
        assert prober.both_writable_moments() == []
        twice = {"direct": pair.dsn(pair.primary), "proxied": pair.dsn(pair.primary, port=proxy.port)}
        with WriteProber(twice, password_file=pair.password_file) as prober:
            time.sleep(0.8)
            proxy.set("blackhole")
            time.sleep(0.8)
        assert prober.both_writable_moments()
        assert any(not a.accepted and a.label == "proxied" for a in prober.snapshot())
