"""The DR component: probe, decide, execute — one step at a time, run to completion, written down first.

One loop per agent. Every ``health_check_interval`` it takes one round of probes (``probes.Prober``), hands
them to the pure machine (``machine.decide``), commits the new state (the state file, fsynced, so a
restarted agent resumes the same operation instead of repeating it), writes every record the machine asked
for to the history, and then executes the step the machine chose (``executor.StepExecutor``). The step's
result goes back into the machine (``machine.step_done``), which may choose the next step; only when the
operation has no step left does the loop look at the world again. A probe never cancels a step: the
pytransitions lesson (dr-anchors §4).

Operator commands (the API, the CLI) go through the same machine under the same lock (``machine.command``):
a refusal (409 busy, 412 a guard) changes nothing; an accepted command's steps are executed by the same
executor, serialised with the loop's, and the caller gets a job that ends when the operation ends.

Only the lease holder acts (``lease.DrLease``: a lease object in the repository, conditional writes): an
agent that does not hold it keeps watching with its automation paused, and refuses commands with 409.

On the primary side (``dr.role = "primary"``) the loop is smaller: the agent answers as the DR agent's
peer, and fences its own database when it has lost its peer and every witness for ``partition_timeout``, or
when its peer says the DR region has taken over (``machine.decide_primary_side``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

import anyio
from anyio.abc import TaskStatus

from kybdr_agent.clock import Clock
from kybdr_agent.component import Health
from kybdr_agent.config import AgentSettings, DRSettings
from kybdr_agent.dr import machine
from kybdr_agent.dr.dns import DnsSwitcher
from kybdr_agent.dr.drill import run_drill
from kybdr_agent.dr.executor import StepAction, StepExecutor
from kybdr_agent.dr.history import History
from kybdr_agent.dr.lease import DrLease
from kybdr_agent.dr.machine import (
    Alert,
    Decision,
    Failback,
    Failover,
    Fence,
    FenceSelf,
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
)
from kybdr_agent.dr.observations import Observations, Region
from kybdr_agent.dr.probes import Prober
from kybdr_agent.dr.state_file import load_state, save_state
from kybdr_agent.dr.views import health_view, iso, region_ok, status_view
from kybdr_agent.errors import KybdrError
from kybdr_agent.events import DRAlert, DROperationFinished, DRProbed, DRTransition, EventHub
from kybdr_agent.jobs import Job, JobFailed, JobManager
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.telemetry import get_logger

log = get_logger("kybdr_agent.dr")

# A step's own timeouts bound it; this outer bound only keeps a bug from holding the loop forever.
STEP_HARD_LIMIT_SECONDS: Final = 900.0
HISTORY_COPY_SECONDS: Final = 60.0
LEASE_MIN_TTL_SECONDS: Final = 30.0
LOOP_STALE_FACTOR: Final = 3  # /healthz: unhealthy when no round completed for this many intervals (+ probe time)

Command = Failover | Failback | SetSwitch | Resume


class DRUnavailable(KybdrError):
    """DR is not configured on this agent (``dr.enabled`` is false): the API answers 503."""


@dataclass
class DRParts:
    """What the root built for the component: the adapters it drives."""

    prober: Prober
    executor: StepExecutor
    dns: DnsSwitcher | None
    history: History
    lease: DrLease | None
    repository: BlobStore | None
    state_path: Path


@dataclass
class _Waiter:
    done: anyio.Event = field(default_factory=anyio.Event)
    record: dict[str, Any] | None = None


class DRComponent:
    name = "dr"

    def __init__(
        self, settings: AgentSettings, parts: DRParts, *, jobs: JobManager, events: EventHub, clock: Clock
    ) -> None:
        self.settings = settings.dr
        self.region_names: dict[Region, str] = {
            "primary": settings.dr.primary_region or "primary",
            "dr": settings.dr.dr_region or "dr",
        }
        self.parts = parts
        self.jobs = jobs
        self.events = events
        self.clock = clock
        self.policy = Policy.from_settings(settings.dr)
        self.lock = anyio.Lock()  # the machine's state: decide, command and step_done never interleave
        self.exec_lock = anyio.Lock()  # one step executing at a time, the loop's or a command's
        self.last_obs: Observations | None = None
        self.heartbeat = time.monotonic()
        self.executing: str | None = None  # the step running now, for status and health
        self.holder = False
        self.lease_holder: str | None = None
        self._waiters: dict[str, _Waiter] = {}
        self._wake = anyio.Event()
        self._copy_now = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        persisted = load_state(parts.state_path)
        switches = Switches(auto_failover=self.settings.auto_failover, auto_failback=self.settings.auto_failback)
        restored = State.from_json(persisted["machine"]) if persisted and "machine" in persisted else None
        self.state: State = machine.initial_state(switches, restored)
        self.primary_side = PrimarySideState(last_contact=None, fenced=False, started_at=clock())
        if persisted and "primary_side" in persisted:
            # The partition clock survives a restart: an agent restarted mid-partition must fence itself when
            # the DR side expects it to (its deadline counts from the last contact), not partition_timeout later.
            side = persisted["primary_side"]
            contact = side.get("last_contact")
            self.primary_side = replace(
                self.primary_side,
                fenced=bool(side.get("fenced")),
                last_contact=datetime.fromisoformat(contact) if isinstance(contact, str) else None,
            )
        self._config_switches = (self.settings.auto_failover, self.settings.auto_failback)
        self._lease_ttl = lease_ttl(self.settings)

    @property
    def role(self) -> Literal["dr", "primary"]:
        return self.settings.role

    @property
    def local_region(self) -> Region:
        return "dr" if self.role == "dr" else "primary"

    # --- lifecycle ---------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.parts.lease is not None and self.role == "dr":
                    await self._renew_lease()  # before the first round: know whether we may act
                    tg.start_soon(self._lease_loop, name="dr-lease")
                tg.start_soon(self._loop, name="dr-loop")
                tg.start_soon(self._copy_history_loop, name="dr-history-copy")
                log.info("dr.started", role=self.role, phase=self.state.phase, active=self.state.active)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await self.parts.prober.aclose()
                if self.parts.dns is not None:
                    await self.parts.dns.aclose()

    def health(self) -> Health:
        interval = self.settings.health_check_interval.total_seconds()
        age = time.monotonic() - self.heartbeat
        stale = age > LOOP_STALE_FACTOR * interval + self.settings.probe_timeout.total_seconds() + 5
        ok = self.executing is not None or not stale
        fields = {"dr": {"role": self.role, "state": self.phase(), "active": self.state.active}}
        return Health(
            ok=ok, fields=fields, reason="" if ok else f"the DR loop has not completed a round for {age:.0f} s"
        )

    async def reload(self, settings: AgentSettings) -> None:
        """Thresholds, guards and the auto switches apply at once; addresses, DSNs and role need a restart."""
        new = settings.dr
        fixed = (
            "enabled",
            "role",
            "primary_dsn",
            "standby_dsn",
            "health_check_url",
            "dr_health_check_url",
            "witness_urls",
            "peer_url",
            "route53_zone_id",
            "route53_domain",
            "load_balancer_arn",
            "dr_load_balancer_arn",
            "aws_endpoint_url",
            "pgdata",
            "fence_command",
        )
        changed = [name for name in fixed if getattr(new, name) != getattr(self.settings, name)]
        if changed:
            log.warning("dr.reload_needs_restart", fields=changed, note="these take effect when the agent restarts")
        async with self.lock:
            self.policy = Policy.from_settings(new)
            # A switch the operator changed in the file is applied; one the file still says as before keeps
            # what an operator set through the API (the state file), which survives restarts.
            switches = self.state.switches
            if new.auto_failover != self._config_switches[0]:
                switches = replace(switches, auto_failover=new.auto_failover)
            if new.auto_failback != self._config_switches[1]:
                switches = replace(switches, auto_failback=new.auto_failback)
            self._config_switches = (new.auto_failover, new.auto_failback)
            if switches != self.state.switches:
                self.state = replace(self.state, switches=switches)
                self._save()
        self.settings = replace_fixed(self.settings, new, fixed)

    # --- the loop ----------------------------------------------------------------------------------

    async def _loop(self) -> None:
        interval = self.settings.health_check_interval.total_seconds()
        while True:
            started = time.monotonic()
            try:
                await self.tick()
            except Exception:  # the loop outlives a bug in one round; the watchdog sees the stale heartbeat
                log.exception("dr.round_crashed")
            else:
                self.heartbeat = time.monotonic()
            self._wake = anyio.Event()
            pause = max(0.0, interval - (time.monotonic() - started))
            with anyio.move_on_after(min(pause, self._until_fence_deadline())):
                await self._wake.wait()

    def _until_fence_deadline(self) -> float:
        """Seconds until the old primary's self-fence deadline, when a failover waits for it: the round
        that promotes runs at the deadline, not up to an interval after it."""
        operation = self.state.operation
        if operation is None or operation.step != "wait_self_fence" or operation.fence_deadline is None:
            return float("inf")
        return max(0.1, (operation.fence_deadline - self.clock()).total_seconds())  # never a busy loop

    async def tick(self) -> None:
        if self.role == "primary":
            obs = await self._observe()
            await self._primary_side_round(obs)
            return
        async with self.exec_lock:
            # Observed only once no step runs: a round taken before an operator's failover finished would
            # describe a world that no longer exists (a fenced primary "writable", a promoted one "in
            # recovery") and the machine would act on it.
            obs = await self._observe()
            async with self.lock:
                decision = machine.decide(self._as_seen_by_machine(), obs, self.clock(), self.policy)
                if not self._may_act() and any(_is_step(action) for action in decision.actions):
                    # Without the lease even an interrupted operation is not ours to resume: another DR
                    # agent holds it and may be running it. Watch, and say why nothing happens.
                    log.warning(
                        "dr.not_lease_holder",
                        holder=self.lease_holder,
                        phase=decision.state.phase,
                        note="a step is due but another agent holds the DR lease",
                    )
                    return
                steps = self._commit(decision, seen_paused=not self._may_act())
            await self._execute(steps)
        log.info(
            "dr.round",
            phase=self.state.phase,
            active=self.state.active,
            failures=self.state.failures,
            recoveries=self.state.recoveries,
            lease=self.holder,
            primary_ok=region_ok(obs, "primary"),
        )

    async def _observe(self) -> Observations:
        obs = await self.parts.prober.observe()
        self.last_obs = obs
        self.events.publish(DRProbed(obs.to_json(), primary_healthy=region_ok(obs, "primary")))
        return obs

    def _may_act(self) -> bool:
        return self.holder or self.parts.lease is None

    def _as_seen_by_machine(self) -> State:
        """Without the lease this agent watches but must not act: the machine sees automation paused."""
        if self.holder or self.parts.lease is None:
            return self.state
        return replace(self.state, switches=replace(self.state.switches, paused=True))

    async def _lease_loop(self) -> None:
        """Renew the lease every third of its ttl, whatever the loop is doing: a failover's DNS or rejoin step
        can outlast the ttl, and a lease that lapsed mid-operation would let another DR agent act."""
        while True:
            await anyio.sleep(self._lease_ttl / 3)
            await self._renew_lease()

    async def _renew_lease(self) -> None:
        lease = self.parts.lease
        if lease is None:
            self.holder = True
            return
        try:
            with anyio.fail_after(max(5.0, self.settings.probe_timeout.total_seconds() * 2)):
                self.holder = await lease.acquire_or_renew()
                record = await lease.holder()
            self.lease_holder = record.holder if record else None
        except (KybdrError, TimeoutError) as exc:
            # Unknown is not "ours": an agent that cannot prove it holds the lease does not act.
            self.holder = False
            log.warning("dr.lease_unavailable", error=str(exc) or "timed out")

    async def _primary_side_round(self, obs: Observations) -> None:
        async with self.exec_lock:
            async with self.lock:
                self.primary_side, actions = machine.decide_primary_side(
                    self.primary_side, obs, self.clock(), self.policy
                )
                self._save()
            for action in actions:
                if isinstance(action, Alert):
                    self._alert(action)
                elif isinstance(action, Record):
                    self.record(action.kind, action.fields)
                elif isinstance(action, FenceSelf):
                    self.record("intent", {"operation": "self-fence", "step": "fence", "reason": action.reason})
                    result = await self._run_step(action, "self-fence")
                    self.record("result", _result_record(result, "self-fence"))
                    self._alert(
                        Alert("critical", f"fenced the primary database ({action.reason}): {result.error or 'ok'}")
                    )

    # --- committing decisions and executing steps --------------------------------------------------

    def _commit(self, decision: Decision, *, seen_paused: bool = False) -> list[StepAction]:
        """Adopt the machine's new state (persisted first: a state that cannot be written is not adopted, so
        no step is ever due in memory that the disk does not know of) and act on its records and alerts;
        return the step actions for the caller to execute, outside the state lock."""
        before = self.state
        state = decision.state
        if seen_paused:
            # The loop showed the machine "paused" because we lack the lease; the operator's switch stays.
            state = replace(state, switches=replace(state.switches, paused=before.switches.paused))
        self._save(state)
        self.state = state
        if before.phase != state.phase:
            reason = state.last_transition.reason if state.last_transition else ""
            self.events.publish(DRTransition(before.phase, state.phase, state.active, reason, self.clock()))
            log.info("dr.transition", from_phase=before.phase, to_phase=state.phase, active=state.active, reason=reason)
        steps: list[StepAction] = []
        for action in decision.actions:
            if isinstance(action, Record):
                self.record(action.kind, action.fields)
            elif isinstance(action, Alert):
                self._alert(action)
            elif _is_step(action):
                steps.append(action)
        if state.phase == "halted" and before.phase != "halted":
            for op_id, waiter in list(self._waiters.items()):
                if not waiter.done.is_set() and (state.operation is None or state.operation.id == op_id):
                    waiter.record = {"operation_id": op_id, "outcome": "halted", "reason": state.halted_reason}
                    waiter.done.set()
        return steps

    async def _execute(self, steps: list[StepAction]) -> None:
        """Run the steps the machine chose, feeding each result back; must be called with ``exec_lock``."""
        pending = list(steps)
        while pending:
            action = pending.pop(0)
            op_id = getattr(action, "operation_id", "self-fence")
            result = await self._run_step(action, op_id)
            try:
                self.record("result", _result_record(result, op_id))
            except KybdrError as exc:  # the history could not be written; the machine must still hear the result
                log.exception("dr.history_write_failed", error=str(exc), step=result.step, ok=result.ok)
            async with self.lock:
                try:
                    pending.extend(self._commit(machine.step_done(self.state, result, self.clock(), self.policy)))
                except KybdrError as exc:
                    self._halt_unpersisted(str(exc))
                    return

    def _halt_unpersisted(self, error: str) -> None:
        """The state after a step could not be written (a full disk under backup_dir): stop here, alerting,
        rather than go on with steps a restart would not know of. ``dr resume`` (or a restart) re-derives
        roles from PostgreSQL and carries on from what actually happened."""
        operation = self.state.operation
        self.state = replace(
            self.state,
            phase="halted",
            halted_reason=f"the DR state could not be saved: {error}",
            operation=replace(operation, pending=False) if operation is not None else None,
        )
        log.critical("dr.state_unsaved", error=error, note="halted; dr resume once the disk is writable")
        for op_id, waiter in list(self._waiters.items()):
            if not waiter.done.is_set():
                waiter.record = {"operation_id": op_id, "outcome": "halted", "reason": self.state.halted_reason}
                waiter.done.set()

    async def _run_step(self, action: StepAction, op_id: str) -> StepResult:
        step = type(action).__name__.lower()
        self.executing = step
        try:
            # Shielded: SIGTERM during a promotion waits for the step (bounded) instead of leaving it half-done.
            with anyio.CancelScope(shield=True), anyio.move_on_after(STEP_HARD_LIMIT_SECONDS) as scope:
                result = await self.parts.executor.run(action, op_id)
            if scope.cancelled_caught:
                result = StepResult(op_id, step, False, STEP_HARD_LIMIT_SECONDS, {}, "the step did not finish in time")
        finally:
            self.executing = None
        log.info(
            "dr.step",
            operation=op_id,
            step=result.step,
            ok=result.ok,
            seconds=round(result.seconds, 3),
            error=result.error or None,
        )
        return result

    def _save(self, state: State | None = None) -> None:
        data: dict[str, Any] = {"machine": (state or self.state).to_json()}
        if self.role == "primary":
            data["primary_side"] = {
                "fenced": self.primary_side.fenced,
                "last_contact": iso(self.primary_side.last_contact),
            }
        save_state(self.parts.state_path, data)

    def record(self, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        record = self.parts.history.append({"kind": kind, **fields})
        if kind == "operation":
            self.events.publish(DROperationFinished(record))
            self._copy_now.set()
            op_id = str(fields.get("operation_id") or fields.get("id") or "")
            waiter = self._waiters.get(op_id)
            if waiter is not None:
                waiter.record = record
                waiter.done.set()
        return record

    def _alert(self, alert: Alert) -> None:
        level = {"info": log.info, "warning": log.warning}.get(alert.severity, log.critical)
        level("dr.alert", severity=alert.severity, message=alert.message)
        self.parts.history.append({"kind": "alert", "severity": alert.severity, "message": alert.message})
        self.events.publish(DRAlert(alert.severity, alert.message, self.clock()))

    # --- commands (API and CLI) --------------------------------------------------------------------

    async def command(self, cmd: Command) -> Decision | Refusal:
        """Evaluate a command under the state lock; an accepted one's steps start in the background."""
        if not self.settings.enabled:
            raise DRUnavailable("disaster recovery is not configured on this agent (dr.enabled = false)")
        if self.role != "dr" and isinstance(cmd, Failover | Failback | Resume):
            return Refusal(409, "this agent is the primary-side peer; failover and failback run on the DR agent", ())
        if isinstance(cmd, Failover | Failback) and not self.holder and self.parts.lease is not None:
            holder = self.lease_holder or "unknown (the lease could not be read)"
            return Refusal(409, f"another agent holds the DR lease ({holder}); only the holder acts", ())
        async with self.lock:
            result = machine.command(self.state, cmd, self.clock(), self.policy, self.last_obs)
            if isinstance(result, Refusal):
                return result
            steps = self._commit(result)
            operation = result.state.operation
            if operation is not None and operation.id not in self._waiters:
                self._waiters[operation.id] = _Waiter()
        if steps:
            assert self._tg is not None
            self._tg.start_soon(self._execute_locked, steps, name="dr-operation")
        self._wake.set()
        return result

    async def _execute_locked(self, steps: list[StepAction]) -> None:
        """A command's steps, in the component's task group: nothing may escape into (and stop) the agent."""
        try:
            async with self.exec_lock:
                await self._execute(steps)
        except Exception as exc:
            log.exception("dr.operation_crashed")
            async with self.lock:
                self._halt_unpersisted(f"internal error: {exc!r}")

    async def wait_operation(self, op_id: str) -> dict[str, Any]:
        waiter = self._waiters.setdefault(op_id, _Waiter())
        await waiter.done.wait()
        self._waiters.pop(op_id, None)
        return waiter.record or {"operation_id": op_id, "outcome": "unknown"}

    def submit_operation(self, kind: str, decision: Decision, params: dict[str, Any]) -> Job:
        """The job a caller follows: it ends when the operation ends (succeeded, rolled back or halted)."""
        operation = decision.state.operation
        assert operation is not None
        op_id = operation.id

        async def work(job: Job) -> Any:
            job.progress.stage = self.phase()
            record = await self.wait_operation(op_id)
            if record.get("outcome") not in ("succeeded",):
                raise JobFailed(
                    f"{kind} {record.get('outcome')}: {record.get('reason') or record.get('error') or ''}".strip(),
                    record,
                )
            return record

        return self.jobs.submit(f"dr-{kind}", work, params=params, key=op_id)

    async def set_switch(
        self, name: Literal["auto_failover", "auto_failback", "paused"], value: bool
    ) -> dict[str, Any]:
        result = await self.command(SetSwitch(name, value))
        if isinstance(result, Refusal):
            raise KybdrError(result.reason)
        return self.status()

    # --- drills --------------------------------------------------------------------------------------

    async def drill(self, kind: Literal["test-failover", "test-failback"]) -> dict[str, Any]:
        if not self.settings.enabled:
            raise DRUnavailable("disaster recovery is not configured on this agent (dr.enabled = false)")
        return await run_drill(self, kind)

    # --- views ----------------------------------------------------------------------------------------

    def phase(self) -> str:
        if self.role == "primary":
            return "fenced" if self.primary_side.fenced else "peer"
        return self.state.phase

    def status(self) -> dict[str, Any]:
        return status_view(self)

    def health_report(self) -> dict[str, Any]:
        return health_view(self)

    def peer_view(self) -> dict[str, Any]:
        """What this agent tells its peer: the database beside it and which region it believes is active."""
        obs = self.last_obs
        local = obs.db.get(self.local_region) if obs else None
        active: Region = self.state.active
        operation = self.state.operation
        if (
            operation is not None
            and operation.kind in ("failover", "failback")
            and (operation.step in ("promote", "dns", "rejoin", "unfence") or operation.completed("promote"))
        ):
            # From the promotion step on, the target is the active region: a failback's new primary must not be
            # fenced by its own agent because we still called the DR region active until the rejoin ended (the
            # promoted database takes writes while the step is still verifying it).
            active = operation.target
        if self.role == "primary" and obs is not None and obs.peer is not None and obs.peer.active:
            active = obs.peer.active
        return {
            "role": self.role,
            "db_reachable": local.reachable if local else None,
            "db_writable": local.writable if local else None,
            "fenced": self.primary_side.fenced if self.role == "primary" else bool(local and local.read_only),
            "active": active,
            "state": self.phase(),
            "contact": self._in_contact(obs),
        }

    def _in_contact(self, obs: Observations | None) -> bool | None:
        """Whether this agent's last round reached its peer or a witness majority (the primary side's
        partition rule); the DR side lifts a partition's fence only while this holds."""
        if obs is None:
            return None
        return machine.primary_side_contact(obs, self.policy)

    async def fence_local(self) -> dict[str, Any]:
        """``POST /v1/disaster-recovery/fence`` from the peer: fence the database beside this agent."""
        if not self.settings.enabled:
            raise DRUnavailable("disaster recovery is not configured on this agent (dr.enabled = false)")
        async with self.exec_lock:
            self.record("intent", {"operation": "peer-fence", "step": "fence", "region": self.local_region})
            detail = await self.parts.executor.fence(self.local_region, allow_peer=False)
            self.record("result", {"operation": "peer-fence", "step": "fence", **detail})
            if detail.get("ok") and self.role == "primary":
                async with self.lock:
                    self.primary_side = replace(self.primary_side, fenced=True)
                    self._save()
        self._alert(Alert("critical", f"the {self.local_region} database was fenced at the peer's request"))
        return {"fenced": bool(detail.get("ok")), "lsn": detail.get("lsn"), "how": detail.get("how")}

    def history_view(self, limit: int, kind: str | None) -> dict[str, Any]:
        return {
            "entries": self.parts.history.read(limit=limit, kind=kind),
            "statistics": self.parts.history.statistics(),
        }

    async def _copy_history_loop(self) -> None:
        store = self.parts.repository
        if store is None:
            return
        while True:
            # Every minute, and at once after an operation ends: the record of a failover should reach the
            # repository while the region that wrote it still exists.
            with anyio.move_on_after(HISTORY_COPY_SECONDS):
                await self._copy_now.wait()
            self._copy_now = anyio.Event()
            try:
                with anyio.fail_after(120):
                    await self.parts.history.copy_to(store)
            except (KybdrError, TimeoutError, OSError) as exc:
                log.warning("dr.history_copy_failed", error=str(exc) or "timed out")


def replace_fixed(old: DRSettings, new: DRSettings, fixed: tuple[str, ...]) -> DRSettings:
    """The new settings, except the fields that only a restart applies (they keep the running values)."""
    return new.model_copy(update={name: getattr(old, name) for name in fixed})


def _is_step(action: object) -> bool:
    return isinstance(action, Fence | Promote | SwitchDns | Rejoin | Unfence | FenceSelf)


def _result_record(result: StepResult, op_id: str) -> dict[str, Any]:
    return {
        "operation_id": op_id,
        "step": result.step,
        "ok": result.ok,
        "duration_s": round(result.seconds, 3),
        "detail": dict(result.detail),
        "error": result.error or None,
    }


def lease_ttl(settings: DRSettings) -> float:
    return max(LEASE_MIN_TTL_SECONDS, 3 * settings.health_check_interval.total_seconds())
