"""Which scheduled runs exist, and which of them is due: the scheduler's decisions, apart from its loop.

PURE. A slot is one (policy, database) backup schedule, a physical policy's (one per policy: it backs up the
cluster, not a database), or the restore drill's; whether it is due depends
only on the slot, the last run recorded for it and ``now``. The loop (``scheduler.py``) owns the clock, the
state file and the jobs; everything it decides is decided here, and tested without waiting for a clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo

from kybdr_agent.backup.schedule import CronSpec, jitter, missed_run, next_run


class PolicyLike(Protocol):
    """What a slot needs of a ``[[backup.policies]]`` entry (``config.PolicySettings`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def schedule(self) -> str: ...
    @property
    def databases(self) -> list[str]: ...
    @property
    def timezone(self) -> str: ...
    @property
    def jitter_seconds(self) -> float: ...


class DrillLike(Protocol):
    @property
    def schedule(self) -> str | None: ...
    @property
    def timezone(self) -> str: ...


@dataclass(frozen=True)
class Slot:
    key: str
    kind: str  # "backup", "physical" or "test"
    spec: CronSpec
    tz: ZoneInfo
    jitter_seconds: float
    policy: str | None = None
    database: str | None = None


def planned_slots(enabled: bool, policies: Sequence[PolicyLike], drill: DrillLike) -> list[Slot]:
    """Every slot the configuration asks for: one per (policy, database) and one per physical policy while backups
    are enabled, and the restore drill's when it has a schedule."""
    slots: list[Slot] = []
    if enabled:
        for policy in policies:
            if policy.kind == "physical":
                slots.append(
                    Slot(
                        key=f"physical:{policy.name}",
                        kind="physical",
                        spec=CronSpec.parse(policy.schedule),
                        tz=ZoneInfo(policy.timezone),
                        jitter_seconds=policy.jitter_seconds,
                        policy=policy.name,
                    )
                )
            for database in policy.databases:
                slots.append(
                    Slot(
                        key=f"backup:{policy.name}:{database}",
                        kind="backup",
                        spec=CronSpec.parse(policy.schedule),
                        tz=ZoneInfo(policy.timezone),
                        jitter_seconds=policy.jitter_seconds,
                        policy=policy.name,
                        database=database,
                    )
                )
    if drill.schedule:
        slots.append(
            Slot(
                key="test:all",
                kind="test",
                spec=CronSpec.parse(drill.schedule),
                tz=ZoneInfo(drill.timezone),
                jitter_seconds=0.0,
            )
        )
    return slots


def due_slot(slot: Slot, last: datetime | None, now: datetime) -> datetime | None:
    """The slot to run now, if any: the latest one (jitter applied) since ``last``."""
    offset = jitter(now, slot.jitter_seconds, slot.key) - now
    return missed_run(slot.spec, last, now - offset, slot.tz)


@dataclass(frozen=True)
class Tick:
    """What one scheduler tick decided: the slots to fire (with the time each is for) and the new record
    of last runs (a new slot is recorded as run now, so it waits for its next time instead of firing)."""

    fire: tuple[tuple[Slot, datetime], ...]
    last: dict[str, datetime]
    changed: bool


def decide_tick(slots: list[Slot], last: dict[str, datetime], now: datetime) -> Tick:
    updated = dict(last)
    fire: list[tuple[Slot, datetime]] = []
    changed = False
    for slot in slots:
        previous = updated.get(slot.key)
        if previous is None:
            updated[slot.key] = now
            changed = True
            continue
        due = due_slot(slot, previous, now)
        if due is None:
            continue
        updated[slot.key] = due
        changed = True
        fire.append((slot, due))
    return Tick(tuple(fire), updated, changed)


def next_wakeups(slots: Sequence[Slot], now: datetime) -> dict[str, str]:
    return {slot.key: next_run(slot.spec, now, slot.tz).isoformat() for slot in slots}
