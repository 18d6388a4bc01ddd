"""The DR state machine's values: its state, the operations and guards in it, the actions it asks for, the
commands it takes, and their exact JSON (the state file).

Pure, like the rules in ``machine`` that read and return them: frozen dataclasses and literals, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple, Protocol

from kybdr_agent.dr.observations import Region

Phase = Literal[
    "starting",
    "steady",
    "suspect",
    "confirming",
    "fencing",
    "promoting",
    "dns_switching",
    "failback_ready",
    "switching_back",
    "isolated",
    "halted",
]
PHASES: tuple[Phase, ...] = (
    "starting",
    "steady",
    "suspect",
    "confirming",
    "fencing",
    "promoting",
    "dns_switching",
    "failback_ready",
    "switching_back",
    "isolated",
    "halted",
)
Severity = Literal["info", "warning", "critical"]
OperationKind = Literal["failover", "failback", "fence", "unfence"]
Trigger = Literal["auto", "manual"]
StepName = Literal["fence", "wait_self_fence", "promote", "dns", "rejoin", "unfence"]
Outcome = Literal["succeeded", "failed", "rolled_back"]
Vantage = Literal["single", "multi"]
SwitchName = Literal["auto_failover", "auto_failback", "paused"]

STATE_VERSION = 1


class _DRSettingsLike(Protocol):
    """The fields of ``kybdr_agent.config.DRSettings`` the machine reads.

    A protocol rather than an import so this module stays pure (the layering test lets a pure module import
    only other pure modules); ``DRSettings`` satisfies it structurally.
    """

    @property
    def failover_threshold(self) -> int: ...
    @property
    def failback_threshold(self) -> int: ...
    @property
    def max_lag_bytes(self) -> int: ...
    @property
    def max_staleness(self) -> timedelta: ...
    @property
    def cooldown(self) -> timedelta: ...
    @property
    def flap_budget(self) -> int: ...
    @property
    def partition_timeout(self) -> timedelta: ...
    @property
    def health_check_interval(self) -> timedelta: ...
    @property
    def probe_timeout(self) -> timedelta: ...
    @property
    def witness_urls(self) -> list[str]: ...
    @property
    def peer_url(self) -> str | None: ...


@dataclass(frozen=True)
class Policy:
    """The tunables the machine obeys, taken once from ``[dr]`` so the rules never read settings directly."""

    failover_threshold: int
    failback_threshold: int
    max_lag_bytes: int
    max_staleness: timedelta
    cooldown: timedelta
    flap_budget: int
    partition_timeout: timedelta
    interval: timedelta
    probe_timeout: timedelta
    witnesses: int
    peer: bool
    flap_window: timedelta = timedelta(hours=1)

    @classmethod
    def from_settings(cls, dr: _DRSettingsLike) -> Policy:
        return cls(
            failover_threshold=dr.failover_threshold,
            failback_threshold=dr.failback_threshold,
            max_lag_bytes=dr.max_lag_bytes,
            max_staleness=dr.max_staleness,
            cooldown=dr.cooldown,
            flap_budget=dr.flap_budget,
            partition_timeout=dr.partition_timeout,
            interval=dr.health_check_interval,
            probe_timeout=dr.probe_timeout,
            witnesses=len(dr.witness_urls),
            peer=dr.peer_url is not None,
        )

    @property
    def vantage(self) -> Vantage:
        """ "single" when no witness and no peer are configured: a partition then looks like a dead primary."""
        return "multi" if self.witnesses or self.peer else "single"

    @property
    def self_fence_margin(self) -> timedelta:
        """How long past the old primary's last possible contact its own agent has surely fenced it.

        Its agent fences after ``partition_timeout`` without contact; it notices at its next probe round (up to
        one interval later) and each probe may take ``probe_timeout``.
        """
        return self.partition_timeout + self.probe_timeout + self.interval


@dataclass(frozen=True)
class Switches:
    """Operator switches, persisted: automation is opt-in (both off by default) and can be paused."""

    auto_failover: bool = False
    auto_failback: bool = False
    paused: bool = False


@dataclass(frozen=True)
class Operation:
    """One failover, failback or split-brain fence in progress: what was decided, on which inputs, how far.

    ``step`` is the step under way (its action emitted, ``pending``) or about to be resumed (``pending`` False
    after a restart or a halt); ``steps`` the completed ones with their seconds, so a restart never repeats one.
    """

    id: str
    kind: OperationKind
    trigger: Trigger
    forced: bool
    allow_unfenced: bool
    source: Region
    target: Region
    started_at: datetime
    reason: str
    step: StepName
    fence_deadline: datetime | None = None
    fence_lsn: int | None = None
    frozen: Mapping[str, Any] = field(default_factory=dict)
    steps: tuple[tuple[str, float], ...] = ()
    data_loss_risk: bool = False
    promoted_lsn: int | None = None
    lost_bytes_estimate: int | None = None
    pending: bool = False

    @property
    def outstanding(self) -> bool:
        """The executor is running this step's action: nothing else may start until its result arrives."""
        return self.pending

    def completed(self, step: str) -> bool:
        return any(name == step for name, _ in self.steps)


@dataclass(frozen=True)
class GuardResult:
    """One precondition of a role change; ``soft`` ones may be skipped by ``force``, hard ones never."""

    name: str
    ok: bool
    soft: bool
    detail: str


@dataclass(frozen=True)
class Transition:
    from_phase: Phase
    to_phase: Phase
    at: datetime
    reason: str


class LastHealthy(NamedTuple):
    """The active database when last seen writable: the reference for lag and timeline guards."""

    lsn: int | None
    timeline: int | None
    at: datetime


class LastStandby(NamedTuple):
    """The standby in the previous observation: WAL progress since then means the primary is alive."""

    receive_lsn: int | None
    last_receipt: datetime | None


@dataclass(frozen=True)
class State:
    """Everything the machine remembers between observations; persisted (``to_json``) across restarts."""

    phase: Phase = "starting"
    active: Region = "primary"
    switches: Switches = Switches()
    failures: int = 0
    suspect_since: datetime | None = None
    recoveries: int = 0
    operation: Operation | None = None
    last_transition: Transition | None = None
    role_changes: tuple[datetime, ...] = ()
    last_role_change: datetime | None = None
    halted_reason: str = ""
    last_contact: datetime | None = None
    last_healthy: LastHealthy | None = None
    last_standby: LastStandby | None = None
    alerted: str = ""
    guards: tuple[GuardResult, ...] = ()
    vantage: Vantage = "multi"

    def to_json(self) -> dict[str, Any]:
        return _state_to_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> State:
        return _state_from_json(data)


# --- actions ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fence:
    """Make ``region``'s database refuse writes (read-only + end sessions, or the fence command)."""

    operation_id: str
    region: Region


@dataclass(frozen=True)
class Promote:
    """Promote ``region``'s standby after it replayed everything (and at least ``at_least_lsn``)."""

    operation_id: str
    region: Region
    at_least_lsn: int | None


@dataclass(frozen=True)
class SwitchDns:
    operation_id: str
    region: Region


@dataclass(frozen=True)
class Rejoin:
    """Turn ``region``'s (fenced) database into a standby of the new primary."""

    operation_id: str
    region: Region


@dataclass(frozen=True)
class Unfence:
    """Let ``region``'s database take writes again (roll back a failback's fence)."""

    operation_id: str
    region: Region


@dataclass(frozen=True)
class FenceSelf:
    """Primary side: fence the local database (no step result is expected)."""

    reason: str


@dataclass(frozen=True)
class Alert:
    severity: Severity
    message: str


@dataclass(frozen=True)
class Record:
    """A history entry to append (kinds: transition, intent, operation, switch)."""

    kind: str
    fields: Mapping[str, Any]


StepAction = Fence | Promote | SwitchDns | Rejoin | Unfence
Action = Fence | Promote | SwitchDns | Rejoin | Unfence | FenceSelf | Alert | Record


@dataclass(frozen=True)
class StepResult:
    """The executor's report on one step action: ``operation_id`` and ``step`` echo the operation's."""

    operation_id: str
    step: str
    ok: bool
    seconds: float
    detail: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""


# --- commands --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failover:
    force: bool = False
    allow_unfenced: bool = False
    reason: str = ""


@dataclass(frozen=True)
class Failback:
    force: bool = False


@dataclass(frozen=True)
class SetSwitch:
    name: SwitchName
    value: bool


@dataclass(frozen=True)
class Resume:
    pass


Command = Failover | Failback | SetSwitch | Resume


@dataclass(frozen=True)
class Decision:
    state: State
    actions: tuple[Action, ...] = ()


@dataclass(frozen=True)
class Refusal:
    """A command not carried out: 409 while another operation runs, 412 when a guard refuses."""

    status: int
    reason: str
    guards: tuple[GuardResult, ...] = ()


@dataclass(frozen=True)
class PrimarySideState:
    """The primary-side agent's memory: when it last had contact, and whether it fenced its database."""

    last_contact: datetime | None = None
    fenced: bool = False
    started_at: datetime | None = None


# --- persistence -----------------------------------------------------------------------------------------------


def dt_text(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parsedt_text(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def _operation_to_json(op: Operation) -> dict[str, Any]:
    return {
        "id": op.id,
        "kind": op.kind,
        "trigger": op.trigger,
        "forced": op.forced,
        "allow_unfenced": op.allow_unfenced,
        "source": op.source,
        "target": op.target,
        "started_at": dt_text(op.started_at),
        "reason": op.reason,
        "step": op.step,
        "fence_deadline": dt_text(op.fence_deadline),
        "fence_lsn": op.fence_lsn,
        "frozen": dict(op.frozen),
        "steps": [[name, seconds] for name, seconds in op.steps],
        "data_loss_risk": op.data_loss_risk,
        "promoted_lsn": op.promoted_lsn,
        "lost_bytes_estimate": op.lost_bytes_estimate,
        "pending": op.pending,
    }


def _operation_from_json(data: Mapping[str, Any]) -> Operation:
    started = _parsedt_text(data["started_at"])
    assert started is not None
    return Operation(
        id=data["id"],
        kind=data["kind"],
        trigger=data["trigger"],
        forced=bool(data["forced"]),
        allow_unfenced=bool(data["allow_unfenced"]),
        source=data["source"],
        target=data["target"],
        started_at=started,
        reason=data["reason"],
        step=data["step"],
        fence_deadline=_parsedt_text(data.get("fence_deadline")),
        fence_lsn=data.get("fence_lsn"),
        frozen=dict(data.get("frozen") or {}),
        steps=tuple((str(name), float(seconds)) for name, seconds in data.get("steps") or ()),
        data_loss_risk=bool(data.get("data_loss_risk", False)),
        promoted_lsn=data.get("promoted_lsn"),
        lost_bytes_estimate=data.get("lost_bytes_estimate"),
        pending=bool(data.get("pending", False)),
    )


def _state_to_json(state: State) -> dict[str, Any]:
    """Plain JSON (datetimes as ISO 8601 with their offset) that :func:`_state_from_json` reads back exactly."""
    t = state.last_transition
    return {
        "version": STATE_VERSION,
        "phase": state.phase,
        "active": state.active,
        "switches": {
            "auto_failover": state.switches.auto_failover,
            "auto_failback": state.switches.auto_failback,
            "paused": state.switches.paused,
        },
        "failures": state.failures,
        "suspect_since": dt_text(state.suspect_since),
        "recoveries": state.recoveries,
        "operation": _operation_to_json(state.operation) if state.operation else None,
        "last_transition": (
            {"from": t.from_phase, "to": t.to_phase, "at": dt_text(t.at), "reason": t.reason} if t else None
        ),
        "role_changes": [dt_text(at) for at in state.role_changes],
        "last_role_change": dt_text(state.last_role_change),
        "halted_reason": state.halted_reason,
        "last_contact": dt_text(state.last_contact),
        "last_healthy": (
            {
                "lsn": state.last_healthy.lsn,
                "timeline": state.last_healthy.timeline,
                "at": dt_text(state.last_healthy.at),
            }
            if state.last_healthy
            else None
        ),
        "last_standby": (
            {"receive_lsn": state.last_standby.receive_lsn, "last_receipt": dt_text(state.last_standby.last_receipt)}
            if state.last_standby
            else None
        ),
        "alerted": state.alerted,
        "guards": [{"name": g.name, "ok": g.ok, "soft": g.soft, "detail": g.detail} for g in state.guards],
        "vantage": state.vantage,
    }


def _state_from_json(data: Mapping[str, Any]) -> State:
    version = data.get("version", STATE_VERSION)
    if version != STATE_VERSION:
        raise ValueError(f"DR state version {version} is not supported (this agent reads {STATE_VERSION})")
    phase = data.get("phase", "starting")
    if phase not in PHASES:
        raise ValueError(f"unknown DR phase {phase!r}")
    switches = data.get("switches") or {}
    t = data.get("last_transition")
    healthy = data.get("last_healthy")
    standby = data.get("last_standby")
    transition_at = _parsedt_text(t["at"]) if t else None
    healthy_at = _parsedt_text(healthy["at"]) if healthy else None
    return State(
        phase=phase,
        active=data.get("active", "primary"),
        switches=Switches(
            auto_failover=bool(switches.get("auto_failover", False)),
            auto_failback=bool(switches.get("auto_failback", False)),
            paused=bool(switches.get("paused", False)),
        ),
        failures=int(data.get("failures", 0)),
        suspect_since=_parsedt_text(data.get("suspect_since")),
        recoveries=int(data.get("recoveries", 0)),
        operation=_operation_from_json(data["operation"]) if data.get("operation") else None,
        last_transition=(
            Transition(t["from"], t["to"], transition_at, t["reason"])
            if t is not None and transition_at is not None
            else None
        ),
        role_changes=tuple(at for at in (_parsedt_text(v) for v in data.get("role_changes") or ()) if at is not None),
        last_role_change=_parsedt_text(data.get("last_role_change")),
        halted_reason=data.get("halted_reason", ""),
        last_contact=_parsedt_text(data.get("last_contact")),
        last_healthy=(
            LastHealthy(healthy.get("lsn"), healthy.get("timeline"), healthy_at)
            if healthy is not None and healthy_at is not None
            else None
        ),
        last_standby=(
            LastStandby(standby.get("receive_lsn"), _parsedt_text(standby.get("last_receipt"))) if standby else None
        ),
        alerted=data.get("alerted", ""),
        guards=tuple(
            GuardResult(str(g["name"]), bool(g["ok"]), bool(g["soft"]), str(g["detail"]))
            for g in data.get("guards") or ()
        ),
        vantage=data.get("vantage", "multi"),
    )
