"""End to end: ``kill -9`` of the DR agent in the middle of a failover; the restarted agent neither repeats
nor loses the step it was in.

The primary region dies (database crashed, agent killed, health URL and witness failing) and the DR agent
starts an automatic failover. We kill it with SIGKILL at a chosen point and start it again on the same
configuration and state directory:

1. During the fence step, made slow and observable with ``dr.fence_command`` (a script that leaves a mark,
   sleeps 4 s and succeeds). The fence's intent is on disk before the kill and its result is not; the
   restarted agent resumes the operation at the fence (the step is idempotent: the hook runs again, and
   that second run is the one whose result is recorded), then promotes exactly once (timeline 2, one
   promote result) and switches DNS.
2. After the promotion, during the DNS step, made to hang by blackholing the DR agent's way to the AWS
   endpoint (a proxy in front of moto). The promotion's result and the DNS intent are on disk; the
   restarted agent sees the standby already promoted and does not promote again (still timeline 2, still
   one promote result), and finishes the DNS switch once the endpoint answers again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.dr_net import TcpProxy
from tests.dr_support import AgentSetup, DRWorld, dr_world, wait_until, writable
from tests.support import MotoServer

FENCE_SLEEP_SECONDS = 4


@pytest.fixture
def world(tmp_path: Path, moto_server: MotoServer) -> Iterator[DRWorld]:
    with dr_world(tmp_path, moto_server) as world:
        yield world


def _steady(agent: AgentSetup, active: str) -> bool:
    status = agent.status()
    return bool(status["state"] == "steady" and status["active"] == active)


def _on_disk_history(agent: AgentSetup) -> list[dict[str, Any]]:
    """The DR history as the killed agent left it on disk (``backup_dir/dr/history.jsonl``)."""
    path = agent.state_dir / "dr" / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _entries(history: list[dict[str, Any]], kind: str, step: str) -> list[dict[str, Any]]:
    return [e for e in history if e.get("kind") == kind and e.get("step") == step]


def _timeline(world: DRWorld) -> tuple[int, int]:
    """The standby's timeline, from its control file after a checkpoint and from its current WAL file name."""
    standby = world.standby
    standby.psql("postgres", "CHECKPOINT")
    checkpoint = int(standby.psql("postgres", "SELECT timeline_id FROM pg_control_checkpoint()"))
    wal_file = standby.psql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())")
    return checkpoint, int(wal_file[:8], 16)


def _primary_region_dies(world: DRWorld) -> None:
    world.kill("primary")
    world.pair.crash(world.primary)
    world.health["primary"].set("fail")
    world.witness.set("fail")


def _assert_one_failover(dr: AgentSetup, world: DRWorld) -> list[dict[str, Any]]:
    """After the restart: one promotion, one successful failover, and the standby on timeline 2."""
    assert _timeline(world) == (2, 2), "the standby was promoted more than once (or not at all)"
    history = dr.history()
    promote_results = _entries(history, "result", "promote")
    assert [r["ok"] for r in promote_results] == [True], promote_results
    assert len(_entries(history, "intent", "promote")) == 1, _entries(history, "intent", "promote")
    operations = [e for e in history if e.get("kind") == "operation" and e.get("operation") == "failover"]
    assert len(operations) == 1, operations
    assert operations[0]["outcome"] == "succeeded", operations[0]
    assert set(operations[0]["steps"]) >= {"promote", "dns"}, operations[0]
    return history


def test_kill9_during_the_fence_step_resumes_it_and_promotes_once(world: DRWorld, tmp_path: Path) -> None:
    marks = tmp_path / "fence-runs"
    hook = tmp_path / "slow-fence.sh"
    hook.write_text(f'#!/bin/sh\necho "$$ $KYBDR_FENCE_REGION" >> "{marks}"\nsleep {FENCE_SLEEP_SECONDS}\nexit 0\n')
    os.chmod(hook, 0o755)  # noqa: S103 - the agent (same user) executes it; nothing secret in it
    world.write_configs(dr={"fence_command": [str(hook)]})
    world.start("primary")
    dr = world.start("dr")
    wait_until("DR steady with the primary active", lambda: _steady(dr, "primary"), timeout=30)

    _primary_region_dies(world)
    wait_until("the fence hook running", marks.exists, timeout=30)
    world.kill("dr")

    on_disk = _on_disk_history(world.agents["dr"])
    fence_intents = _entries(on_disk, "intent", "fence")
    assert len(fence_intents) == 1, on_disk
    operation_id = fence_intents[0]["operation_id"]
    assert _entries(on_disk, "result", "fence") == [], "the fence finished before the kill: nothing was interrupted"
    assert not [e for e in on_disk if e.get("step") in ("promote", "dns")], on_disk
    assert world.standby.in_recovery()
    killed_at_seq = on_disk[-1]["seq"]

    dr = world.start("dr")
    wait_until("DR writable", lambda: writable(world.standby), timeout=60)
    wait_until("DNS switched", lambda: world.route53.target() == "dr", timeout=30)
    wait_until("DR steady with dr active", lambda: _steady(dr, "dr"), timeout=30)

    history = _assert_one_failover(dr, world)
    operation = next(e for e in history if e.get("kind") == "operation")
    assert "fence" in operation["steps"], operation
    assert history[: len(on_disk)] == on_disk, "the history written before the kill did not survive the restart"
    after = [e for e in history if e["seq"] > killed_at_seq]
    # The same operation, resumed at the step it was in: fence again (idempotent), then promote and DNS.
    steps_after = [(e["kind"], e["step"]) for e in after if e.get("kind") in ("intent", "result")]
    assert steps_after == [
        ("intent", "fence"),
        ("result", "fence"),
        ("intent", "promote"),
        ("result", "promote"),
        ("intent", "dns"),
        ("result", "dns"),
    ], steps_after
    assert {e["operation_id"] for e in after if e.get("kind") in ("intent", "result")} == {operation_id}
    resumed_fence = _entries(after, "result", "fence")[0]
    assert resumed_fence["ok"] is True, resumed_fence
    assert resumed_fence["detail"]["how"] == "fence_command", resumed_fence
    # The hook ran once before the kill and once for the resumed step.
    assert len(marks.read_text().splitlines()) == 2, marks.read_text()
    world.standby.psql("postgres", "CREATE TABLE after_failover(x int); INSERT INTO after_failover VALUES (1)")


def test_kill9_after_promotion_before_dns_does_not_promote_again(world: DRWorld, moto_server: MotoServer) -> None:
    endpoint = urlsplit(moto_server.endpoint)
    assert endpoint.hostname
    assert endpoint.port
    with TcpProxy(endpoint.hostname, endpoint.port) as aws_link:
        world.write_configs(dr={"aws_endpoint_url": f"http://127.0.0.1:{aws_link.port}"})
        world.start("primary")
        dr = world.start("dr")
        wait_until("DR steady with the primary active", lambda: _steady(dr, "primary"), timeout=30)

        # The DR agent's AWS control plane hangs: promotion goes through, the DNS step cannot finish.
        aws_link.set("blackhole")
        _primary_region_dies(world)
        wait_until("DR promoted", lambda: writable(world.standby), timeout=60)
        wait_until("the DNS step under way", lambda: _entries(dr.history(), "intent", "dns"), timeout=30)
        world.kill("dr")

        on_disk = _on_disk_history(world.agents["dr"])
        assert [r["ok"] for r in _entries(on_disk, "result", "promote")] == [True], on_disk
        assert len(_entries(on_disk, "intent", "dns")) == 1, on_disk
        assert _entries(on_disk, "result", "dns") == [], "the DNS step finished before the kill"
        assert not [e for e in on_disk if e.get("kind") == "operation"], on_disk
        assert world.route53.target() == "primary"
        killed_at_seq = on_disk[-1]["seq"]

        aws_link.set("refuse")  # cut the request the killed agent left hanging, then let new ones through
        aws_link.set("pass")
        dr = world.start("dr")
        wait_until("DNS switched", lambda: world.route53.target() == "dr", timeout=30)
        wait_until("DR steady with dr active", lambda: _steady(dr, "dr"), timeout=30)

    history = _assert_one_failover(dr, world)
    assert history[: len(on_disk)] == on_disk
    after = [e for e in history if e["seq"] > killed_at_seq]
    steps_after = [(e["kind"], e["step"]) for e in after if e.get("kind") in ("intent", "result")]
    assert steps_after == [("intent", "dns"), ("result", "dns")], steps_after
    assert _entries(after, "result", "dns")[0]["ok"] is True
