"""End to end: failover, the old primary back (fenced), ``dr rejoin`` on its host, then failback with zero loss.

Two agents as real processes, a real primary/standby pair, Route53 and ELBv2 on moto (``tests.dr_support``).
The primary region dies as in ``test_failover_e2e``; the DR agent fails over. Then:

1. The old primary's host comes back and its database starts WRITABLE (it crashed before anything fenced
   it): the DR agent's split-brain watch and/or the restarted primary agent (its peer says the DR region is
   active) must fence it quickly, and a write prober over both databases shows that after that fence no
   moment ever has two databases accepting writes — through the rejoin and the failback too. The operator
   runs ``kybdr-agent dr rejoin`` with the primary agent's configuration (it rewinds the old primary into a
   standby of the new one), then ``POST /v1/disaster-recovery/failback?wait=true`` on the DR agent while a
   sequence writer commits on the DR database: the primary region is writable again, DNS points at it, the
   DR database is a standby again (the agent's own rejoin step), and every acknowledged commit is there.
2. Automatic failback: after the failover and the rejoin (of the crashed, never restarted old primary),
   ``auto-failback/enable`` lets the agent switch back by itself once the primary region has been healthy
   ``failback_threshold`` rounds.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kybdr_agent.postgres.connection import Connection
from tests.dr_net import WriteProber
from tests.dr_support import AgentSetup, DRWorld, dr_world, wait_until, writable
from tests.support import KYBDR, MotoServer

SEQ_TABLE = "failback_seq"


@pytest.fixture
def world(tmp_path: Path, moto_server: MotoServer) -> Iterator[DRWorld]:
    with dr_world(tmp_path, moto_server) as world:
        yield world


def _configure(world: DRWorld, dr: dict[str, Any] | None = None) -> None:
    """The harness's configs, except the primary agent's ``standby_dsn``: the harness routes it through
    ``world.link``, whose upstream is the PRIMARY's port, so ``dr rejoin`` on the primary host would take
    its own database for the new primary. Here it names the DR database directly."""
    world.write_configs(dr=dr, primary={"standby_dsn": world.pair.dsn(world.standby)})


def _fail_over(world: DRWorld) -> AgentSetup:
    """The primary region dies (agent killed, database crashed, health URL and witness failing); the DR agent
    fails over by itself. Returns the DR agent, steady with the DR region active."""
    world.start("primary")
    dr = world.start("dr")
    wait_until("steady on primary", lambda: dr.status()["state"] == "steady", timeout=30)
    assert dr.status()["active"] == "primary"
    world.kill("primary")
    world.pair.crash(world.primary)
    world.health["primary"].set("fail")
    world.witness.set("fail")
    wait_until("DR writable", lambda: writable(world.standby), timeout=60)
    wait_until("DNS switched to dr", lambda: world.route53.target() == "dr", timeout=30)
    wait_until("steady on dr", lambda: _steady_on(dr, "dr"), timeout=30)
    return dr


def _steady_on(agent: AgentSetup, active: str) -> bool:
    status = agent.status()
    return bool(status["state"] == "steady" and status["active"] == active)


def _rejoin_old_primary(world: DRWorld) -> dict[str, Any]:
    """``kybdr-agent --config <primary agent's config> dr rejoin`` as the operator would run it on that host."""
    done = subprocess.run(
        [*KYBDR, "--config", str(world.agents["primary"].config), "dr", "rejoin", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"dr rejoin failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["streaming"] is True, result
    world.pair.wait_streaming(world.primary)
    assert world.primary.in_recovery()
    return result


class SequenceWriter:
    """A thread committing 1, 2, 3, … into ``failback_seq`` on one database, one autocommit INSERT each;
    ``acked`` holds the numbers whose COMMIT the server acknowledged. A refused or failed insert (fenced,
    session ended, server stopped) is not acknowledged; the writer reconnects and goes on with the next."""

    def __init__(self, conn: Connection) -> None:
        self.acked: list[int] = []
        self.refused = 0
        self._conn = conn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="sequence-writer", daemon=True)

    def __enter__(self) -> SequenceWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        session: asyncpg.Connection | None = None
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                async with asyncio.timeout(2):
                    if session is None or session.is_closed():
                        session = await asyncpg.connect(**self._conn.asyncpg_kwargs("postgres"))
                    await session.execute(f"INSERT INTO {SEQ_TABLE}(n) VALUES ($1)", n)
                self.acked.append(n)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self.refused += 1
                if session is not None:
                    session.terminate()
                    session = None
                await asyncio.sleep(0.05)
        if session is not None:
            session.terminate()


def _logs(world: DRWorld) -> str:
    """Both agents' logs and the primary side's history, for a failure message."""
    parts = []
    for name, agent in world.agents.items():
        history = agent.history() if agent.daemon is not None else []
        parts.append(f"--- {name} agent log ---\n{agent.log()[-6000:]}\n--- {name} history ---\n{history}")
    return "\n".join(parts)


def _assert_stays_writable(world: DRWorld, seconds: float) -> None:
    """The primary region's database takes writes now and through the next ``seconds`` (several probe rounds
    of both agents): a fence arriving late (say, from the primary-side agent) would show here."""
    deadline = time.monotonic() + seconds
    while True:
        assert writable(world.primary), _logs(world)
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)


def _acked_present(world: DRWorld, acked: list[int]) -> list[int]:
    """The acknowledged numbers missing on the (new) primary database."""
    rows = world.primary.psql("postgres", f"SELECT n FROM {SEQ_TABLE}")
    present = {int(line) for line in rows.splitlines() if line}
    return sorted(set(acked) - present)


def test_old_primary_back_is_fenced_then_rejoin_and_failback_lose_no_acknowledged_write(world: DRWorld) -> None:
    _configure(world)
    dr = _fail_over(world)
    dsns = {"primary": world.pair.dsn(world.primary), "dr": world.pair.dsn(world.standby)}
    with WriteProber(dsns, password_file=world.pair.password_file) as prober:
        # The old primary's host comes back: its database starts writable (nothing fenced it before it died),
        # and its agent starts too. Someone must fence it, quickly.
        came_back = time.monotonic()
        world.pair.start(world.primary)
        world.start("primary")
        wait_until("old primary fenced", lambda: not writable(world.primary), timeout=15, interval=0.05)
        fenced_after = time.monotonic() - came_back
        fenced_at = time.time()
        assert world.primary.psql("postgres", "SELECT pg_is_in_recovery()") == "f"
        assert world.primary.psql("postgres", "SHOW default_transaction_read_only") == "on"
        wait_until("DR agent steady on dr again", lambda: _steady_on(dr, "dr"), timeout=15)
        assert world.route53.target() == "dr"
        # Who fenced it: the DR agent's split-brain fence operation, or the primary agent's self-fence.
        fence_ops = [op for op in dr.history(kind="operation") if op.get("operation") == "fence"]
        self_fences = [e for e in world.agents["primary"].history(kind="intent") if e.get("operation") == "self-fence"]
        assert fence_ops or self_fences, (dr.log(), world.agents["primary"].log())
        if fence_ops:
            assert fence_ops[-1]["outcome"] == "succeeded", fence_ops

        # The region heals; the operator rejoins the old primary as a standby of the new one.
        world.health["primary"].set("ok")
        world.witness.set("ok")
        rejoined = _rejoin_old_primary(world)
        assert rejoined["rewound"] is True, rejoined
        wait_until(
            "failback ready",
            lambda: dr.status()["state"] == "failback_ready",
            timeout=30,
        )

        world.standby.psql("postgres", f"CREATE TABLE {SEQ_TABLE}(n bigint PRIMARY KEY)")
        with SequenceWriter(world.pair.connection(world.standby)) as writer:
            wait_until("the writer commits", lambda: len(writer.acked) >= 50, timeout=15)
            response = dr.request("POST", "/v1/disaster-recovery/failback?wait=true", {})
            assert response.status == 200, response.body
            job = response.body["jobs"][0]
            assert job["status"] == "succeeded", f"{job}\n{_logs(world)}"
            writer.stop()
        assert writer.refused > 0  # the fence of the DR database did refuse the writer's commits
        # Zero loss: every commit the DR database acknowledged is on the new primary.
        assert writer.acked
        assert not world.primary.in_recovery()
        assert _acked_present(world, writer.acked) == []

        failback = job["result"]
        assert failback["operation"] == "failback"
        assert failback["trigger"] == "manual"
        assert failback["lost_bytes_estimate"] == 0, failback
        assert set(failback["steps"]) >= {"fence", "promote", "dns", "rejoin"}, f"{failback}\n{_logs(world)}"
        assert world.route53.target() == "primary"
        # The DR database is a standby again: the agent's own Rejoin step ran (its dr.pgdata is the standby's
        # data directory). Had it failed, the failback would carry a warning and the DR database stay fenced.
        assert failback.get("warning") is None, f"{failback}\n{_logs(world)}"
        world.pair.wait_streaming(world.standby)
        assert world.standby.in_recovery()
        # And the primary region is writable — and stays so: nothing fences the database just promoted.
        _assert_stays_writable(world, seconds=3)
        wait_until("steady on primary", lambda: _steady_on(dr, "primary"), timeout=15)
    # From the fence on (rejoin, failback), never two writable databases; before it, the window in which the
    # restarted old primary took writes is bounded by the fence above.
    moments = prober.both_writable_moments()
    print(f"old primary fenced {fenced_after:.2f} s after it came back; both writable at {len(moments)} tick(s)")
    late = [at for at in moments if at > fenced_at]
    assert late == [], late
    assert prober.accepted("primary") > 0  # the prober did reach the primary again after the failback

    failbacks = [op for op in dr.history(kind="operation") if op.get("operation") == "failback"]
    assert [op["operation_id"] for op in failbacks] == [failback["operation_id"]]


def test_auto_failback_after_rejoin(world: DRWorld) -> None:
    _configure(world)
    dr = _fail_over(world)
    world.health["primary"].set("ok")
    world.witness.set("ok")
    # The old primary was never restarted: rejoin rewinds the crashed data directory directly.
    _rejoin_old_primary(world)
    # The primary-side agent stays down here (it was killed with its region); the test above runs with it.
    assert dr.status()["auto_failback"] is False
    wait_until("failback ready", lambda: dr.status()["state"] == "failback_ready", timeout=30)
    assert writable(world.standby)  # auto-failback is off: ready, but nothing moves

    response = dr.request("POST", "/v1/disaster-recovery/auto-failback/enable")
    assert response.status == 200, response.body
    assert response.body["auto_failback"] is True
    wait_until("primary writable again", lambda: writable(world.primary), timeout=60)
    wait_until("DNS back on primary", lambda: world.route53.target() == "primary", timeout=30)
    wait_until("steady on primary", lambda: _steady_on(dr, "primary"), timeout=60)
    world.pair.wait_streaming(world.standby)
    assert world.standby.in_recovery()
    _assert_stays_writable(world, seconds=3)

    failbacks = [op for op in dr.history(kind="operation") if op.get("operation") == "failback"]
    assert len(failbacks) == 1, failbacks
    assert failbacks[0]["outcome"] == "succeeded", failbacks
    assert failbacks[0]["trigger"] == "auto"
    transitions = [(e["from"], e["to"]) for e in dr.history(kind="transition")]
    assert ("failback_ready", "switching_back") in transitions, transitions
