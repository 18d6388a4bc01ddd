"""The DR state machine: a pure function from (state, observations, now) to (state, actions).

Pure: no I/O, no asyncio, no clock reads — ``now`` is always a parameter — so every rule is tested with a
virtual clock and a model world (tests/unit/test_dr_machine.py). The executor (``dr/executor.py``) performs the
actions one at a time and feeds each step's outcome back through :func:`step_done`; a step is never cancelled
by a new observation (the ``transitions`` AsyncMachine bug #465 is why the design refuses that), so while a step
is outstanding :func:`decide` only keeps its bookkeeping current.

Shape after Patroni's ``quorum.py``: small frozen values in, a new state and a tuple of actions out, with the
reason of every rule in its docstring. Names of places: ``"primary"`` is the database reached by
``primary_dsn`` and ``"dr"`` the one reached by ``standby_dsn``; ``State.active`` says which of them takes the
writes (and where DNS points).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from kybdr_agent.dr.machine_types import (
    PHASES,
    STATE_VERSION,
    Action,
    Alert,
    Command,
    Decision,
    Failback,
    Failover,
    Fence,
    FenceSelf,
    GuardResult,
    LastHealthy,
    LastStandby,
    Operation,
    OperationKind,
    Outcome,
    Phase,
    Policy,
    PrimarySideState,
    Promote,
    Record,
    Refusal,
    Rejoin,
    Resume,
    SetSwitch,
    Severity,
    State,
    StepAction,
    StepName,
    StepResult,
    SwitchDns,
    Switches,
    SwitchName,
    Transition,
    Trigger,
    Unfence,
    Vantage,
    dt_text,
)
from kybdr_agent.dr.observations import REGIONS, DbProbe, Observations, Region, other

# The values are part of this module's interface: callers import them from here with the rules.
__all__ = [
    "PHASES",
    "STATE_VERSION",
    "Action",
    "Alert",
    "Command",
    "Decision",
    "Failback",
    "Failover",
    "Fence",
    "FenceSelf",
    "GuardResult",
    "LastHealthy",
    "LastStandby",
    "Operation",
    "OperationKind",
    "Outcome",
    "Phase",
    "Policy",
    "PrimarySideState",
    "Promote",
    "Record",
    "Refusal",
    "Rejoin",
    "Resume",
    "SetSwitch",
    "Severity",
    "State",
    "StepAction",
    "StepName",
    "StepResult",
    "SwitchDns",
    "SwitchName",
    "Switches",
    "Transition",
    "Trigger",
    "Unfence",
    "Vantage",
]


# --- the decisions ---------------------------------------------------------------------------------------------
#
# Every public function below builds its answer through a ``_Run``: a local, short-lived accumulator of the new
# state and the actions, so each rule reads as "go to this phase, emit that" while the functions stay pure.

_STEP_PHASE: Mapping[tuple[OperationKind, StepName], Phase] = {
    ("failover", "fence"): "fencing",
    ("failover", "wait_self_fence"): "fencing",
    ("failover", "promote"): "promoting",
    ("failover", "dns"): "dns_switching",
    ("failback", "fence"): "switching_back",
    ("failback", "promote"): "switching_back",
    ("failback", "dns"): "switching_back",
    ("failback", "rejoin"): "switching_back",
    ("failback", "unfence"): "switching_back",
    ("fence", "fence"): "fencing",
    ("unfence", "unfence"): "fencing",
}


class _Run:
    """The state being built and the actions emitted so far, for one call of a public function."""

    def __init__(self, state: State, now: datetime) -> None:
        self.state = state
        self.now = now
        self.actions: list[Action] = []

    def set(self, **changes: Any) -> None:
        self.state = replace(self.state, **changes)

    @property
    def op(self) -> Operation:
        assert self.state.operation is not None, "no operation in progress"
        return self.state.operation

    def set_op(self, **changes: Any) -> None:
        self.set(operation=replace(self.op, **changes))

    def goto(self, phase: Phase, reason: str) -> None:
        """Change phase, recording the transition: every phase change is a history entry (why it happened)."""
        before = self.state.phase
        if phase == before:
            return
        self.actions.append(Record("transition", {"from": before, "to": phase, "reason": reason}))
        changes: dict[str, Any] = {"phase": phase, "last_transition": Transition(before, phase, self.now, reason)}
        if phase == "steady":
            # A new episode starts: its conditions must be able to alert again.
            changes["alerted"] = ""
        if before == "halted":
            changes["halted_reason"] = ""
        self.set(**changes)

    def alert_once(self, key: str, severity: Severity, message: str) -> None:
        """Alert when the condition changes, not on every tick it persists (pages must mean something)."""
        if self.state.alerted == key:
            return
        self.actions.append(Alert(severity, message))
        self.set(alerted=key)

    def alert(self, severity: Severity, message: str) -> None:
        self.actions.append(Alert(severity, message))

    def halt(self, reason: str) -> None:
        """Freeze automation: a failed step or an ambiguous world needs a human (anchors §6 rule 7).

        The operation, if any, is kept (not outstanding) so ``Resume`` or a restart retries it from where it
        stopped instead of forgetting a half-done failover.
        """
        if self.state.operation is not None:
            self.set_op(pending=False)
        self.goto("halted", reason)
        self.set(halted_reason=reason)
        self.alert("critical", f"DR halted: {reason}")

    def decision(self) -> Decision:
        return Decision(self.state, tuple(self.actions))


def _db(obs: Observations, region: Region) -> DbProbe | None:
    return obs.db.get(region)


def _reachable(obs: Observations, region: Region) -> bool:
    db = _db(obs, region)
    return db is not None and db.reachable


def _writable(obs: Observations, region: Region) -> bool:
    db = _db(obs, region)
    return db is not None and db.writable


def _in_recovery(obs: Observations, region: Region) -> bool | None:
    """True/False as PostgreSQL says; None when the database could not be reached (we do not know)."""
    db = _db(obs, region)
    if db is None or not db.reachable:
        return None
    return db.in_recovery


def check_ok(obs: Observations, region: Region) -> bool:
    """One check of a region: its health URL (when one is probed) answered 2xx AND its database takes writes.

    Both, because either alone lies: the application can be up on a read-only database, and the database can
    be writable behind a dead load balancer.
    """
    health = obs.health.get(region)
    return (health is None or health.ok) and _writable(obs, region)


def _peer_reachable(obs: Observations) -> bool:
    return obs.peer is not None and obs.peer.reachable


def _isolation(state: State, obs: Observations, policy: Policy) -> str:
    """Why this (DR-side) agent cannot trust its own view, or "" when it can.

    An agent that sees neither peer nor witness cannot tell "the primary is down" from "I am cut off", so it
    must not act (anchors §6 rule 9). And while the primary region is active, a DR agent whose own standby is
    unreachable has nothing to promote. With nothing configured to ask (single vantage point) only the second
    rule applies; status says plainly that the view is single.
    """
    if policy.vantage == "multi" and not any(w.reachable for w in obs.witnesses) and not _peer_reachable(obs):
        return "neither a witness nor the peer answers"
    if state.active == "primary" and not _reachable(obs, "dr"):
        return "the DR database (our own standby) is unreachable"
    return ""


def _old_primary_may_have_contact(obs: Observations, policy: Policy) -> bool:
    """Whether the old primary's own agent may still be in contact, and so will NOT fence itself.

    The primary side keeps its database writable while it reaches the peer or a MAJORITY of witnesses answers
    2xx (:func:`decide_primary_side`). We can rule that out only when the peer is unreachable (links are taken
    as symmetric) or reports its database not writable, and enough witnesses answer us non-2xx that no
    majority can answer it 2xx. A witness we cannot reach might be answering the primary, so it counts against
    us: waiting longer is the price of never having two writers.
    """
    if policy.vantage == "single":
        return False
    peer = obs.peer
    if peer is not None and peer.reachable and peer.db_writable is not False:
        return True
    if policy.witnesses:
        quorum = policy.witnesses // 2 + 1
        denials = sum(1 for w in obs.witnesses if w.reachable and not w.ok)
        if denials < policy.witnesses - quorum + 1:
            return True
    return False


def _count_recent(state: State, now: datetime, policy: Policy) -> int:
    return sum(1 for at in state.role_changes if now - at < policy.flap_window)


def _cooldown_guard(state: State, now: datetime, policy: Policy) -> GuardResult:
    """Soft: one automatic role change per ``cooldown`` stops a flapping region from bouncing writes around."""
    last = state.last_role_change
    if last is not None and now - last < policy.cooldown:
        left = (last + policy.cooldown - now).total_seconds()
        return GuardResult("cooldown", False, True, f"last automatic role change {last.isoformat()}; {left:.0f} s left")
    return GuardResult("cooldown", True, True, "no automatic role change within the cooldown")


def _flap_guard(state: State, now: datetime, policy: Policy) -> GuardResult:
    """After ``flap_budget`` automatic role changes within ``flap_window`` automation stops (halted) for good
    until an operator acts: past that point the automation is the problem, not the cure."""
    recent = _count_recent(state, now, policy)
    ok = recent < policy.flap_budget
    return GuardResult(
        "flap_budget", ok, False, f"{recent} automatic role change(s) in the last window (budget {policy.flap_budget})"
    )


def _vantage_guard(policy: Policy) -> GuardResult:
    if policy.vantage == "single":
        return GuardResult(
            "vantage",
            True,
            True,
            "single vantage point: no witness and no peer configured, so a partition looks like a dead primary",
        )
    return GuardResult("vantage", True, True, f"{policy.witnesses} witness(es), peer {'on' if policy.peer else 'off'}")


def _failover_guards(
    state: State, obs: Observations, now: datetime, policy: Policy, trigger: Trigger
) -> list[GuardResult]:
    standby = _db(obs, "dr")
    healthy = state.last_healthy
    guards: list[GuardResult] = []

    # Hard: only a reachable standby can be promoted; promoting anything else is not a failover.
    if standby is not None and standby.reachable and standby.in_recovery is True:
        guards.append(GuardResult("standby", True, False, "the DR database is a reachable standby"))
    else:
        guards.append(GuardResult("standby", False, False, "the DR database is not a reachable standby"))

    # Hard: a standby on another timeline than the primary's is following something else (Stolon #783).
    sb_tl = standby.timeline if standby else None
    pr_tl = healthy.timeline if healthy else None
    if sb_tl is not None and pr_tl is not None:
        ok = sb_tl == pr_tl
        guards.append(GuardResult("timeline", ok, False, f"standby timeline {sb_tl}, primary {pr_tl}"))
    else:
        guards.append(GuardResult("timeline", False, True, "timeline unknown (primary never seen or standby silent)"))

    # Soft: bytes the standby has not received of what the primary last showed us (bounded data loss).
    receive = standby.receive_lsn if standby else None
    if healthy is not None and healthy.lsn is not None and receive is not None:
        lag = healthy.lsn - receive
        guards.append(
            GuardResult("lag", lag <= policy.max_lag_bytes, True, f"{lag} bytes behind (max {policy.max_lag_bytes})")
        )
    else:
        guards.append(GuardResult("lag", False, True, "lag unknown (no primary LSN or no standby receive LSN)"))

    # Soft: judged at the moment the failures began, because a dead primary makes every receipt age grow; a
    # standby whose replication silently stopped long before must not be promoted.
    ref = state.suspect_since or now
    receipt = standby.last_receipt if standby else None
    if receipt is None and state.last_standby is not None:
        receipt = state.last_standby.last_receipt  # the receiver stopped with the primary: its last receipt
    # An idle primary sends the standby nothing but a keepalive every wal_receiver_timeout / 2 (30 s by
    # default), so an old receipt alone is no sign of loss: a standby that has received everything the
    # primary had written when last seen healthy is caught up, however quiet the link has been.
    caught_up = healthy is not None and healthy.lsn is not None and receive is not None and receive >= healthy.lsn
    if receipt is None and caught_up:
        guards.append(GuardResult("staleness", True, True, "no WAL receipt time, but the standby has everything"))
    elif receipt is None:
        guards.append(GuardResult("staleness", False, True, "no WAL receipt time: replication is not running"))
    else:
        age = ref - receipt
        detail = (
            f"last WAL receipt {age.total_seconds():.1f} s before the failures began "
            f"(max {policy.max_staleness.total_seconds():.0f} s)"
        )
        if age > policy.max_staleness and caught_up:
            detail += ", but the standby had received all the primary had written: an idle link, not a stale one"
        guards.append(GuardResult("staleness", age <= policy.max_staleness or caught_up, True, detail))
    guards.append(_cooldown_guard(state, now, policy))
    if trigger == "auto":
        guards.append(_flap_guard(state, now, policy))
    isolated = _isolation(state, obs, policy)
    guards.append(GuardResult("isolation", not isolated, True, isolated or "in contact"))
    guards.append(_vantage_guard(policy))
    return guards


def _failback_readiness(obs: Observations, policy: Policy) -> tuple[bool, str]:
    """The old primary region is back: its health URL answers (when probed) and its database is a streaming
    standby within ``max_lag_bytes`` of the DR database. Only then is a zero-loss switchover quick and safe."""
    health = obs.health.get("primary")
    if health is not None and not health.ok:
        return False, "the primary region's health URL fails"
    primary = _db(obs, "primary")
    if primary is None or not primary.reachable:
        return False, "the primary database is unreachable"
    if primary.in_recovery is not True or primary.streaming is not True:
        return False, "the primary database is not a streaming standby (run dr rejoin on its host)"
    dr = _db(obs, "dr")
    current = dr.current_lsn if dr else None
    if current is None or primary.replay_lsn is None:
        return False, "replay position unknown"
    lag = current - primary.replay_lsn
    if lag > policy.max_lag_bytes:
        return False, f"the primary database replays {lag} bytes behind (max {policy.max_lag_bytes})"
    return True, f"the primary database is a streaming standby {lag} bytes behind"


def _failback_guards(
    state: State, obs: Observations, now: datetime, policy: Policy, trigger: Trigger
) -> list[GuardResult]:
    primary = _db(obs, "primary")
    dr = _db(obs, "dr")
    guards: list[GuardResult] = []
    standby = primary is not None and primary.reachable and primary.in_recovery is True and primary.streaming is True
    guards.append(
        GuardResult(
            "old_primary_standby",
            standby,
            False,
            "the primary database streams from the DR database"
            if standby
            else "the primary database is not a reachable streaming standby (run dr rejoin on its host)",
        )
    )
    dr_ok = dr is not None and dr.reachable
    guards.append(GuardResult("dr_reachable", dr_ok, False, "the DR database answers" if dr_ok else "unreachable"))
    p_tl = primary.timeline if primary else None
    d_tl = dr.timeline if dr else None
    if p_tl is not None and d_tl is not None:
        guards.append(GuardResult("timeline", p_tl == d_tl, False, f"primary timeline {p_tl}, DR {d_tl}"))
    else:
        guards.append(GuardResult("timeline", False, True, "timeline unknown"))
    ready, detail = _failback_readiness(obs, policy)
    guards.append(GuardResult("caught_up", ready, True, detail))
    guards.append(
        GuardResult(
            "recoveries",
            state.recoveries >= policy.failback_threshold,
            True,
            f"{state.recoveries} consecutive healthy checks of the primary region (need {policy.failback_threshold})",
        )
    )
    guards.append(_cooldown_guard(state, now, policy))
    if trigger == "auto":
        guards.append(_flap_guard(state, now, policy))
    return guards


def evaluate_guards(
    state: State, obs: Observations, now: datetime, policy: Policy, *, forced: bool, trigger: Trigger = "auto"
) -> tuple[GuardResult, ...]:
    """The preconditions of moving the active role to the other region (failover from primary, failback from
    dr). A failed guard keeps ``ok`` False even when ``forced``; its detail then says it was skipped, so the
    history shows what force overrode. Use :func:`blocking` for the ones that refuse."""
    if state.active == "primary":
        guards = _failover_guards(state, obs, now, policy, trigger)
    else:
        guards = _failback_guards(state, obs, now, policy, trigger)
    if forced:
        guards = [replace(g, detail=g.detail + " (skipped: forced)") if g.soft and not g.ok else g for g in guards]
    return tuple(guards)


def blocking(guards: tuple[GuardResult, ...], *, forced: bool) -> tuple[GuardResult, ...]:
    """The guards that refuse: every failed hard one, and the failed soft ones unless forced."""
    return tuple(g for g in guards if not g.ok and not (g.soft and forced))


# --- operations ------------------------------------------------------------------------------------------------


def _frozen_inputs(state: State, obs: Observations | None) -> dict[str, Any]:
    """The decision's inputs, kept with the operation: what we knew when we chose (for history and the
    lost-bytes estimate), as plain JSON values."""
    standby = _db(obs, "dr") if obs else None
    healthy = state.last_healthy
    lag = (
        healthy.lsn - standby.receive_lsn
        if healthy and healthy.lsn is not None and standby and standby.receive_lsn is not None
        else None
    )
    return {
        "standby_receive_lsn": standby.receive_lsn if standby else None,
        "standby_replay_lsn": standby.replay_lsn if standby else None,
        "standby_last_receipt": dt_text(standby.last_receipt) if standby else None,
        "standby_timeline": standby.timeline if standby else None,
        "primary_lsn": healthy.lsn if healthy else None,
        "primary_timeline": healthy.timeline if healthy else None,
        "primary_seen_at": dt_text(healthy.at) if healthy else None,
        "lag_bytes": lag,
        "failures": state.failures,
        "vantage": state.vantage,
    }


def _operation_id(kind: OperationKind, now: datetime) -> str:
    return f"{kind}-{now.strftime('%Y%m%dT%H%M%S%fZ')}"


def _start_operation(
    run: _Run,
    kind: OperationKind,
    trigger: Trigger,
    source: Region,
    target: Region,
    reason: str,
    obs: Observations | None,
    *,
    forced: bool = False,
    allow_unfenced: bool = False,
    first_step: StepName = "fence",
) -> None:
    """Begin an operation with its first step, fencing ``source``: always fence before promoting (the split
    brains reported against repmgr come from skipping it). Only lifting a partition's fence starts otherwise."""
    op = Operation(
        id=_operation_id(kind, run.now),
        kind=kind,
        trigger=trigger,
        forced=forced,
        allow_unfenced=allow_unfenced,
        source=source,
        target=target,
        started_at=run.now,
        reason=reason,
        step=first_step,
        frozen=_frozen_inputs(run.state, obs),
    )
    run.set(operation=op)
    _begin_step(run, first_step, reason)


def _begin_step(run: _Run, step: StepName, reason: str) -> None:
    """Emit a step's action (intent first, so history shows it before its side effect) and mark it outstanding."""
    op = run.op
    # fence, rejoin and unfence act on the side giving up the role; promote and dns on the side taking it.
    region: Region = op.source if step in ("fence", "rejoin", "unfence") else op.target
    action: StepAction
    if step == "fence":
        action = Fence(op.id, region)
    elif step == "promote":
        action = Promote(op.id, region, op.fence_lsn if op.kind == "failback" else None)
    elif step == "dns":
        action = SwitchDns(op.id, region)
    elif step == "rejoin":
        action = Rejoin(op.id, region)
    elif step == "unfence":
        action = Unfence(op.id, region)
    else:  # wait_self_fence has no action
        raise ValueError(f"step {step} has no action")
    run.set_op(step=step, pending=True)
    run.goto(_STEP_PHASE[(op.kind, step)], reason)
    run.actions.append(
        Record(
            "intent",
            {
                "operation": op.kind,
                "operation_id": op.id,
                "step": step,
                "region": region,
                "trigger": op.trigger,
                "at_least_lsn": getattr(action, "at_least_lsn", None),
            },
        )
    )
    run.actions.append(action)


def _finish(run: _Run, outcome: Outcome, *, new_active: Region | None = None, warning: str = "") -> None:
    """End the operation: one "operation" history entry with its timings, LSNs and loss estimate; a
    successful automatic role change counts against the cooldown and the flap budget."""
    op = run.op
    steps: dict[str, float] = {}
    for name, seconds in op.steps:
        steps[name] = steps.get(name, 0.0) + seconds
    fields: dict[str, Any] = {
        "operation": op.kind,
        "operation_id": op.id,
        "trigger": op.trigger,
        "forced": op.forced,
        "allow_unfenced": op.allow_unfenced,
        "source": op.source,
        "target": op.target,
        "reason": op.reason,
        "outcome": outcome,
        "duration_s": (run.now - op.started_at).total_seconds(),
        "steps": steps,
        "promoted_lsn": op.promoted_lsn,
        "lost_bytes_estimate": op.lost_bytes_estimate,
        "data_loss_risk": op.data_loss_risk,
        "frozen": dict(op.frozen),
    }
    if warning:
        fields["warning"] = warning
    run.actions.append(Record("operation", fields))
    run.set(operation=None)
    if new_active is not None and new_active != run.state.active:
        changes: dict[str, Any] = {
            "active": new_active,
            "failures": 0,
            "recoveries": 0,
            "suspect_since": None,
            "last_healthy": None,
            "last_standby": None,
        }
        if op.trigger == "auto" and outcome == "succeeded":
            changes["role_changes"] = (*run.state.role_changes, run.now)
            changes["last_role_change"] = run.now
        run.set(**changes)


def _lost_bytes(op: Operation, detail: Mapping[str, Any]) -> int | None:
    """What the old primary had that the promoted standby did not receive, as far as we know: its LSN at the
    fence when it answered, else its last LSN we saw, minus what the standby received."""
    promoted = detail.get("promoted_lsn")
    received = detail.get("receive_lsn")
    ref = received if received is not None else promoted
    last = op.fence_lsn if op.fence_lsn is not None else op.frozen.get("primary_lsn")
    if ref is None or last is None:
        return None
    return max(0, int(last) - int(ref))


# --- decide ----------------------------------------------------------------------------------------------------


def decide(state: State, obs: Observations, now: datetime, policy: Policy) -> Decision:
    """One round of observations: bookkeeping always, then the rules of the current phase.

    While a step is outstanding nothing but bookkeeping happens: steps run to completion and report through
    :func:`step_done`. In ``halted`` nothing happens until an operator acts.
    """
    run = _Run(state, now)
    _bookkeep(run, obs, policy)
    op = run.state.operation
    if run.state.phase == "halted" or (op is not None and op.pending):
        pass
    elif run.state.phase == "starting":
        _start(run, obs, policy)
    elif op is not None:
        _resume(run, obs, policy)
    else:
        _watch(run, obs, policy)
    # Remember the standby as seen now: the next round's WAL-progress veto compares against it.
    # A receiver that stopped (the primary died) reports no receipt time: keep the last one known, which is
    # what the staleness guard must judge (when did WAL last arrive, not "is it arriving now").
    standby = _db(obs, "dr")
    if standby is not None and standby.reachable:
        before = run.state.last_standby
        run.set(
            last_standby=LastStandby(
                standby.receive_lsn if standby.receive_lsn is not None else (before.receive_lsn if before else None),
                standby.last_receipt if standby.last_receipt is not None else (before.last_receipt if before else None),
            )
        )
    return run.decision()


def _bookkeep(run: _Run, obs: Observations, policy: Policy) -> None:
    """Facts kept current in every phase: the vantage, the last contact with the active side (the start of
    its self-fence clock as far as we can tell), and the active database's last writable position."""
    state = run.state
    active = state.active
    contact = _reachable(obs, active) or _peer_reachable(obs)
    if active == "primary" and any(w.reachable and w.ok for w in obs.witnesses):
        # A witness that sees the primary healthy is in contact with it, so its agent's clock restarted too.
        contact = True
    changes: dict[str, Any] = {"vantage": policy.vantage}
    if contact:
        changes["last_contact"] = run.now
    db = _db(obs, active)
    if db is not None and db.writable:
        changes["last_healthy"] = LastHealthy(db.current_lsn, db.timeline, run.now)
    run.set(**changes)


def _start(run: _Run, obs: Observations, policy: Policy) -> None:
    """Derive roles from PostgreSQL, never from memory (anchors §6 rule 7), and resume an interrupted operation.

    Exactly one writable database makes its region active. Two writable is a split brain: the one that is not
    the remembered active (where DNS points) is fenced and automation halts, since which side holds the
    acknowledged writes is for a human to judge. None writable keeps the remembered active, so a failover
    still happens when the agent restarts in the middle of an outage. Nothing reachable: wait.
    """
    if not any(_reachable(obs, r) for r in REGIONS):
        run.alert_once("starting:unreachable", "warning", "DR starting: neither database answers; waiting")
        return
    op = run.state.operation
    if op is not None and op.kind in ("fence", "unfence"):
        _finish(run, "succeeded" if _writable(obs, op.source) == (op.kind == "unfence") else "failed")
        op = None
    if op is not None:
        _resume(run, obs, policy)
        return
    writable = [r for r in REGIONS if _writable(obs, r)]
    if len(writable) == 2:
        victim = other(run.state.active)
        run.alert("critical", f"split brain: both databases accept writes; fencing the {victim} database")
        _start_operation(run, "fence", "auto", victim, victim, "split brain at start", obs)
        run.halt(f"split brain at start: both databases were writable; the {victim} database is being fenced")
        run.set_op(pending=True)  # the fence just emitted is still outstanding
        return
    if writable:
        run.set(active=writable[0])
    run.goto("steady", f"roles derived from PostgreSQL: active region {run.state.active}")
    _watch(run, obs, policy)


def _resume(run: _Run, obs: Observations, policy: Policy) -> None:
    """Carry on with an operation whose step is not outstanding (after a restart, a Resume, a self-fence wait
    or a failed failback promotion). What PostgreSQL says decides, so a completed step is never repeated:
    a target already out of recovery was promoted, whatever the journal says."""
    op = run.op
    src, tgt = op.source, op.target
    promoted = _in_recovery(obs, tgt) is False
    if op.kind in ("fence", "unfence"):
        _finish(run, "succeeded" if _writable(obs, src) == (op.kind == "unfence") else "failed")
        run.goto("steady", f"{op.kind} of the {src} database settled")
        return
    if op.kind == "failover":
        if promoted and _writable(obs, src):
            run.alert("critical", f"both databases accept writes during {op.id}: fencing the {src} database again")
            _begin_step(run, "fence", "old primary writable again")
        elif op.step == "wait_self_fence":
            _wait_self_fence(run, obs, policy)
        elif op.step in ("fence", "promote") and promoted:
            run.set_op(steps=(*op.steps, ("promote", 0.0)), promoted_lsn=_db_lsn(obs, tgt))
            _begin_step(run, "dns", f"the {tgt} database is already promoted")
        elif op.step == "fence":
            _begin_step(run, "fence", "resuming: fence the old primary")
        elif op.step == "promote":
            if _in_recovery(obs, tgt) is True:
                _begin_step(run, "promote", "resuming: promote")
            else:
                run.alert_once(f"resume-wait:{op.id}", "warning", f"{op.id}: waiting for the {tgt} database")
        elif op.step == "dns":
            _begin_step(run, "dns", "resuming: switch DNS")
        return
    # failback: source dr (fenced), target primary
    if op.step == "rejoin":
        if _in_recovery(obs, src) is True:
            run.set_op(steps=(*op.steps, ("rejoin", 0.0)))
            _finish(run, "succeeded", new_active=tgt)
            run.goto("steady", f"failback done: the {src} database is a standby again")
        else:
            _begin_step(run, "rejoin", "resuming: rejoin")
    elif op.step == "dns":
        _begin_step(run, "dns", "resuming: switch DNS")
    elif op.step in ("fence", "promote", "unfence") and promoted:
        # The primary took the role (perhaps after its promotion was reported failed): go forward, never back.
        now_lsn = _db_lsn(obs, tgt)
        lost = max(0, op.fence_lsn - now_lsn) if op.fence_lsn is not None and now_lsn is not None else None
        run.set_op(steps=(*op.steps, ("promote", 0.0)), promoted_lsn=now_lsn, lost_bytes_estimate=lost)
        _begin_step(run, "dns", f"the {tgt} database is promoted")
    elif op.step == "fence":
        _begin_step(run, "fence", "resuming: fence the DR database")
    elif op.step == "promote" and _in_recovery(obs, tgt) is True:
        _begin_step(run, "promote", "resuming: promote")
    elif op.step == "unfence" and _in_recovery(obs, tgt) is True:
        # Confirmed: the primary is still a standby, so letting the DR database write again is safe.
        _begin_step(run, "unfence", "rolling back: the primary database was not promoted")
    else:
        run.alert_once(f"resume-wait:{op.id}", "warning", f"{op.id}: waiting for the {tgt} database to answer")


def _db_lsn(obs: Observations, region: Region) -> int | None:
    db = _db(obs, region)
    return db.current_lsn if db else None


def _wait_self_fence(run: _Run, obs: Observations, policy: Policy) -> None:
    """The old primary could not be reached to fence it: wait until its own agent has surely fenced it.

    If it answers again we fence it ourselves (fence is idempotent and confirms). While anything says it may
    still be in contact (and so not fencing itself), the deadline moves out: a partition that heals for the
    primary but not for us must not become two writers.
    """
    op = run.op
    if _reachable(obs, op.source):
        _begin_step(run, "fence", f"the {op.source} database answers again: fence it")
        return
    deadline = op.fence_deadline or run.now
    if _old_primary_may_have_contact(obs, policy):
        later = run.now + policy.self_fence_margin
        if later > deadline:
            deadline = later
            run.alert_once(
                f"wait-extended:{op.id}",
                "warning",
                f"{op.id}: the old primary may still be in contact with the peer or a witness, so it may not "
                f"fence itself; promotion waits (now until {deadline.isoformat()})",
            )
    if deadline != op.fence_deadline:
        run.set_op(fence_deadline=deadline)
    if run.now >= deadline:
        _begin_step(run, "promote", "the old primary's self-fence deadline passed")


def _watch(run: _Run, obs: Observations, policy: Policy) -> None:
    """Steady, suspect, confirming, isolated and failback_ready: count checks of the active region."""
    state = run.state
    active = state.active
    passive = other(active)
    if _writable(obs, passive):
        if active == "dr" or _writable(obs, active):
            run.alert("critical", f"split brain risk: the {passive} database accepts writes; fencing it")
            _start_operation(run, "fence", "auto", passive, passive, f"the {passive} database is writable", obs)
        else:
            run.halt(f"the {passive} database accepts writes although {active} is active: promoted outside the agent?")
        return
    if active == "primary" and not state.switches.paused and _partition_fence_to_lift(obs, policy):
        run.alert_once(
            "lift:primary",
            "warning",
            "the primary fenced itself in a partition that has healed and no failover happened: unfencing it",
        )
        _start_operation(
            run,
            "unfence",
            "auto",
            "primary",
            "primary",
            "the partition healed; the DR side still follows the primary",
            obs,
            first_step="unfence",
        )
        return
    ok = check_ok(obs, active)
    if ok:
        run.set(failures=0, suspect_since=None)
    else:
        run.set(failures=state.failures + 1, suspect_since=state.suspect_since or run.now)
    isolated = _isolation(run.state, obs, policy)
    if isolated:
        run.set(recoveries=0)
        run.goto("isolated", isolated)
        run.alert_once(f"isolated:{isolated}", "warning", f"DR isolated, no automatic action: {isolated}")
        return
    if active == "dr":
        _watch_dr_active(run, obs, policy, ok)
        return
    if ok:
        run.goto("steady", "the primary region is healthy")
        return
    if run.state.failures < policy.failover_threshold:
        run.goto("suspect", f"{run.state.failures} consecutive failed check(s) of the primary region")
        return
    run.goto("confirming", f"{run.state.failures} consecutive failed checks of the primary region")
    _confirm(run, obs, policy)


def _partition_fence_to_lift(obs: Observations, policy: Policy) -> bool:
    """Whether the primary is fenced only because its agent lost contact for a while, and everything now says
    it should take writes again: its agent reports the fence (``fenced``: the agent's own, not an operator's
    hand edit, which the agent does not know of), its database answers, is no standby and is read-only, the
    standby here was never promoted, the application's health URL answers 2xx and no witness says otherwise.

    Without this, a one-sided blip of the primary's links (a partition shorter than any failover) would leave
    the service read-only until someone woke up. It is the DR agent — the one actor that fences before every
    promotion, under the same serialisation — that lifts it, so the lift can never race its own fence."""
    primary, standby, peer = _db(obs, "primary"), _db(obs, "dr"), obs.peer
    if primary is None or not primary.reachable or primary.in_recovery is not False or primary.read_only is not True:
        return False
    if standby is None or not standby.reachable or standby.in_recovery is not True:
        return False
    if peer is None or not peer.reachable or peer.fenced is not True or peer.active not in (None, "primary"):
        return False
    if peer.contact is not True:  # an asymmetric cut: its agent would fence it again at once
        return False
    health = obs.health.get("primary")
    if health is not None and not health.ok:
        return False
    answered = [w for w in obs.witnesses if w.reachable]
    return not (policy.witnesses and (not answered or any(not w.ok for w in answered)))


def _confirm(run: _Run, obs: Observations, policy: Policy) -> None:
    """The threshold is reached: vetoes, a second vantage point, guards, then the switches.

    Vetoes (each means the primary is alive): WAL still arriving at the standby (Patroni #3453), a witness
    seeing it healthy, the peer reporting its database writable. Vetoed or unconfirmed, the machine stays in
    ``confirming`` (status shows why) rather than bouncing to ``suspect`` every round, which would write two
    transitions per probe into the permanent history for as long as the health URL fails.
    """
    state = run.state
    standby = _db(obs, "dr")
    prev = state.last_standby
    progress = False
    if standby is not None and standby.reachable and prev is not None:
        if standby.receive_lsn is not None and prev.receive_lsn is not None and standby.receive_lsn > prev.receive_lsn:
            progress = True
        if (
            standby.last_receipt is not None
            and prev.last_receipt is not None
            and standby.last_receipt > prev.last_receipt
        ):
            progress = True
    witness_sees = any(w.reachable and w.ok for w in obs.witnesses)
    peer = obs.peer
    peer_sees = peer is not None and peer.reachable and peer.db_writable is True
    witness_denies = any(w.reachable and not w.ok for w in obs.witnesses)
    peer_denies = peer is not None and peer.reachable and (peer.db_reachable is False or peer.db_writable is False)
    confirmed = witness_denies or peer_denies or policy.vantage == "single"
    vetoes = (
        GuardResult("wal_progress", not progress, False, "WAL still arriving" if progress else "no WAL progress"),
        GuardResult(
            "witness_view",
            not witness_sees,
            False,
            "a witness sees the primary healthy" if witness_sees else "no witness sees the primary healthy",
        ),
        GuardResult(
            "peer_view",
            not peer_sees,
            False,
            "the peer reports its database writable" if peer_sees else "the peer does not report a writable database",
        ),
        GuardResult(
            "confirmation",
            confirmed,
            False,
            "a second vantage point agrees" if confirmed else "no second vantage point confirms yet",
        ),
    )
    guards = vetoes + evaluate_guards(state, obs, run.now, policy, forced=False, trigger="auto")
    run.set(guards=guards)
    vetoed = [g for g in vetoes[:3] if not g.ok]
    if vetoed:
        names = ", ".join(g.detail for g in vetoed)
        run.alert_once(
            f"veto:{'|'.join(g.name for g in vetoed)}",
            "warning",
            f"primary region failing our checks, but no failover: {names}",
        )
        return
    if not confirmed:
        run.alert_once("unconfirmed", "warning", "primary region failing our checks; no witness or peer confirms yet")
        return
    switches = state.switches
    enabled = switches.auto_failover and not switches.paused
    flap = next(g for g in guards if g.name == "flap_budget")
    if enabled and not flap.ok:
        run.halt(f"flap budget exhausted: {flap.detail}; an operator must act (failover, failback or resume)")
        return
    reasons: list[str] = []
    if not switches.auto_failover:
        reasons.append("automatic failover is disabled")
    if switches.paused:
        reasons.append("automation is paused")
    refused = blocking(guards[len(vetoes) :], forced=False)
    reasons.extend(f"guard {g.name}: {g.detail}" for g in refused)
    if reasons:
        run.alert_once(
            "no-failover:" + "|".join(sorted({r.split(":")[0] for r in reasons})),
            "critical",
            "the primary region is down (confirmed) but no failover: " + "; ".join(reasons),
        )
        return
    _start_operation(
        run, "failover", "auto", "primary", "dr", f"primary region down after {state.failures} checks", obs
    )


def _watch_dr_active(run: _Run, obs: Observations, policy: Policy, ok: bool) -> None:
    """Active region dr: count the primary region's recovery towards a failback; the only automatic move back
    is that zero-loss switchover (there is no automatic "failover" from dr to primary)."""
    state = run.state
    if not ok:
        run.set(recoveries=0)
        run.goto("suspect", f"{state.failures} consecutive failed check(s) of the active DR region")
        if state.failures >= policy.failover_threshold:
            run.alert_once(
                "dr-failing",
                "critical",
                f"the active DR region failed {state.failures} consecutive checks; no automatic action exists",
            )
        return
    ready, detail = _failback_readiness(obs, policy)
    run.set(recoveries=state.recoveries + 1 if ready else 0)
    if run.state.recoveries < policy.failback_threshold:
        run.goto("steady", "the DR region is active and healthy")
        return
    run.goto("failback_ready", f"{run.state.recoveries} consecutive healthy checks of the primary region; {detail}")
    guards = evaluate_guards(run.state, obs, run.now, policy, forced=False, trigger="auto")
    run.set(guards=guards)
    switches = state.switches
    if not switches.auto_failback or switches.paused:
        why = "automatic failback is disabled" if not switches.auto_failback else "automation is paused"
        run.alert_once("failback-ready", "info", f"failback is possible ({why}): run dr failback")
        return
    flap = next(g for g in guards if g.name == "flap_budget")
    if not flap.ok:
        run.halt(f"flap budget exhausted: {flap.detail}; an operator must act (failback or resume)")
        return
    refused = blocking(guards, forced=False)
    if refused:
        run.alert_once(
            "no-failback:" + "|".join(g.name for g in refused),
            "warning",
            "failback not started: " + "; ".join(f"{g.name}: {g.detail}" for g in refused),
        )
        return
    _start_operation(run, "failback", "auto", "dr", "primary", "the primary region recovered", obs)


# --- step results ----------------------------------------------------------------------------------------------


def step_done(state: State, result: StepResult, now: datetime, policy: Policy) -> Decision:
    """Advance the operation by the outcome of its outstanding step. A result for anything else (a stale
    operation id or step) is ignored: only the step the machine is waiting for can move it."""
    op = state.operation
    if op is None or not op.pending or result.operation_id != op.id or result.step != op.step:
        return Decision(state)
    run = _Run(state, now)
    steps = (*op.steps, (result.step, result.seconds)) if result.ok else op.steps
    run.set_op(pending=False, steps=steps)
    if op.kind == "fence":
        _fence_op_done(run, result)
    elif op.kind == "unfence":
        _unfence_op_done(run, result)
    elif op.kind == "failover":
        _failover_step_done(run, result, policy)
    else:
        _failback_step_done(run, result)
    return run.decision()


def _why(result: StepResult) -> str:
    return result.error or "no error message"


def _fence_op_done(run: _Run, result: StepResult) -> None:
    """The split-brain fence: done, or retried when seen writable again; a reachable database we cannot fence
    while another one writes is for a human."""
    region = run.op.source
    halted = run.state.phase == "halted"
    if result.ok:
        _finish(run, "succeeded")
        if not halted:
            run.goto("steady", f"the {region} database is fenced")
    elif result.detail.get("reachable") is False:
        _finish(run, "failed")
        run.alert("warning", f"could not reach the {region} database to fence it: {_why(result)}")
        if not halted:
            run.goto("steady", f"the {region} database vanished before it was fenced")
    else:
        _finish(run, "failed")
        run.halt(f"could not fence the writable {region} database: {_why(result)}")


def _unfence_op_done(run: _Run, result: StepResult) -> None:
    """Lifting a partition's fence: done, or reported once (the next round tries again if it still applies)."""
    region = run.op.source
    if result.ok:
        _finish(run, "succeeded")
        run.goto("steady", f"the {region} database takes writes again")
    else:
        _finish(run, "failed")
        run.alert_once(f"unfence:{region}", "warning", f"could not unfence the {region} database: {_why(result)}")
        run.goto("suspect", f"the {region} database is still fenced")


def _failover_step_done(run: _Run, result: StepResult, policy: Policy) -> None:
    op = run.op
    if op.step == "fence":
        if result.ok:
            lsn = result.detail.get("lsn")
            run.set_op(fence_lsn=int(lsn) if lsn is not None else None)
            _begin_step(run, "promote", f"the {op.source} database is fenced")
        elif op.allow_unfenced:
            # The operator's explicit choice: promote without fencing, recorded as a data-loss risk.
            run.set_op(data_loss_risk=True)
            run.alert(
                "critical",
                f"{op.id}: promoting the {op.target} database WITHOUT fencing the {op.source} database "
                f"(allow_unfenced): {_why(result)}",
            )
            _begin_step(run, "promote", "promoting unfenced (allow_unfenced)")
        elif result.detail.get("reachable") is False:
            base = run.state.last_contact or run.now
            deadline = max(run.now, base + policy.self_fence_margin)
            run.set_op(step="wait_self_fence", fence_deadline=deadline)
            run.alert(
                "warning",
                f"{op.id}: the {op.source} database is unreachable; waiting until {deadline.isoformat()} "
                "for its own agent to fence it",
            )
        else:
            run.halt(f"could not fence the reachable {op.source} database: {_why(result)}")
    elif op.step == "promote":
        if result.ok:
            promoted = result.detail.get("promoted_lsn")
            run.set_op(promoted_lsn=int(promoted) if promoted is not None else None)
            run.set_op(lost_bytes_estimate=_lost_bytes(run.op, result.detail))
            _begin_step(run, "dns", f"the {op.target} database is promoted")
        else:
            run.halt(f"promotion of the {op.target} database failed: {_why(result)}")
    elif op.step == "dns":
        if result.ok:
            _finish(run, "succeeded", new_active=op.target)
            run.goto("steady", f"failover done: the {op.target} region is active")
            run.alert("critical" if op.data_loss_risk else "warning", f"failover {op.id} done: {op.target} is active")
        else:
            run.halt(f"database promoted but DNS not switched: {_why(result)}")


def _failback_step_done(run: _Run, result: StepResult) -> None:
    """The zero-loss switchover back: fence dr → promote primary at least to dr's fence LSN → DNS → rejoin dr.
    Before the primary is promoted every failure rolls back (the DR database writes again); after it, the
    only way is forward."""
    op = run.op
    if op.step == "fence":
        if result.ok:
            lsn = result.detail.get("lsn")
            run.set_op(fence_lsn=int(lsn) if lsn is not None else None)
            _begin_step(run, "promote", f"the {op.source} database is fenced")
        else:
            run.alert("warning", f"{op.id}: fencing the {op.source} database failed ({_why(result)}); rolling back")
            _begin_step(run, "unfence", "rolling back a failed fence")
    elif op.step == "promote":
        if result.ok:
            promoted = result.detail.get("promoted_lsn")
            promoted_lsn = int(promoted) if promoted is not None else None
            lost = (
                max(0, op.fence_lsn - promoted_lsn) if op.fence_lsn is not None and promoted_lsn is not None else None
            )
            run.set_op(promoted_lsn=promoted_lsn, lost_bytes_estimate=lost)
            _begin_step(run, "dns", f"the {op.target} database is promoted")
        else:
            # Unfencing dr is only safe once the primary is seen still in recovery: the next observation decides
            # (forward to DNS if it was promoted after all, back otherwise).
            run.set_op(step="unfence")
            run.alert(
                "warning",
                f"{op.id}: promoting the {op.target} database failed ({_why(result)}); rolling back once it is "
                "confirmed still a standby",
            )
    elif op.step == "dns":
        if result.ok:
            _begin_step(run, "rejoin", "DNS points at the primary region")
        else:
            run.halt(f"database promoted but DNS not switched: {_why(result)}")
    elif op.step == "rejoin":
        if result.ok:
            _finish(run, "succeeded", new_active=op.target)
            run.goto("steady", "failback done: the primary region is active")
        else:
            warning = f"the {op.source} database stays fenced read-only ({_why(result)}); run dr rejoin on the DR host"
            _finish(run, "succeeded", new_active=op.target, warning=warning)
            run.goto("steady", "failback done; rejoin of the DR database failed")
            run.alert("warning", f"{op.id}: {warning}")
    elif op.step == "unfence":
        if result.ok:
            _finish(run, "rolled_back")
            run.goto("steady", "failback rolled back: the DR region stays active")
            run.alert("warning", f"failback {op.id} rolled back: the {op.source} database takes writes again")
        else:
            run.halt(f"rolling back failback: the {op.source} database may still be fenced: {_why(result)}")


# --- commands --------------------------------------------------------------------------------------------------


def command(state: State, cmd: Command, now: datetime, policy: Policy, obs: Observations | None) -> Decision | Refusal:
    """An operator's request. Switches and Resume always apply; a role change is refused with 409 while an
    operation runs (one at a time, steps never cancelled) and 412 when a guard refuses."""
    run = _Run(state, now)
    if isinstance(cmd, SetSwitch):
        run.set(switches=replace(state.switches, **{cmd.name: cmd.value}))
        run.actions.append(Record("switch", {"name": cmd.name, "value": cmd.value}))
        return run.decision()
    if isinstance(cmd, Resume):
        if state.phase != "halted":
            return run.decision()
        # An operator acted: the flap budget starts afresh (the cooldown still holds).
        run.set(role_changes=(), alerted="")
        run.goto("starting", "resumed by an operator: re-deriving roles from PostgreSQL")
        return run.decision()
    if state.operation is not None:
        op = state.operation
        return Refusal(409, f"operation {op.id} ({op.kind}, step {op.step}) is in progress")
    if state.phase == "starting":
        return Refusal(409, "starting: roles are not derived from PostgreSQL yet")
    if obs is None:
        return Refusal(412, "no probe results yet")
    if isinstance(cmd, Failover):
        if state.active != "primary":
            return Refusal(412, "the DR region is already active (use failback)")
        guards = evaluate_guards(state, obs, now, policy, forced=cmd.force, trigger="manual")
        refused = blocking(guards, forced=cmd.force)
        if refused:
            return Refusal(412, "refused by " + ", ".join(f"{g.name} ({g.detail})" for g in refused), guards)
        run.set(guards=guards, role_changes=())
        _start_operation(
            run,
            "failover",
            "manual",
            "primary",
            "dr",
            cmd.reason or "manual failover",
            obs,
            forced=cmd.force,
            allow_unfenced=cmd.allow_unfenced,
        )
        return run.decision()
    if state.active != "dr":
        return Refusal(412, "the primary region is already active")
    guards = evaluate_guards(state, obs, now, policy, forced=cmd.force, trigger="manual")
    refused = blocking(guards, forced=cmd.force)
    if refused:
        return Refusal(412, "refused by " + ", ".join(f"{g.name} ({g.detail})" for g in refused), guards)
    run.set(guards=guards, role_changes=())
    _start_operation(run, "failback", "manual", "dr", "primary", "manual failback", obs, forced=cmd.force)
    return run.decision()


def initial_state(switches: Switches, persisted: State | None) -> State:
    """The state at agent start: phase ``starting`` (roles are re-derived from PostgreSQL), keeping what must
    survive a restart — the active region, an interrupted operation (no longer outstanding: the executor that
    ran its step is gone), the switches as last set, the flap/cooldown counters and the last known primary
    position. Per-episode counters start from zero."""
    if persisted is None:
        return State(switches=switches)
    op = persisted.operation
    return State(
        phase="starting",
        active=persisted.active,
        switches=persisted.switches,
        operation=replace(op, pending=False) if op else None,
        last_transition=persisted.last_transition,
        role_changes=persisted.role_changes,
        last_role_change=persisted.last_role_change,
        last_contact=persisted.last_contact,
        last_healthy=persisted.last_healthy,
        vantage=persisted.vantage,
    )


# --- primary side ----------------------------------------------------------------------------------------------


def primary_side_contact(obs: Observations, policy: Policy) -> bool:
    """The primary-side agent is in contact when the peer answers or a MAJORITY of witnesses answers 2xx.

    2xx, not merely "an answer": a witness answering non-2xx does not see the primary healthy, which is
    exactly what lets the DR side confirm a failover, so it must not keep the primary writable. A majority,
    so the DR side can rule contact out by what it sees itself (:func:`_old_primary_may_have_contact`).
    """
    if _peer_reachable(obs):
        return True
    if policy.witnesses:
        healthy = sum(1 for w in obs.witnesses if w.reachable and w.ok)
        return healthy >= policy.witnesses // 2 + 1
    return False


def decide_primary_side(
    state: PrimarySideState, obs: Observations, now: datetime, policy: Policy
) -> tuple[PrimarySideState, tuple[Action, ...]]:
    """The agent beside the primary: fence the local database when cut off for ``partition_timeout`` (the DR
    side may be promoting) or when the DR side reports itself active while we still take writes.

    Never unfences (that is ``dr rejoin`` or an operator). With neither peer nor witness configured it cannot
    tell a partition from anything else and never self-fences (single vantage point). A fence re-arms once the
    database is seen writable again while in contact (an operator unfenced it).
    """
    started = state.started_at or now
    contact = primary_side_contact(obs, policy)
    last = obs.at if contact else state.last_contact
    writable = _writable(obs, "primary")
    fenced = state.fenced
    if fenced and contact and writable:
        fenced = False
    actions: list[Action] = []
    peer = obs.peer
    if writable and peer is not None and peer.reachable and peer.active == "dr":
        reason = "the DR region is active (the peer says so) but this database accepts writes"
        actions.append(FenceSelf(reason))
        if not fenced:
            actions.append(Alert("critical", f"fencing the local database: {reason}"))
        fenced = True
    elif policy.vantage == "multi" and now - (last or started) >= policy.partition_timeout and (not fenced or writable):
        reason = (
            f"no contact with the peer or a majority of witnesses since {(last or started).isoformat()} "
            f"(partition_timeout {policy.partition_timeout.total_seconds():.0f} s)"
        )
        actions.append(FenceSelf(reason))
        if not fenced:
            actions.append(Alert("critical", f"fencing the local database: {reason}"))
        fenced = True
    return PrimarySideState(last_contact=last, fenced=fenced, started_at=started), tuple(actions)
