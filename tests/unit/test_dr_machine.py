"""The pure DR state machine (kybdr_agent/dr/machine.py): hand cases for every rule, and properties over a
virtual clock and a small model world (two databases, links, a witness, the primary-side agent, an executor)
in which no schedule of crashes, partitions, step failures and agent restarts ever leaves two writable
databases, and no flapping or WAL-still-flowing schedule ever causes a failover."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.dr.machine import (
    Action,
    Alert,
    Decision,
    Failback,
    Failover,
    Fence,
    FenceSelf,
    LastStandby,
    Operation,
    Policy,
    PrimarySideState,
    Promote,
    Record,
    Refusal,
    Rejoin,
    Resume,
    SetSwitch,
    State,
    StepResult,
    SwitchDns,
    Switches,
    Unfence,
    command,
    decide,
    decide_primary_side,
    evaluate_guards,
    initial_state,
    step_done,
)
from kybdr_agent.dr.observations import DbProbe, HttpProbe, Observations, PeerProbe, Region

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
IV = timedelta(seconds=10)
POLICY = Policy(
    failover_threshold=3,
    failback_threshold=2,
    max_lag_bytes=1000,
    max_staleness=timedelta(seconds=30),
    cooldown=timedelta(minutes=10),
    flap_budget=2,
    partition_timeout=timedelta(seconds=20),
    interval=IV,
    probe_timeout=timedelta(seconds=3),
    witnesses=1,
    peer=True,
)
AUTO = Switches(auto_failover=True, auto_failback=True)


# --- observation builders ------------------------------------------------------------------------------------


def writable_db(region: Region, lsn: int = 5000, timeline: int = 1) -> DbProbe:
    return DbProbe(region, True, in_recovery=False, read_only=False, timeline=timeline, current_lsn=lsn)


def standby_db(
    region: Region, receive: int = 5000, receipt: datetime | None = T0, timeline: int = 1, streaming: bool = True
) -> DbProbe:
    return DbProbe(
        region,
        True,
        in_recovery=True,
        read_only=False,
        timeline=timeline,
        receive_lsn=receive,
        replay_lsn=receive,
        last_receipt=receipt,
        streaming=streaming,
    )


def down_db(region: Region) -> DbProbe:
    return DbProbe(region, False, error="connection refused")


def fenced_db(region: Region, lsn: int = 5000) -> DbProbe:
    return DbProbe(region, True, in_recovery=False, read_only=True, timeline=1, current_lsn=lsn)


def http(target: str, state: str) -> HttpProbe:
    """state: ok (200), fail (503), down (no answer)."""
    if state == "down":
        return HttpProbe(target, False, False, error="timeout")
    return HttpProbe(target, True, state == "ok", status=200 if state == "ok" else 503)


def peer_probe(state: str, active: Region | None = "primary") -> PeerProbe | None:
    """state: writable, dbdown, fenced, down, none (not configured)."""
    if state == "none":
        return None
    if state == "down":
        return PeerProbe(False, error="timeout")
    return PeerProbe(
        True,
        role="primary",
        db_reachable=state != "dbdown",
        db_writable=state == "writable",
        fenced=state == "fenced",
        active=active,
    )


def world(
    at: datetime,
    *,
    primary: DbProbe | None = None,
    dr: DbProbe | None = None,
    health: str | None = "ok",
    dr_health: str | None = None,
    witness: str | None = "ok",
    peer: str = "writable",
) -> Observations:
    """A healthy primary with a streaming standby unless told otherwise."""
    hp: dict[Region, HttpProbe] = {}
    if health is not None:
        hp["primary"] = http("primary", health)
    if dr_health is not None:
        hp["dr"] = http("dr", dr_health)
    return Observations(
        at=at,
        health=hp,
        db={"primary": primary or writable_db("primary"), "dr": dr or standby_db("dr")},
        witnesses=(http("https://w1", witness),) if witness is not None else (),
        peer=peer_probe(peer),
    )


def dead_primary(at: datetime, witness: str | None = "fail", peer: str = "down", **kw: Any) -> Observations:
    return world(at, primary=down_db("primary"), health="down", witness=witness, peer=peer, **kw)


def steady_state(switches: Switches = AUTO, **kw: Any) -> State:
    """A machine that has watched a healthy primary for one round."""
    state = initial_state(switches, None)
    d = decide(state, world(T0), T0, POLICY)
    assert d.state.phase == "steady"
    return replace(d.state, **kw)


def kinds(actions: tuple[Action, ...], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def records(actions: tuple[Action, ...], kind: str) -> list[Record]:
    return [a for a in actions if isinstance(a, Record) and a.kind == kind]


def run_ticks(state: State, make: Any, n: int, start: datetime = T0, policy: Policy = POLICY) -> list[Decision]:
    out = []
    for i in range(1, n + 1):
        now = start + i * IV
        d = decide(state, make(now), now, policy)
        out.append(d)
        state = d.state
    return out


def transitions_consistent(before: State, d: Decision) -> None:
    """Every phase change is one transition record, chained from the old phase to the new one."""
    chain = records(d.actions, "transition")
    phase = before.phase
    for r in chain:
        assert r.fields["from"] == phase
        assert r.fields["to"] != phase
        phase = r.fields["to"]
    assert phase == d.state.phase


# --- start ---------------------------------------------------------------------------------------------------


def test_start_derives_active_from_postgres_not_memory() -> None:
    persisted = State(active="primary")
    state = initial_state(Switches(), persisted)
    d = decide(state, world(T0, primary=standby_db("primary"), dr=writable_db("dr")), T0, POLICY)
    assert d.state.active == "dr"
    assert d.state.phase == "steady"
    transitions_consistent(state, d)


def test_start_with_nothing_reachable_waits() -> None:
    state = initial_state(Switches(), None)
    d = decide(state, world(T0, primary=down_db("primary"), dr=down_db("dr")), T0, POLICY)
    assert d.state.phase == "starting"
    assert not kinds(d.actions, Fence)


def test_start_split_brain_fences_the_non_active_and_halts() -> None:
    state = initial_state(Switches(), State(active="primary"))
    d = decide(state, world(T0, dr=writable_db("dr")), T0, POLICY)
    assert d.state.phase == "halted"
    fences = kinds(d.actions, Fence)
    assert [f.region for f in fences] == ["dr"]
    assert any(a.severity == "critical" for a in kinds(d.actions, Alert))
    assert d.state.operation is not None
    assert d.state.operation.kind == "fence"
    assert d.state.operation.pending
    # the fence's result ends the operation but automation stays halted for a human
    done = step_done(d.state, StepResult(fences[0].operation_id, "fence", True, 0.2, {"lsn": 1}), T0, POLICY)
    assert done.state.phase == "halted"
    assert done.state.operation is None
    assert records(done.actions, "operation")[0].fields["outcome"] == "succeeded"


def test_start_none_writable_keeps_remembered_active_and_counts_failures() -> None:
    state = initial_state(AUTO, State(active="primary"))
    d = decide(state, dead_primary(T0), T0, POLICY)
    assert d.state.active == "primary"
    assert d.state.phase == "suspect"
    assert d.state.failures == 1


# --- counting failures -----------------------------------------------------------------------------------------


def test_failover_starts_exactly_at_threshold() -> None:
    state = steady_state()
    ds = run_ticks(state, dead_primary, 3)
    assert [d.state.phase for d in ds] == ["suspect", "suspect", "fencing"]
    assert not kinds(ds[0].actions, Fence)
    assert not kinds(ds[1].actions, Fence)
    fences = kinds(ds[2].actions, Fence)
    assert [f.region for f in fences] == ["primary"]
    intent = records(ds[2].actions, "intent")
    assert intent
    assert intent[0].fields["step"] == "fence"
    # intent is written before the action
    assert ds[2].actions.index(intent[0]) < ds[2].actions.index(fences[0])
    op = ds[2].state.operation
    assert op is not None
    assert op.kind == "failover"
    assert op.trigger == "auto"
    assert op.pending
    assert op.frozen["primary_lsn"] == 5000
    prev = state
    for d in ds:
        transitions_consistent(prev, d)
        prev = d.state


def test_only_consecutive_failures_count() -> None:
    state = steady_state()
    schedule = [False, False, True, False, False, True, False, False]
    now = T0
    for ok in schedule:
        now += IV
        obs = world(now) if ok else dead_primary(now)
        d = decide(state, obs, now, POLICY)
        state = d.state
        assert not kinds(d.actions, Fence)
        if ok:
            assert state.phase == "steady"
            assert state.failures == 0


def test_health_url_down_with_writable_db_counts_as_failure() -> None:
    state = steady_state()
    d = decide(state, world(T0 + IV, health="fail", witness="fail"), T0 + IV, POLICY)
    assert d.state.phase == "suspect"


# --- vetoes, confirmation, guards, switches ------------------------------------------------------------------------


def _to_confirming(state: State, make: Any) -> Decision:
    ds = run_ticks(state, make, POLICY.failover_threshold)
    return ds[-1]


def test_wal_still_arriving_vetoes() -> None:
    state = steady_state()

    def make(now: datetime) -> Observations:
        receive = 5000 + int((now - T0) / IV) * 10
        return dead_primary(now, dr=standby_db("dr", receive=receive, receipt=now))

    d = _to_confirming(state, make)
    assert d.state.phase == "confirming"
    assert not kinds(d.actions, Fence)
    assert any(g.name == "wal_progress" and not g.ok for g in d.state.guards)


def test_receipt_time_advancing_alone_vetoes() -> None:
    state = steady_state()
    d = _to_confirming(state, lambda now: dead_primary(now, dr=standby_db("dr", receipt=now)))
    assert not kinds(d.actions, Fence)


def test_witness_seeing_primary_vetoes() -> None:
    state = steady_state()
    d = _to_confirming(state, lambda now: dead_primary(now, witness="ok"))
    assert d.state.phase == "confirming"
    assert not kinds(d.actions, Fence)


def test_peer_reporting_writable_db_vetoes() -> None:
    state = steady_state()
    d = _to_confirming(state, lambda now: dead_primary(now, witness="down", peer="writable"))
    assert not kinds(d.actions, Fence)


def test_peer_reporting_db_down_confirms() -> None:
    state = steady_state()
    d = _to_confirming(state, lambda now: dead_primary(now, witness="down", peer="dbdown"))
    assert kinds(d.actions, Fence)


def test_no_second_vantage_point_means_no_failover() -> None:
    # witness unreachable, peer up but unsure about its database: nobody confirms
    state = steady_state()

    def make(now: datetime) -> Observations:
        obs = dead_primary(now, witness="down", peer="down")
        return replace(obs, peer=PeerProbe(True, role="primary"))

    d = _to_confirming(state, make)
    assert d.state.phase == "confirming"
    assert not kinds(d.actions, Fence)


def test_single_vantage_fails_over_on_own_probes_and_says_so() -> None:
    policy = replace(POLICY, witnesses=0, peer=False)
    state = initial_state(AUTO, None)
    state = decide(state, world(T0, witness=None, peer="none"), T0, policy).state
    assert state.vantage == "single"
    ds = run_ticks(state, lambda now: dead_primary(now, witness=None, peer="none"), 3, policy=policy)
    assert kinds(ds[-1].actions, Fence)
    guards = evaluate_guards(ds[1].state, dead_primary(T0, witness=None, peer="none"), T0, policy, forced=False)
    vantage = next(g for g in guards if g.name == "vantage")
    assert "single vantage point" in vantage.detail


@pytest.mark.parametrize(
    ("standby", "guard"),
    [
        (standby_db("dr", receive=3000), "lag"),
        # Stale: no receipt for 5 minutes AND behind the primary's last position (within the lag bound).
        (standby_db("dr", receive=4500, receipt=T0 - timedelta(minutes=5)), "staleness"),
        (standby_db("dr", receive=4500, receipt=None), "staleness"),
        (standby_db("dr", timeline=2), "timeline"),
        (DbProbe("dr", True, in_recovery=False, read_only=True), "standby"),
    ],
)
def test_guards_refuse_automatic_failover_and_alert_once(standby: DbProbe, guard: str) -> None:
    # "No receipt time" means replication never ran while we watched: the steady rounds saw none either.
    state = steady_state(last_standby=LastStandby(4500, None)) if standby.last_receipt is None else steady_state()
    ds = run_ticks(state, lambda now: dead_primary(now, dr=standby), 5)
    assert all(not kinds(d.actions, Fence) for d in ds)
    assert ds[2].state.phase == "confirming"
    assert any(g.name == guard and not g.ok for g in ds[2].state.guards)
    alerts = [a for d in ds for a in kinds(d.actions, Alert)]
    assert len(alerts) == 1
    assert guard in alerts[0].message


def test_disabled_and_paused_alert_once_and_say_why() -> None:
    for switches, words in ((Switches(), "disabled"), (Switches(auto_failover=True, paused=True), "paused")):
        ds = run_ticks(steady_state(switches), dead_primary, 6)
        assert all(not kinds(d.actions, Fence) for d in ds)
        alerts = [a for d in ds for a in kinds(d.actions, Alert)]
        assert len(alerts) == 1
        assert words in alerts[0].message


def test_cooldown_blocks_a_second_automatic_failover() -> None:
    state = steady_state(last_role_change=T0 - timedelta(minutes=1), role_changes=(T0 - timedelta(minutes=1),))
    ds = run_ticks(state, dead_primary, 4)
    assert all(not kinds(d.actions, Fence) for d in ds)
    assert any(g.name == "cooldown" and not g.ok for g in ds[-1].state.guards)


def test_flap_budget_halts_until_an_operator_acts() -> None:
    changes = (T0 - timedelta(minutes=50), T0 - timedelta(minutes=20))
    state = steady_state(role_changes=changes, last_role_change=changes[-1])
    ds = run_ticks(state, dead_primary, 3)
    assert ds[-1].state.phase == "halted"
    assert "flap budget" in ds[-1].state.halted_reason
    assert not kinds(ds[-1].actions, Fence)
    # halted: nothing more happens on its own
    later = run_ticks(ds[-1].state, dead_primary, 5, start=T0 + 3 * IV)
    assert all(d.state.phase == "halted" and not kinds(d.actions, Fence) for d in later)
    # Resume re-derives roles and restarts the budget
    resumed = command(later[-1].state, Resume(), T0 + 9 * IV, POLICY, None)
    assert isinstance(resumed, Decision)
    assert resumed.state.phase == "starting"
    assert resumed.state.role_changes == ()


# --- isolation -------------------------------------------------------------------------------------------------


def test_isolated_never_fails_over_and_recovers() -> None:
    state = steady_state()
    ds = run_ticks(state, lambda now: dead_primary(now, witness="down", peer="down"), 10)
    assert all(d.state.phase == "isolated" for d in ds)
    assert all(not kinds(d.actions, Fence) and not kinds(d.actions, Promote) for d in ds)
    assert len([a for d in ds for a in kinds(d.actions, Alert)]) == 1
    back = decide(ds[-1].state, world(T0 + 11 * IV), T0 + 11 * IV, POLICY)
    assert back.state.phase == "steady"
    assert back.state.failures == 0


def test_own_standby_unreachable_is_isolation() -> None:
    state = steady_state()
    d = decide(state, dead_primary(T0 + IV, dr=down_db("dr")), T0 + IV, POLICY)
    assert d.state.phase == "isolated"


# --- fencing, promotion, DNS -----------------------------------------------------------------------------------


def _failover_started(switches: Switches = AUTO) -> tuple[State, Operation, datetime]:
    ds = run_ticks(steady_state(switches), dead_primary, 3)
    op = ds[-1].state.operation
    assert op is not None
    return ds[-1].state, op, T0 + 3 * IV


def test_outstanding_step_freezes_phase() -> None:
    state, _op, now = _failover_started()
    for i in range(1, 5):
        d = decide(state, world(now + i * IV), now + i * IV, POLICY)
        assert d.state.phase == "fencing"
        assert not [a for a in d.actions if not isinstance(a, Alert)]
        state = d.state


def test_stale_results_are_ignored() -> None:
    state, op, now = _failover_started()
    assert step_done(state, StepResult("other", "fence", True, 1.0), now, POLICY).state == state
    assert step_done(state, StepResult(op.id, "promote", True, 1.0), now, POLICY).state == state


def test_fenced_then_promoted_then_dns_is_a_complete_failover() -> None:
    state, op, now = _failover_started()
    d = step_done(state, StepResult(op.id, "fence", True, 0.5, {"lsn": 5100, "reachable": True}), now, POLICY)
    assert d.state.phase == "promoting"
    assert kinds(d.actions, Promote) == [Promote(op.id, "dr", None)]
    d = step_done(
        d.state, StepResult(op.id, "promote", True, 2.0, {"promoted_lsn": 5050, "receive_lsn": 5050}), now, POLICY
    )
    assert d.state.phase == "dns_switching"
    assert kinds(d.actions, SwitchDns) == [SwitchDns(op.id, "dr")]
    assert d.state.operation is not None
    assert d.state.operation.lost_bytes_estimate == 50
    d = step_done(d.state, StepResult(op.id, "dns", True, 3.0), now + IV, POLICY)
    assert d.state.phase == "steady"
    assert d.state.active == "dr"
    assert d.state.operation is None
    assert d.state.role_changes == (now + IV,)
    assert d.state.last_role_change == now + IV
    (rec,) = records(d.actions, "operation")
    assert rec.fields["outcome"] == "succeeded"
    assert rec.fields["trigger"] == "auto"
    assert rec.fields["steps"] == {"fence": 0.5, "promote": 2.0, "dns": 3.0}
    assert rec.fields["duration_s"] == 10.0
    assert rec.fields["promoted_lsn"] == 5050
    assert rec.fields["data_loss_risk"] is False


def test_unreachable_old_primary_waits_out_its_self_fence_deadline() -> None:
    state, op, now = _failover_started()
    d = step_done(state, StepResult(op.id, "fence", False, 3.0, {"reachable": False}, "timeout"), now, POLICY)
    op2 = d.state.operation
    assert op2 is not None
    assert op2.step == "wait_self_fence"
    assert not op2.pending
    assert op2.fence_deadline == T0 + POLICY.self_fence_margin  # last contact was the healthy round at T0
    assert not kinds(d.actions, Promote)
    state = d.state
    t = now
    while t + IV < op2.fence_deadline:
        t += IV
        d = decide(state, dead_primary(t), t, POLICY)
        assert not kinds(d.actions, Promote)
        state = d.state
    t = op2.fence_deadline
    d = decide(state, dead_primary(t), t, POLICY)
    assert kinds(d.actions, Promote) == [Promote(op.id, "dr", None)]
    assert d.state.phase == "promoting"


def test_self_fence_wait_extends_while_the_old_primary_may_have_contact() -> None:
    state, op, now = _failover_started()
    d = step_done(state, StepResult(op.id, "fence", False, 3.0, {"reachable": False}), now, POLICY)
    state = d.state
    t = now
    for _ in range(10):  # the witness is unreachable: it might be answering the primary
        t += IV
        d = decide(state, dead_primary(t, witness="down"), t, POLICY)
        assert not kinds(d.actions, Promote)
        state = d.state
    assert state.operation is not None
    assert state.operation.fence_deadline == t + POLICY.self_fence_margin


def test_old_primary_answering_during_the_wait_is_fenced_again() -> None:
    state, op, now = _failover_started()
    state = step_done(state, StepResult(op.id, "fence", False, 3.0, {"reachable": False}), now, POLICY).state
    d = decide(state, world(now + IV, witness="fail"), now + IV, POLICY)
    assert kinds(d.actions, Fence) == [Fence(op.id, "primary")]
    assert d.state.operation is not None
    assert d.state.operation.step == "fence"


def test_reachable_but_unfenceable_old_primary_halts() -> None:
    state, op, now = _failover_started()
    d = step_done(state, StepResult(op.id, "fence", False, 1.0, {"reachable": True}, "permission denied"), now, POLICY)
    assert d.state.phase == "halted"
    assert not kinds(d.actions, Promote)
    assert d.state.operation is not None
    assert not d.state.operation.pending


def test_allow_unfenced_promotes_and_records_data_loss_risk() -> None:
    state = steady_state(Switches())
    now = T0 + IV
    d = command(state, Failover(force=True, allow_unfenced=True), now, POLICY, dead_primary(now))
    assert isinstance(d, Decision)
    op = d.state.operation
    assert op is not None
    assert op.allow_unfenced
    assert op.trigger == "manual"
    d = step_done(d.state, StepResult(op.id, "fence", False, 1.0, {"reachable": True}), now, POLICY)
    assert kinds(d.actions, Promote)
    assert d.state.operation is not None
    assert d.state.operation.data_loss_risk
    assert any(a.severity == "critical" for a in kinds(d.actions, Alert))


def test_promote_failure_halts_and_resume_retries_without_repeating() -> None:
    state, op, now = _failover_started()
    state = step_done(state, StepResult(op.id, "fence", True, 0.5, {"lsn": 5000}), now, POLICY).state
    d = step_done(state, StepResult(op.id, "promote", False, 60.0, error="pg_promote timed out"), now, POLICY)
    assert d.state.phase == "halted"
    assert d.state.operation is not None
    r = command(d.state, Resume(), now + IV, POLICY, None)
    assert isinstance(r, Decision)
    assert r.state.phase == "starting"
    # still a standby: promote again
    again = decide(r.state, dead_primary(now + 2 * IV), now + 2 * IV, POLICY)
    assert kinds(again.actions, Promote)
    assert not kinds(again.actions, Fence)
    # already promoted: straight to DNS
    promoted = decide(r.state, dead_primary(now + 2 * IV, dr=writable_db("dr", timeline=2)), now + 2 * IV, POLICY)
    assert kinds(promoted.actions, SwitchDns)
    assert not kinds(promoted.actions, Promote)
    assert promoted.state.phase == "dns_switching"


def test_dns_failure_halts_saying_so() -> None:
    state, op, now = _failover_started()
    state = step_done(state, StepResult(op.id, "fence", True, 0.5, {"lsn": 5000}), now, POLICY).state
    state = step_done(state, StepResult(op.id, "promote", True, 1.0, {"promoted_lsn": 5000}), now, POLICY).state
    d = step_done(state, StepResult(op.id, "dns", False, 120.0, error="throttled"), now, POLICY)
    assert d.state.phase == "halted"
    assert "database promoted but DNS not switched" in d.state.halted_reason


@pytest.mark.parametrize("step", ["fence", "promote", "dns"])
def test_restart_resumes_the_interrupted_step(step: str) -> None:
    state, op, now = _failover_started()
    if step in ("promote", "dns"):
        state = step_done(state, StepResult(op.id, "fence", True, 0.5, {"lsn": 5000}), now, POLICY).state
    if step == "dns":
        state = step_done(state, StepResult(op.id, "promote", True, 1.0, {"promoted_lsn": 5000}), now, POLICY).state
    persisted = State.from_json(json.loads(json.dumps(state.to_json())))
    restarted = initial_state(Switches(), persisted)
    assert restarted.operation is not None
    assert not restarted.operation.pending
    assert restarted.switches == AUTO  # switches as last set survive
    dr = writable_db("dr", timeline=2) if step == "dns" else standby_db("dr")
    primary = fenced_db("primary") if step != "fence" else down_db("primary")
    d = decide(
        restarted, world(now + IV, primary=primary, dr=dr, health="down", witness="fail", peer="down"), now + IV, POLICY
    )
    expected = {"fence": Fence, "promote": Promote, "dns": SwitchDns}[step]
    step_actions = [a for a in d.actions if isinstance(a, Fence | Promote | SwitchDns)]
    assert len(step_actions) == 1
    assert isinstance(step_actions[0], expected)


# --- the DR region active: split brain, failback ---------------------------------------------------------------


def dr_active_world(at: datetime, primary: DbProbe | None = None, **kw: Any) -> Observations:
    kw.setdefault("witness", "fail")
    kw.setdefault("peer", "fenced")
    return world(
        at,
        primary=primary or standby_db("primary", receive=9000, timeline=2),
        dr=writable_db("dr", lsn=9000, timeline=2),
        dr_health="ok",
        **kw,
    )


def dr_active_state(switches: Switches = AUTO) -> State:
    state = initial_state(switches, State(active="dr", switches=switches))
    d = decide(state, dr_active_world(T0, primary=fenced_db("primary")), T0, POLICY)
    assert d.state.active == "dr"
    assert d.state.phase == "steady"
    return d.state


def test_old_primary_writable_again_is_fenced() -> None:
    state = dr_active_state()
    d = decide(state, dr_active_world(T0 + IV, primary=writable_db("primary")), T0 + IV, POLICY)
    (fence,) = kinds(d.actions, Fence)
    assert fence.region == "primary"
    assert d.state.phase == "fencing"
    assert any(a.severity == "critical" for a in kinds(d.actions, Alert))
    d = step_done(d.state, StepResult(fence.operation_id, "fence", True, 0.1, {"lsn": 1}), T0 + IV, POLICY)
    assert d.state.phase == "steady"
    assert d.state.active == "dr"


def _failback_ready(switches: Switches = AUTO) -> list[Decision]:
    state = dr_active_state(switches)
    return run_ticks(state, dr_active_world, POLICY.failback_threshold)


def test_failback_readiness_counts_then_switches_back_with_zero_loss() -> None:
    ds = _failback_ready()
    assert ds[0].state.phase == "steady"
    assert ds[0].state.recoveries == 1
    d = ds[-1]
    assert d.state.phase == "switching_back"
    (fence,) = kinds(d.actions, Fence)
    assert fence.region == "dr"
    op_id = fence.operation_id
    now = T0 + 3 * IV
    d = step_done(d.state, StepResult(op_id, "fence", True, 0.3, {"lsn": 9100}), now, POLICY)
    assert kinds(d.actions, Promote) == [Promote(op_id, "primary", 9100)]
    d = step_done(d.state, StepResult(op_id, "promote", True, 1.0, {"promoted_lsn": 9100}), now, POLICY)
    assert kinds(d.actions, SwitchDns) == [SwitchDns(op_id, "primary")]
    d = step_done(d.state, StepResult(op_id, "dns", True, 2.0), now, POLICY)
    assert kinds(d.actions, Rejoin) == [Rejoin(op_id, "dr")]
    d = step_done(d.state, StepResult(op_id, "rejoin", True, 5.0), now, POLICY)
    assert d.state.phase == "steady"
    assert d.state.active == "primary"
    (rec,) = records(d.actions, "operation")
    assert rec.fields["operation"] == "failback"
    assert rec.fields["lost_bytes_estimate"] == 0


def test_failback_waits_for_caught_up_streaming_standby() -> None:
    state = dr_active_state()
    lagging = standby_db("primary", receive=1000, timeline=2)
    ds = run_ticks(state, lambda now: dr_active_world(now, primary=lagging), 5)
    assert all(d.state.phase == "steady" and d.state.recoveries == 0 for d in ds)
    not_streaming = standby_db("primary", receive=9000, timeline=2, streaming=False)
    ds = run_ticks(state, lambda now: dr_active_world(now, primary=not_streaming), 5)
    assert all(d.state.recoveries == 0 for d in ds)


def test_failback_ready_without_auto_failback_only_alerts() -> None:
    ds = _failback_ready(Switches(auto_failover=True))
    assert ds[-1].state.phase == "failback_ready"
    assert not kinds(ds[-1].actions, Fence)


def test_failback_rejoin_failure_succeeds_with_warning() -> None:
    d = _failback_ready()[-1]
    op_id = kinds(d.actions, Fence)[0].operation_id
    for step, detail in (("fence", {"lsn": 9100}), ("promote", {"promoted_lsn": 9100}), ("dns", {})):
        d = step_done(d.state, StepResult(op_id, step, True, 1.0, detail), T0, POLICY)
    d = step_done(d.state, StepResult(op_id, "rejoin", False, 1.0, error="pg_rewind failed"), T0, POLICY)
    assert d.state.phase == "steady"
    assert d.state.active == "primary"
    (rec,) = records(d.actions, "operation")
    assert rec.fields["outcome"] == "succeeded"
    assert "dr rejoin" in rec.fields["warning"]
    assert any(a.severity == "warning" for a in kinds(d.actions, Alert))


def test_failback_promote_failure_rolls_back_once_primary_is_seen_in_recovery() -> None:
    d = _failback_ready()[-1]
    op_id = kinds(d.actions, Fence)[0].operation_id
    d = step_done(d.state, StepResult(op_id, "fence", True, 1.0, {"lsn": 9100}), T0, POLICY)
    d = step_done(d.state, StepResult(op_id, "promote", False, 30.0, error="catch-up timeout"), T0, POLICY)
    assert not kinds(d.actions, Unfence)  # not before the primary is seen still a standby
    d = decide(d.state, dr_active_world(T0 + IV, primary=down_db("primary")), T0 + IV, POLICY)
    assert not kinds(d.actions, Unfence)
    d = decide(d.state, dr_active_world(T0 + 2 * IV), T0 + 2 * IV, POLICY)
    assert kinds(d.actions, Unfence) == [Unfence(op_id, "dr")]
    d = step_done(d.state, StepResult(op_id, "unfence", True, 0.1), T0 + 2 * IV, POLICY)
    assert d.state.phase == "steady"
    assert d.state.active == "dr"
    assert records(d.actions, "operation")[0].fields["outcome"] == "rolled_back"


def test_failback_promote_failure_goes_forward_if_the_primary_was_promoted_after_all() -> None:
    d = _failback_ready()[-1]
    op_id = kinds(d.actions, Fence)[0].operation_id
    d = step_done(d.state, StepResult(op_id, "fence", True, 1.0, {"lsn": 9100}), T0, POLICY)
    d = step_done(d.state, StepResult(op_id, "promote", False, 30.0, error="verify timed out"), T0, POLICY)
    obs = dr_active_world(T0 + IV, primary=writable_db("primary", lsn=9100, timeline=3))
    d = decide(d.state, replace(obs, db={**obs.db, "dr": fenced_db("dr", 9100)}), T0 + IV, POLICY)
    assert kinds(d.actions, SwitchDns) == [SwitchDns(op_id, "primary")]
    assert not kinds(d.actions, Unfence)


def test_failback_fence_failure_rolls_back() -> None:
    d = _failback_ready()[-1]
    op_id = kinds(d.actions, Fence)[0].operation_id
    d = step_done(d.state, StepResult(op_id, "fence", False, 1.0, error="verify failed"), T0, POLICY)
    assert kinds(d.actions, Unfence) == [Unfence(op_id, "dr")]
    d = step_done(d.state, StepResult(op_id, "unfence", True, 0.1), T0, POLICY)
    assert d.state.phase == "steady"
    assert d.state.active == "dr"


# --- commands --------------------------------------------------------------------------------------------------


def test_commands_are_refused_while_an_operation_runs_except_switches_and_resume() -> None:
    state, _, now = _failover_started()
    obs = dead_primary(now)
    for cmd in (Failover(), Failover(force=True), Failback()):
        r = command(state, cmd, now, POLICY, obs)
        assert isinstance(r, Refusal)
        assert r.status == 409
    d = command(state, SetSwitch("paused", True), now, POLICY, obs)
    assert isinstance(d, Decision)
    assert d.state.switches.paused
    assert records(d.actions, "switch")[0].fields == {"name": "paused", "value": True}


def test_manual_failover_needs_no_threshold_and_ignores_wal_progress() -> None:
    state = steady_state(Switches())
    now = T0 + IV
    d = command(state, Failover(reason="drill"), now, POLICY, world(now, dr=standby_db("dr", receipt=now)))
    assert isinstance(d, Decision)
    assert kinds(d.actions, Fence)
    assert d.state.phase == "fencing"
    assert d.state.operation is not None
    assert d.state.operation.reason == "drill"


def test_manual_failover_soft_guards_need_force_hard_never() -> None:
    state = steady_state(Switches())
    now = T0 + IV
    lagging = world(now, dr=standby_db("dr", receive=100))
    r = command(state, Failover(), now, POLICY, lagging)
    assert isinstance(r, Refusal)
    assert r.status == 412
    assert "lag" in r.reason
    assert r.guards
    assert isinstance(command(state, Failover(force=True), now, POLICY, lagging), Decision)
    other_tl = world(now, dr=standby_db("dr", timeline=7))
    r = command(state, Failover(force=True), now, POLICY, other_tl)
    assert isinstance(r, Refusal)
    assert r.status == 412
    assert "timeline" in r.reason


def test_manual_failover_when_isolated_needs_force() -> None:
    state = steady_state(Switches())
    now = T0 + IV
    cut_off = dead_primary(now, witness="down", peer="down", dr=standby_db("dr", receipt=T0))
    r = command(state, Failover(), now, POLICY, cut_off)
    assert isinstance(r, Refusal)
    assert r.status == 412
    assert "isolation" in r.reason
    assert isinstance(command(state, Failover(force=True), now, POLICY, cut_off), Decision)


def test_failover_when_dr_active_and_failback_when_primary_active_are_412() -> None:
    r = command(dr_active_state(), Failover(force=True), T0, POLICY, dr_active_world(T0))
    assert isinstance(r, Refusal)
    assert r.status == 412
    r = command(steady_state(), Failback(force=True), T0, POLICY, world(T0))
    assert isinstance(r, Refusal)
    assert r.status == 412


def test_manual_failback_requires_streaming_standby_and_threshold_unless_forced() -> None:
    state = dr_active_state()
    now = T0 + IV
    r = command(state, Failback(), now, POLICY, dr_active_world(now))
    assert isinstance(r, Refusal)
    assert "recoveries" in r.reason
    d = command(state, Failback(force=True), now, POLICY, dr_active_world(now))
    assert isinstance(d, Decision)
    assert d.state.phase == "switching_back"
    r = command(state, Failback(force=True), now, POLICY, dr_active_world(now, primary=fenced_db("primary")))
    assert isinstance(r, Refusal)
    assert "old_primary_standby" in r.reason


def test_resume_outside_halted_changes_nothing() -> None:
    state = steady_state()
    d = command(state, Resume(), T0, POLICY, None)
    assert isinstance(d, Decision)
    assert d.state == state
    assert d.actions == ()


# --- primary side ----------------------------------------------------------------------------------------------


def primary_obs(
    at: datetime, *, peer: str = "up", witness: str = "ok", active: Region = "primary", db: DbProbe | None = None
) -> Observations:
    p = PeerProbe(True, role="dr", active=active) if peer == "up" else PeerProbe(False)
    return Observations(
        at=at,
        db={"primary": db or writable_db("primary")},
        witnesses=(http("https://w1", witness),),
        peer=p,
    )


def test_primary_side_fences_itself_once_after_partition_timeout() -> None:
    state = PrimarySideState()
    state, actions = decide_primary_side(state, primary_obs(T0), T0, POLICY)
    assert actions == ()
    fenced_at = None
    for i in range(1, 6):
        now = T0 + i * IV
        fenced_db_now = state.fenced
        obs = primary_obs(now, peer="down", witness="fail", db=fenced_db("primary") if fenced_db_now else None)
        state, actions = decide_primary_side(state, obs, now, POLICY)
        if kinds(actions, FenceSelf):
            assert fenced_at is None, "FenceSelf is emitted once"
            fenced_at = now
    assert fenced_at == T0 + POLICY.partition_timeout
    assert state.fenced


def test_primary_side_contact_needs_a_witness_majority_answering_2xx() -> None:
    policy = replace(POLICY, witnesses=3)
    state = PrimarySideState()
    state, _ = decide_primary_side(state, primary_obs(T0), T0, policy)
    now = T0 + timedelta(minutes=5)
    obs = Observations(
        at=now,
        db={"primary": writable_db("primary")},
        witnesses=(http("a", "ok"), http("b", "fail"), http("c", "down")),
        peer=PeerProbe(False),
    )
    _, actions = decide_primary_side(state, obs, now, policy)
    assert kinds(actions, FenceSelf)
    obs = replace(obs, witnesses=(http("a", "ok"), http("b", "ok"), http("c", "down")))
    _, actions = decide_primary_side(state, obs, now, policy)
    assert not kinds(actions, FenceSelf)


def test_primary_side_fences_when_the_dr_side_is_active() -> None:
    _, actions = decide_primary_side(PrimarySideState(), primary_obs(T0, active="dr"), T0, POLICY)
    assert kinds(actions, FenceSelf)
    assert kinds(actions, Alert)


def test_primary_side_single_vantage_never_self_fences() -> None:
    policy = replace(POLICY, witnesses=0, peer=False)
    state = PrimarySideState()
    for i in range(20):
        now = T0 + i * IV
        state, actions = decide_primary_side(
            state, Observations(at=now, db={"primary": writable_db("primary")}), now, policy
        )
        assert not actions


# --- properties ------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(threshold=st.integers(1, 6), healthy=st.integers(0, 5))
def test_property_failover_exactly_at_the_nth_confirmed_failure(threshold: int, healthy: int) -> None:
    policy = replace(POLICY, failover_threshold=threshold)
    state = initial_state(AUTO, None)
    now = T0
    for _ in range(healthy + 1):
        state = decide(state, world(now, dr=standby_db("dr", receipt=now)), now, policy).state
        last_seen = now
        now += IV
    for n in range(1, threshold + 2):
        d = decide(state, dead_primary(now, dr=standby_db("dr", receipt=last_seen)), now, policy)
        started = bool(kinds(d.actions, Fence))
        assert started == (n == threshold), (n, threshold)
        state = d.state
        now += IV
        if started:
            break


def _no_run_of(n: int, rng: random.Random, length: int) -> list[bool]:
    """A random ok/fail schedule (True = ok) with no run of n consecutive failures."""
    out: list[bool] = []
    run = 0
    for _ in range(length):
        fail = rng.random() < 0.6 and run < n - 1
        out.append(not fail)
        run = run + 1 if fail else 0
    return out


def test_property_no_failover_over_thousands_of_flapping_schedules() -> None:
    rng = random.Random(9)
    for i in range(1200):
        threshold = 2 + i % 4
        policy = replace(POLICY, failover_threshold=threshold)
        state = steady_state()
        now = T0
        for ok in _no_run_of(threshold, rng, 30):
            now += IV
            d = decide(state, world(now) if ok else dead_primary(now), now, policy)
            assert not kinds(d.actions, Fence)
            state = d.state


@settings(max_examples=80, deadline=None)
@given(fails=st.lists(st.booleans(), min_size=1, max_size=40), step=st.integers(1, 5000))
def test_property_no_automatic_failover_while_standby_wal_advances(fails: list[bool], step: int) -> None:
    state = steady_state()
    lsn = 5000
    now = T0
    for fail in fails:
        now += IV
        lsn += step
        standby = standby_db("dr", receive=lsn, receipt=now)
        obs = world(now, health="fail" if fail else "ok", witness="fail", dr=standby)
        d = decide(state, obs, now, POLICY)
        assert not kinds(d.actions, Fence)
        state = d.state


@settings(max_examples=80, deadline=None)
@given(schedule=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40))
def test_property_isolated_never_acts(schedule: list[tuple[bool, bool]]) -> None:
    state = steady_state()
    now = T0
    for primary_ok, standby_up in schedule:
        now += IV
        obs = world(
            now,
            primary=None if primary_ok else down_db("primary"),
            health="ok" if primary_ok else "down",
            witness="down",
            peer="down",
            dr=None if standby_up else down_db("dr"),
        )
        d = decide(state, obs, now, POLICY)
        assert not [a for a in d.actions if isinstance(a, Fence | Promote | SwitchDns)]
        state = d.state


# --- the model world -------------------------------------------------------------------------------------------


@dataclass
class Db:
    alive: bool = True
    in_recovery: bool = False
    read_only: bool = False
    lsn: int = 1000
    timeline: int = 1
    receipt: datetime | None = None

    @property
    def writable(self) -> bool:
        return self.alive and not self.in_recovery and not self.read_only


class Model:
    """Two databases, the links between the DR host (D), the primary host (P) and one witness (W), the
    primary-side agent and an executor that applies the machine's actions with random delays and failures."""

    def __init__(self, rng: random.Random, policy: Policy, partitions: bool) -> None:
        self.rng = rng
        self.policy = policy
        self.partitions = partitions
        self.p = Db()
        self.d = Db(in_recovery=True, receipt=T0)
        self.links = {"pd": True, "pw": True, "dw": True}
        self.app_ok = True
        self.dns: Region = "primary"
        self.now = T0
        self.state = initial_state(AUTO, None)
        self.pside = PrimarySideState()
        self.pending: tuple[Action, int] | None = None  # (action, ticks until its result)
        self.history: list[Record] = []
        self.states: list[State] = []

    def db(self, region: Region) -> Db:
        return self.p if region == "primary" else self.d

    def reach(self, region: Region) -> bool:
        """Reachable from the DR host."""
        node = self.db(region)
        return node.alive and (region == "dr" or self.links["pd"])

    def probe(self, region: Region) -> DbProbe:
        node = self.db(region)
        if not self.reach(region):
            return down_db(region)
        return DbProbe(
            region,
            True,
            in_recovery=node.in_recovery,
            read_only=node.read_only,
            timeline=node.timeline,
            current_lsn=None if node.in_recovery else node.lsn,
            receive_lsn=node.lsn if node.in_recovery else None,
            replay_lsn=node.lsn if node.in_recovery else None,
            last_receipt=node.receipt if node.in_recovery else None,
            streaming=node.in_recovery and node.receipt == self.now,
        )

    def primary_healthy(self) -> bool:
        return self.p.alive and self.app_ok and self.p.writable

    def d_obs(self) -> Observations:
        witness = []
        if self.policy.witnesses:
            if self.links["dw"]:
                witness.append(http("w", "ok" if self.links["pw"] and self.primary_healthy() else "fail"))
            else:
                witness.append(http("w", "down"))
        peer = None
        if self.policy.peer:
            if self.links["pd"] and self.p.alive:
                peer = PeerProbe(
                    True,
                    role="primary",
                    db_reachable=True,
                    db_writable=self.p.writable,
                    fenced=self.pside.fenced,
                    active=None,
                )
            else:
                peer = PeerProbe(False)
        health: dict[Region, HttpProbe] = {}
        if self.links["pd"] and self.p.alive:
            health["primary"] = http("primary", "ok" if self.app_ok else "fail")
        else:
            health["primary"] = http("primary", "down")
        return Observations(
            at=self.now,
            health=health,
            db={"primary": self.probe("primary"), "dr": self.probe("dr")},
            witnesses=tuple(witness),
            peer=peer,
        )

    def p_obs(self) -> Observations:
        witness: tuple[HttpProbe, ...] = ()
        if self.policy.witnesses:
            witness = (
                http("w", "ok" if self.primary_healthy() else "fail") if self.links["pw"] else http("w", "down"),
            )
        peer = None
        if self.policy.peer:
            peer = PeerProbe(True, role="dr", active=self.state.active) if self.links["pd"] else PeerProbe(False)
        p = self.p
        probe = DbProbe("primary", True, in_recovery=p.in_recovery, read_only=p.read_only)
        return Observations(at=self.now, db={"primary": probe}, witnesses=witness, peer=peer)

    def replicate(self) -> None:
        """The standby streams from the writable side while the link is up (fenced primaries still send WAL)."""
        for src, dst in ((self.p, self.d), (self.d, self.p)):
            if src.alive and dst.alive and not src.in_recovery and dst.in_recovery and self.links["pd"]:
                dst.lsn = src.lsn
                dst.receipt = self.now

    def events(self) -> None:
        rng = self.rng
        if rng.random() < 0.02 and self.p.alive:
            self.p.alive = False  # the primary host dies for good
        if self.partitions:
            for link in self.links:
                if rng.random() < 0.06:
                    self.links[link] = not self.links[link]
        if rng.random() < 0.05:
            self.app_ok = not self.app_ok
        for node in (self.p, self.d):
            if node.writable:
                node.lsn += rng.randint(0, 50)
        # an operator rejoins a non-writable old primary after a failover (dr rejoin on its host)
        if (
            self.state.active == "dr"
            and self.state.operation is None
            and self.p.alive
            and not self.p.writable
            and not self.p.in_recovery
            and self.links["pd"]
            and rng.random() < 0.2
        ):
            self.p.in_recovery, self.p.read_only, self.p.timeline = True, False, self.d.timeline
        # an operator resumes a halted machine now and then
        if self.state.phase == "halted" and rng.random() < 0.1:
            d = command(self.state, Resume(), self.now, self.policy, None)
            assert isinstance(d, Decision)
            self.absorb(d)
        # the DR agent restarts: the step in flight may or may not have taken effect, its result is lost
        if rng.random() < 0.02:
            if self.pending is not None and rng.random() < 0.5:
                self.execute(self.pending[0])
            self.pending = None
            self.state = initial_state(AUTO, State.from_json(json.loads(json.dumps(self.state.to_json()))))

    def execute(self, action: Action) -> StepResult:
        """Apply one step action to the world and report like the executor would."""
        assert isinstance(action, Fence | Promote | SwitchDns | Rejoin | Unfence)
        step = {Fence: "fence", Promote: "promote", SwitchDns: "dns", Rejoin: "rejoin", Unfence: "unfence"}[
            type(action)
        ]
        if self.rng.random() < 0.08:
            return StepResult(action.operation_id, step, False, 1.0, {"reachable": self.reach(action.region)}, "boom")
        if isinstance(action, SwitchDns):
            self.dns = action.region
            return StepResult(action.operation_id, step, True, 1.0)
        node = self.db(action.region)
        if not self.reach(action.region):
            return StepResult(action.operation_id, step, False, 3.0, {"reachable": False}, "unreachable")
        if isinstance(action, Fence):
            node.read_only = True
            return StepResult(action.operation_id, step, True, 0.5, {"lsn": node.lsn, "reachable": True})
        if isinstance(action, Promote):
            if node.in_recovery:
                node.in_recovery, node.read_only, node.timeline = False, False, node.timeline + 1
            return StepResult(action.operation_id, step, True, 1.0, {"promoted_lsn": node.lsn, "receive_lsn": node.lsn})
        if isinstance(action, Rejoin):
            node.in_recovery, node.read_only = True, False
            node.timeline = self.db("primary" if action.region == "dr" else "dr").timeline
            return StepResult(action.operation_id, step, True, 2.0)
        node.read_only = False
        return StepResult(action.operation_id, step, True, 0.1)

    def absorb(self, d: Decision) -> None:
        for a in d.actions:
            if isinstance(a, Record):
                self.history.append(a)
            elif isinstance(a, Fence | Promote | SwitchDns | Rejoin | Unfence):
                assert self.pending is None, "two step actions outstanding"
                if isinstance(a, Promote):
                    other_db = self.db("dr" if a.region == "primary" else "primary")
                    op = d.state.operation
                    assert op is not None
                    # only after the old side was fenced, or its self-fence deadline passed
                    assert (
                        op.completed("fence")
                        or (op.fence_deadline is not None and op.fence_deadline <= self.now)
                        or op.completed("promote")
                        or not other_db.writable
                    ), op
                self.pending = (a, self.rng.randint(0, 2))
        transitions_consistent(self.state, d)
        self.state = d.state
        self.states.append(d.state)

    def tick(self) -> None:
        self.now += self.policy.interval
        self.events()
        self.replicate()
        if self.p.alive:
            self.pside, pactions = decide_primary_side(self.pside, self.p_obs(), self.now, self.policy)
            if kinds(pactions, FenceSelf):
                self.p.read_only = True
        self.absorb(decide(self.state, self.d_obs(), self.now, self.policy))
        while self.pending is not None and self.pending[1] == 0:
            action = self.pending[0]
            self.pending = None
            result = self.execute(action)
            self.absorb(step_done(self.state, result, self.now, self.policy))
        if self.pending is not None:
            self.pending = (self.pending[0], self.pending[1] - 1)
        assert not (self.p.writable and self.d.writable), f"two writable databases at {self.now}"


@pytest.mark.parametrize(
    ("witnesses", "peer", "partitions"),
    [(1, True, True), (1, False, True), (0, True, True), (0, False, False)],
    ids=["witness+peer", "witness", "peer", "single-vantage-crashes-only"],
)
def test_model_never_two_writable_primaries(witnesses: int, peer: bool, partitions: bool) -> None:
    # Detection (2 rounds) is faster than the primary's self-fence (50 s), so an unfenced promotion that did not
    # wait out the deadline would show up as two writers.
    policy = replace(
        POLICY,
        witnesses=witnesses,
        peer=peer,
        failover_threshold=2,
        partition_timeout=timedelta(seconds=50),
        cooldown=timedelta(minutes=2),
        flap_window=timedelta(minutes=10),
    )
    totals = {"failover": 0, "failback": 0, "halted": 0, "unfence": 0}
    for seed in range(60):
        model = Model(random.Random(seed * 7919 + witnesses * 3 + peer), policy, partitions)
        for _ in range(150):
            model.tick()
        ops = [r for r in model.history if r.kind == "operation" and r.fields["outcome"] == "succeeded"]
        totals["failover"] += sum(1 for r in ops if r.fields["operation"] == "failover")
        totals["failback"] += sum(1 for r in ops if r.fields["operation"] == "failback")
        totals["unfence"] += sum(1 for r in ops if r.fields["operation"] == "unfence")
        totals["halted"] += sum(1 for s in model.states if s.phase == "halted")
        # cooldown and flap budget over automatic role changes
        changes = [s.last_role_change for s in model.states if s.last_role_change is not None]
        distinct = sorted(set(changes))
        for a, b in itertools.pairwise(distinct):
            assert b - a >= policy.cooldown
        for s in model.states:
            assert (
                len([t for t in s.role_changes if s.last_role_change and s.last_role_change - t < policy.flap_window])
                <= policy.flap_budget
            )
        for s in model.states[::10]:
            assert State.from_json(json.loads(json.dumps(s.to_json()))) == s
    # the model exercises the machine rather than idling
    if witnesses or not peer:  # peer only: a dead primary host also silences the peer, which is isolation
        assert totals["failover"] > 0
    if partitions and witnesses:
        assert totals["failback"] > 0


# --- persistence ---------------------------------------------------------------------------------------------


def test_to_json_round_trip_of_every_field() -> None:
    op = Operation(
        id="failover-1",
        kind="failover",
        trigger="manual",
        forced=True,
        allow_unfenced=False,
        source="primary",
        target="dr",
        started_at=T0,
        reason="drill",
        step="wait_self_fence",
        fence_deadline=T0 + IV,
        fence_lsn=42,
        frozen={"primary_lsn": 7, "standby_last_receipt": T0.isoformat()},
        steps=(("fence", 1.5),),
        data_loss_risk=True,
        promoted_lsn=None,
        lost_bytes_estimate=3,
        pending=True,
    )
    state, _, _ = _failover_started()
    full = replace(
        state, operation=op, halted_reason="x", recoveries=4, role_changes=(T0, T0 + IV), last_role_change=T0
    )
    data = json.loads(json.dumps(full.to_json()))
    assert State.from_json(data) == full
    with pytest.raises(ValueError, match="version"):
        State.from_json({**data, "version": 99})


def test_policy_from_settings() -> None:
    from kybdr_agent.config import DRSettings

    dr = DRSettings(witness_urls=["https://w1", "https://w2"], peer_url="https://peer:8443")
    policy = Policy.from_settings(dr)
    assert policy.witnesses == 2
    assert policy.peer
    assert policy.interval == dr.health_check_interval
    assert policy.vantage == "multi"


def test_a_receiver_that_stopped_with_the_primary_is_judged_by_its_last_receipt() -> None:
    """When the primary dies its WAL receiver exits and reports no receipt time; the staleness guard must
    judge the last receipt seen before the failures began (fresh here), not refuse for "no receipt"."""
    state = steady_state()
    ds = run_ticks(state, lambda now: dead_primary(now, dr=standby_db("dr", receipt=None, streaming=False)), 4)
    assert any(kinds(d.actions, Fence) for d in ds)


def test_an_idle_caught_up_standby_is_not_stale() -> None:
    """An idle primary only sends keepalives (every wal_receiver_timeout / 2), so the last receipt can be
    older than max_staleness although the standby has everything: that is no reason to refuse."""
    state = steady_state()
    healthy = state.last_healthy
    assert healthy is not None
    assert healthy.lsn is not None
    old = T0 - timedelta(minutes=5)
    ds = run_ticks(state, lambda now: dead_primary(now, dr=standby_db("dr", receive=healthy.lsn, receipt=old)), 4)
    assert any(kinds(d.actions, Fence) for d in ds)


def _fenced_primary_world(at: datetime, *, witness: str = "ok", standby: DbProbe | None = None) -> Observations:
    primary = DbProbe("primary", True, in_recovery=False, read_only=True, timeline=1, current_lsn=5000)
    obs = world(at, primary=primary, witness=witness, peer="ok", **({"dr": standby} if standby else {}))
    assert obs.peer is not None
    return replace(obs, peer=replace(obs.peer, fenced=True, db_writable=False, contact=True))


def test_a_healed_partitions_self_fence_is_lifted_by_the_dr_agent() -> None:
    """The primary's agent fenced it during a partition; the links are back, the app and the witness see the
    primary healthy, the standby was never promoted: the DR agent unfences it (one operation, recorded)."""
    d = decide(steady_state(), _fenced_primary_world(T0 + timedelta(seconds=10)), T0 + timedelta(seconds=10), POLICY)
    unfences = kinds(d.actions, Unfence)
    assert [u.region for u in unfences] == ["primary"]
    assert d.state.operation is not None
    assert d.state.operation.kind == "unfence"
    done = step_done(d.state, StepResult(unfences[0].operation_id, "unfence", True, 0.1), T0, POLICY)
    assert done.state.operation is None
    assert done.state.phase == "steady"
    assert [r.fields["outcome"] for r in records(done.actions, "operation")] == ["succeeded"]


@pytest.mark.parametrize("case", ["witness-fails", "standby-promoted", "paused", "peer-still-cut-off"])
def test_a_fence_is_not_lifted_unless_everything_says_so(case: str) -> None:
    at = T0 + timedelta(seconds=10)
    state = steady_state()
    if case == "witness-fails":
        obs = _fenced_primary_world(at, witness="fail")
    elif case == "standby-promoted":
        obs = _fenced_primary_world(at, standby=writable_db("dr"))
    elif case == "paused":
        obs = _fenced_primary_world(at)
        state = replace(state, switches=Switches(auto_failover=True, paused=True))
    else:  # we reach its agent, but it reaches nobody: lifting its fence would only make it fence again
        obs = _fenced_primary_world(at)
        assert obs.peer is not None
        obs = replace(obs, peer=replace(obs.peer, contact=False))
    d = decide(state, obs, at, POLICY)
    assert not kinds(d.actions, Unfence)
