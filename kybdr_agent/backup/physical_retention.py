"""Which physical base backups the physical policies keep, per cluster; and a logical plan and a physical plan
made one.

Over its inputs only, like ``retention_plan``. The same rules as logical backups (``retention.decide``:
grandfather-father-son, the newest valid backup always kept, nothing younger than ``min_age`` deleted,
nothing older than ``max_age`` kept), with a cluster (``@cluster-<system identifier>``) in place of a database
and the ``kind = "physical"`` policies in place of the policies that list it. No physical policy configured,
or a backup labelled with a policy this agent does not have (another agent's): only age judges it, as
``retention_plan`` does for logical backups. The WAL the kept backups need is WAL retention's business
(``wal/retention.py``), not this module's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.retention import BackupRecord, RetentionPolicy, decide
from kybdr_agent.backup.retention_plan import OWN_LABELS, RetentionPlan


class PolicyRules(Protocol):
    """What retention needs of a ``[[backup.policies]]`` entry (``config.PolicySettings`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def keep_daily(self) -> int: ...
    @property
    def keep_weekly(self) -> int: ...
    @property
    def keep_monthly(self) -> int: ...
    @property
    def keep_yearly(self) -> int: ...
    @property
    def min_age(self) -> timedelta: ...
    @property
    def max_age(self) -> timedelta | None: ...
    @property
    def timezone(self) -> str: ...


def physical_retention_plan(
    policies: Sequence[PolicyRules],
    backups: Sequence[Manifest],
    now: datetime,
    invalid: set[str],
    default_max: timedelta,
) -> RetentionPlan:
    """The plan for the physical backups among ``backups`` (logical ones are ignored)."""
    physical = [p for p in policies if p.kind == "physical"]
    own = {p.name for p in policies} | OWN_LABELS
    judged: dict[str, list[BackupRecord]] = defaultdict(list)
    aged: dict[str, list[BackupRecord]] = defaultdict(list)
    for m in backups:
        if m.kind != "physical":
            continue
        record = BackupRecord(m.id, m.database, m.finished_at, m.id not in invalid)
        foreign = bool(m.labels) and not own & set(m.labels)
        (aged if foreign or not physical else judged)[m.database].append(record)
    keep: set[str] = set()
    reasons: dict[str, list[str]] = defaultdict(list)
    for records in aged.values():
        kept = {r.id for r in records if now - r.finished_at <= default_max}
        valid = [r for r in records if r.valid]
        if valid:
            kept.add(max(valid, key=lambda r: r.finished_at).id)  # never the newest valid backup
        keep |= kept
        for r in records:
            reasons[r.id].append(f"younger than {default_max.days} days" if r.id in kept else "older than max_age")
    for records in judged.values():
        for p in physical:
            rules = RetentionPolicy(
                keep_daily=p.keep_daily,
                keep_weekly=p.keep_weekly,
                keep_monthly=p.keep_monthly,
                keep_yearly=p.keep_yearly,
                min_age=p.min_age,
                max_age=p.max_age,
                timezone=p.timezone,
            )
            decision = decide(records, rules, now)
            keep |= decision.keep
            for backup_id, why in decision.reasons.items():
                reasons[backup_id].append(f"{p.name}: {why}")
    every = {r.id for group in (*aged.values(), *judged.values()) for r in group}
    return RetentionPlan(
        frozenset(keep), frozenset(every - keep), {k: "; ".join(dict.fromkeys(v)) for k, v in reasons.items()}
    )


def merged(first: RetentionPlan, second: RetentionPlan) -> RetentionPlan:
    """Two plans over disjoint backups (logical and physical) as one."""
    return RetentionPlan(first.keep | second.keep, first.delete | second.delete, {**first.reasons, **second.reasons})
