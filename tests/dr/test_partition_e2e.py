"""End to end: partitions between the regions, the agents and the witness never make two writable primaries.

Two agents as real processes, a real primary/standby pair, Route53/ELBv2 on moto, and a ``WriteProber`` that
tries an ordinary INSERT on each database directly (not through any cut link) every 100 ms for the whole
scenario: ``both_writable_moments()`` must stay empty, whatever the agents believe.

1. The DR agent alone is cut off: it loses the peer and the witness and, at the same moment, the primary
   (the region link is blackholed and the primary's health URL fails). It cannot tell "the primary is
   down" from "I am cut off", so it goes ``isolated`` and never fences or promotes; healed, it is steady
   again with the primary active. The primary agent still reaches its peer and the witness: it never fences.
2. The primary agent alone is cut off from its peer and the witness for longer than ``partition_timeout``
   (3 s here): it fences its own database (writes fail read-only), records the self-fence and reports
   ``fenced``. The primary region itself is healthy — its health URL answers and the witness still sees it —
   so the DR agent, which reaches everything, sees a read-only primary but a witness that vetoes, and does
   not promote. (That is the realistic reading of this partition: the application and the witness's view of
   it are intact, only the primary agent's host lost its links.)
3. Full region partition: the region link is blackholed and both peer links refuse, the primary's health URL
   fails, and the witness (reachable from both sides) no longer sees the primary healthy. The primary agent
   has no contact (no peer, no witness 2xx), so it fences itself after ``partition_timeout``; the DR agent
   cannot fence the old primary (unreachable) and promotes only after the old primary's self-fence deadline,
   then switches the record to the DR load balancer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.dr_net import WriteProber
from tests.dr_support import AgentSetup, DRWorld, dr_world, wait_until, writable
from tests.support import MotoServer

ISOLATION_WATCH_SECONDS = 10.0
NO_PROMOTION_WATCH_SECONDS = 5.0


@pytest.fixture
def world(tmp_path: Path, moto_server: MotoServer) -> Iterator[DRWorld]:
    with dr_world(tmp_path, moto_server) as world:
        yield world


def _prober(world: DRWorld) -> WriteProber:
    pair = world.pair
    return WriteProber(
        {"primary": pair.dsn(world.primary), "dr": pair.dsn(world.standby)}, password_file=pair.password_file
    )


def _start_both(world: DRWorld) -> tuple[AgentSetup, AgentSetup]:
    primary_agent = world.start("primary")
    dr = world.start("dr")
    wait_until("DR steady with the primary active", lambda: _steady(dr, "primary"), timeout=30)
    wait_until("the primary agent in contact", lambda: primary_agent.status()["state"] == "peer", timeout=30)
    return primary_agent, dr


def _steady(agent: AgentSetup, active: str) -> bool:
    status = agent.status()
    return bool(status["state"] == "steady" and status["active"] == active)


def _steps(agent: AgentSetup, kind: str, step: str) -> list[dict[str, Any]]:
    return [e for e in agent.history(kind=kind) if e.get("step") == step]


def _at(entry: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(entry["at"])


def _assert_no_split_brain(prober: WriteProber) -> None:
    moments = prober.both_writable_moments()
    assert moments == [], f"both databases accepted writes at {moments}"


def _read_only_refusals(prober: WriteProber, label: str) -> list[str]:
    return [a.error for a in prober.snapshot() if a.label == label and "read-only" in a.error]


def test_dr_agent_cut_off_from_peer_and_witness_is_isolated_and_never_promotes(world: DRWorld) -> None:
    primary_agent, dr = _start_both(world)
    with _prober(world) as prober:
        wait_until("a write on the primary", lambda: prober.accepted("primary") > 0, timeout=10)
        # The DR agent loses its peer and its witness, and with them the primary region.
        world.peer_links["dr"].set("blackhole")
        world.witness_links["dr"].set("blackhole")
        world.link.set("blackhole")
        world.health["primary"].set("fail")
        wait_until("DR isolated", lambda: dr.status()["state"] == "isolated", timeout=15)

        watch_until = time.monotonic() + ISOLATION_WATCH_SECONDS
        while time.monotonic() < watch_until:
            status = dr.status()
            assert status["state"] == "isolated", status
            assert status["operation"] is None, status
            assert world.standby.in_recovery(), "the isolated DR agent promoted its standby"
            time.sleep(0.5)
        # Well past failover_threshold: the checks failed, but no step was even intended.
        assert dr.status()["failures"] >= 3
        for kind in ("intent", "result"):
            acted = [e for e in dr.history(kind=kind) if e.get("step") in ("fence", "promote", "dns")]
            assert acted == [], acted
        assert dr.history(kind="operation") == []
        # The primary side never lost its peer or the witness: it kept its database writable.
        assert primary_agent.status()["fenced"] is False
        assert writable(world.primary)
        assert _read_only_refusals(prober, "primary") == []

        # Heal: the primary region first (so the agent sees it healthy), then the DR agent's own links.
        world.health["primary"].set("ok")
        world.link.set("pass")
        world.peer_links["dr"].set("pass")
        world.witness_links["dr"].set("pass")
        wait_until("DR steady with the primary active again", lambda: _steady(dr, "primary"), timeout=30)
        world.pair.wait_streaming(world.standby)
        accepted_before = prober.accepted("primary")
        wait_until("writes on the primary after the heal", lambda: prober.accepted("primary") > accepted_before)
    _assert_no_split_brain(prober)
    assert prober.accepted("dr") == 0
    assert world.standby.in_recovery()
    assert world.route53.target() == "primary"
    transitions = [(e["from"], e["to"]) for e in dr.history(kind="transition")]
    assert any(to == "isolated" for _, to in transitions), transitions
    assert not any(to in ("fencing", "promoting", "dns_switching") for _, to in transitions), transitions


def test_primary_agent_cut_off_from_peer_and_witness_fences_itself_and_dr_does_not_promote(world: DRWorld) -> None:
    primary_agent, dr = _start_both(world)
    with _prober(world) as prober:
        wait_until("a write on the primary", lambda: prober.accepted("primary") > 0, timeout=10)
        # Only the primary agent's host loses its way to the peer and the witness. The primary region is
        # otherwise healthy: its health URL answers, the witness sees it, the DR agent reaches everything.
        world.peer_links["primary"].set("blackhole")
        world.witness_links["primary"].set("blackhole")
        wait_until("the primary agent fenced", lambda: primary_agent.status()["fenced"] is True, timeout=20)
        wait_until("writes on the primary refused read-only", lambda: _read_only_refusals(prober, "primary"))
        assert not writable(world.primary)

        # The DR side sees the primary read-only (its checks fail) but the witness vetoes: no promotion.
        watch_until = time.monotonic() + NO_PROMOTION_WATCH_SECONDS
        while time.monotonic() < watch_until:
            status = dr.status()
            assert status["state"] in ("steady", "suspect", "confirming"), status
            assert status["operation"] is None, status
            assert world.standby.in_recovery(), "the DR agent promoted while the witness saw the primary"
            time.sleep(0.5)
    _assert_no_split_brain(prober)
    assert prober.accepted("dr") == 0
    assert world.route53.target() == "primary"

    status = primary_agent.status()
    assert status["state"] == "fenced"
    assert status["fenced"] is True
    intents = [e for e in primary_agent.history(kind="intent") if e.get("operation") == "self-fence"]
    results = [e for e in primary_agent.history(kind="result") if e.get("operation_id") == "self-fence"]
    assert intents, primary_agent.history()
    assert any(r["ok"] for r in results), results
    assert intents[0]["seq"] < results[0]["seq"]
    # It fenced for the partition (not because the peer said dr is active), and only after partition_timeout
    # without contact, as its own record says.
    since = re.search(r"no contact with the peer or a majority of witnesses since (\S+) ", intents[0]["reason"])
    assert since, intents[0]
    assert (_at(intents[0]) - datetime.fromisoformat(since.group(1))).total_seconds() >= 3.0
    for kind in ("intent", "result"):
        assert [e for e in dr.history(kind=kind) if e.get("step") in ("fence", "promote", "dns")] == []
    guards = {g["name"]: g for g in dr.status()["guards"]}
    if "witness_view" in guards:  # the DR agent reached confirming: the witness was the veto
        assert guards["witness_view"]["ok"] is False, guards

    # Heal: the primary agent is in contact again and nothing took over, so the DR agent (the one actor,
    # under the same serialisation as its fences) lifts the partition's fence: no one has to wake up.
    with _prober(world) as prober:
        world.peer_links["primary"].set("pass")
        world.witness_links["primary"].set("pass")
        wait_until("the primary takes writes again", lambda: writable(world.primary), timeout=30)
        wait_until("a write accepted on the primary", lambda: prober.accepted("primary") > 0, timeout=10)
        wait_until("the primary agent re-armed", lambda: primary_agent.status()["fenced"] is False, timeout=10)
    _assert_no_split_brain(prober)
    lifted = [op for op in dr.history(kind="operation") if op.get("operation") == "unfence"]
    assert [op["outcome"] for op in lifted] == ["succeeded"], lifted
    assert world.standby.in_recovery()
    assert world.route53.target() == "primary"


def test_full_region_partition_primary_fences_itself_then_dr_fails_over(world: DRWorld) -> None:
    primary_agent, dr = _start_both(world)
    with _prober(world) as prober:
        wait_until("a write on the primary", lambda: prober.accepted("primary") > 0, timeout=10)
        # The primary region is cut off: from the DR region (replication, probes), between the agents both
        # ways; its health URL fails and the witness, which both sides still reach, no longer sees it.
        # The peer links refuse rather than blackhole: a blackholed peer costs the DR agent's fence step the
        # whole peer-fence timeout (about 20 s here, measured) before it waits for the self-fence deadline,
        # which would hide the deadline this test is about; the region link stays blackholed, so the old
        # primary's database is unreachable only by timeout.
        world.link.set("blackhole")
        world.peer_links["dr"].set("refuse")
        world.peer_links["primary"].set("refuse")
        world.health["primary"].set("fail")
        world.witness.set("fail")

        wait_until("the primary agent fenced", lambda: primary_agent.status()["fenced"] is True, timeout=20)
        wait_until("writes on the primary refused read-only", lambda: _read_only_refusals(prober, "primary"))
        wait_until("DR writable", lambda: writable(world.standby), timeout=60)
        wait_until("writes on the DR database", lambda: prober.accepted("dr") > 0, timeout=10)
        wait_until("DNS switched", lambda: world.route53.target() == "dr", timeout=30)
        wait_until("DR steady with dr active", lambda: _steady(dr, "dr"), timeout=30)
    _assert_no_split_brain(prober)
    assert not writable(world.primary)

    # The primary fenced itself before the DR database was promoted: the DR agent could not fence it and
    # waited out its self-fence deadline.
    self_fence = [e for e in primary_agent.history(kind="result") if e.get("operation_id") == "self-fence"]
    assert self_fence, primary_agent.history()
    assert self_fence[0]["ok"] is True, self_fence
    fence_results = _steps(dr, "result", "fence")
    assert fence_results, dr.history()
    assert fence_results[0]["ok"] is False, fence_results
    assert fence_results[0]["detail"]["reachable"] is False, fence_results
    promote_intents = _steps(dr, "intent", "promote")
    promote_results = _steps(dr, "result", "promote")
    assert len(promote_intents) == 1, promote_intents
    assert [r["ok"] for r in promote_results] == [True], promote_results
    assert _at(self_fence[0]) <= _at(promote_intents[0]), (self_fence[0], promote_intents[0])
    transitions = [(e["from"], e["to"]) for e in dr.history(kind="transition")]
    assert ("confirming", "fencing") in transitions, transitions
    operations = [op for op in dr.history(kind="operation") if op.get("operation") == "failover"]
    assert len(operations) == 1, operations
    assert operations[0]["outcome"] == "succeeded"
    assert operations[0]["trigger"] == "auto"
    # It waited for the deadline it announced (the old primary's last contact + its self-fence margin).
    waits = [
        m
        for e in dr.history(kind="alert")
        if (m := re.search(r"waiting until (\S+) for its own agent to fence it", e["message"]))
    ]
    assert waits, dr.history(kind="alert")
    assert datetime.fromisoformat(waits[-1].group(1)) <= _at(promote_intents[0]), (waits[-1].group(0), promote_intents)
