"""Which backups the configured policies keep: every policy covering a database, over that database's backups.

Pure over its inputs (the configuration, the manifests, the clock and the set of backups found corrupt);
``retention.decide`` judges one policy, this combines them. Kept if any policy covering the database keeps
it; databases no policy covers only age out. A backup labelled with a policy this agent does not have was
made by another agent sharing the repository (or under a policy since renamed): this agent's policies do
not judge it, only age does, so two agents on one repository never delete what the other's policies keep.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.retention import BackupRecord, RetentionPolicy, decide
from kybdr_agent.backup.settings import BackupConfig

# Labels every agent gives its backups besides its policy names: never "foreign".
OWN_LABELS = frozenset({"manual", "scheduled"})


@dataclass(frozen=True)
class RetentionPlan:
    keep: frozenset[str]
    delete: frozenset[str]
    reasons: dict[str, str]


def _age_only(records: list[BackupRecord], max_age: timedelta, now: datetime) -> set[str]:
    kept = {r.id for r in records if now - r.finished_at <= max_age}
    valid = [r for r in records if r.valid]
    if valid:
        kept.add(max(valid, key=lambda r: r.finished_at).id)  # never the newest valid backup
    return kept


def retention_plan(config: BackupConfig, backups: list[Manifest], now: datetime, invalid: set[str]) -> RetentionPlan:
    own = {p.name for p in config.policies} | OWN_LABELS
    by_db: dict[str, list[BackupRecord]] = defaultdict(list)
    foreign: dict[str, list[BackupRecord]] = defaultdict(list)
    for m in backups:
        record = BackupRecord(m.id, m.database, m.finished_at, m.id not in invalid)
        (foreign if m.labels and not own & set(m.labels) else by_db)[m.database].append(record)
    covered = config.policies_by_database()
    default_max = timedelta(days=config.backup.retention_days)
    keep: set[str] = set()
    reasons: dict[str, list[str]] = defaultdict(list)
    age_only = list(foreign.values()) + [records for db, records in by_db.items() if not covered.get(db)]
    for records in age_only:
        kept = _age_only(records, default_max, now)
        keep |= kept
        for r in records:
            reasons[r.id].append(f"younger than {default_max.days} days" if r.id in kept else "older than max_age")
    for db, records in by_db.items():
        for p in covered.get(db, []):
            policy = RetentionPolicy(
                keep_daily=p.keep_daily,
                keep_weekly=p.keep_weekly,
                keep_monthly=p.keep_monthly,
                keep_yearly=p.keep_yearly,
                min_age=p.min_age,
                max_age=p.max_age,
                timezone=p.timezone,
            )
            decision = decide(records, policy, now)
            keep |= decision.keep
            for backup_id, why in decision.reasons.items():
                reasons[backup_id].append(f"{p.name}: {why}")
    delete = {m.id for m in backups} - keep
    return RetentionPlan(
        frozenset(keep), frozenset(delete), {k: "; ".join(dict.fromkeys(v)) for k, v in reasons.items()}
    )
