"""Retention: which backups a policy keeps, and why — grandfather-father-son over up to seven years.

PURE. ``decide(backups, policy, now)`` is a function of its arguments only; the cleanup job lists
manifests, calls it, shows the decision (a dry run is just not executing it) and deletes ``delete``.
Every id gets a reason, so an operator reading a cleanup log never has to reverse-engineer the policy.

The rules, per database, as restic and borg define GFS: among valid backups, for the newest
``keep_daily`` distinct local days that have backups keep the newest backup of each day; the same for
ISO weeks, months and years. Periods are local to ``policy.timezone`` — a backup at 23:30 UTC belongs to
the next day in Tokyo — and are ordered by ``finished_at``, never by names or ids (WAL-G ordered by
timeline name and deleted the newest backups after pg_upgrade).

Two floors sit under the rules and win over everything, because a retention bug must never be the reason
a database has no backup:

* the newest VALID backup of each database is always kept, even past ``max_age``;
* nothing younger than ``min_age`` is deleted, valid or not: a backup still being verified or copied to
  the DR region is not yet the cleanup job's business.

Invalid backups (failed verification) are never kept by a GFS rule and never count as the newest valid
one; once older than ``min_age`` they are deleted. Backups older than ``max_age`` are deleted whatever
the rules say (the seven-year legal bound), except under the first floor.

Properties the tests hold this to: keep and delete partition the input; the decision ignores input
order; deciding again on what was kept deletes nothing more (idempotence); adding a backup, or letting
time pass, never brings a deleted backup back; raising a keep count never deletes more.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

SEVEN_YEARS_DAYS: Final = 7 * 365 + 2
"""Seven calendar years in days, with the two leap days seven consecutive years can hold: the default
maximum age, of retention here and of the configuration's defaults (``config_sections`` imports it)."""
SEVEN_YEARS: Final = timedelta(days=SEVEN_YEARS_DAYS)

NEWEST_VALID: Final = "newest valid backup"
YOUNGER_THAN_MIN_AGE: Final = "younger than min_age"
OLDER_THAN_MAX_AGE: Final = "older than max_age"
INVALID: Final = "invalid backup older than min_age"
NOT_SELECTED: Final = "not selected by any keep rule"


@dataclass(frozen=True)
class BackupRecord:
    """What retention needs to know about one backup; ``finished_at`` comes from its manifest."""

    id: str
    database: str
    finished_at: datetime
    valid: bool = True

    def __post_init__(self) -> None:
        if self.finished_at.tzinfo is None or self.finished_at.utcoffset() is None:
            raise ValueError(f"backup {self.id}: finished_at must be timezone-aware, got {self.finished_at!r}")


@dataclass(frozen=True)
class RetentionPolicy:
    """GFS keep counts (0 turns a rule off), the age floor and ceiling, and the zone periods are read in."""

    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 12
    keep_yearly: int = 7
    min_age: timedelta = timedelta(hours=1)
    max_age: timedelta | None = SEVEN_YEARS
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        for name in ("keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"):
            count = getattr(self, name)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {count!r}")
        if self.min_age < timedelta(0):
            raise ValueError(f"min_age must not be negative, got {self.min_age}")
        # With max_age below min_age the two floors would contradict each other for backups in between.
        if self.max_age is not None and self.max_age < self.min_age:
            raise ValueError(f"max_age ({self.max_age}) must not be shorter than min_age ({self.min_age})")
        _zone(self.timezone)


@dataclass(frozen=True)
class RetentionDecision:
    """The ids to keep and to delete (disjoint, together all the input), and a reason for every id."""

    keep: frozenset[str]
    delete: frozenset[str]
    reasons: Mapping[str, str] = field(hash=False)


@dataclass(frozen=True)
class _Rule:
    name: str
    count: int
    period: Callable[[datetime], str]


def decide(backups: Iterable[BackupRecord], policy: RetentionPolicy, now: datetime) -> RetentionDecision:
    """Split ``backups`` into keep and delete by ``policy`` as of ``now``, each database on its own."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")
    by_database: dict[str, list[BackupRecord]] = defaultdict(list)
    seen: set[str] = set()
    for backup in backups:
        if backup.id in seen:
            # Two records with one id could get opposite verdicts; the caller's listing is broken.
            raise ValueError(f"backup id {backup.id!r} appears more than once")
        seen.add(backup.id)
        by_database[backup.database].append(backup)

    zone = _zone(policy.timezone)
    rules = (
        _Rule("daily", policy.keep_daily, lambda local: f"{local:%Y-%m-%d}"),
        _Rule("weekly", policy.keep_weekly, _iso_week),
        _Rule("monthly", policy.keep_monthly, lambda local: f"{local:%Y-%m}"),
        _Rule("yearly", policy.keep_yearly, lambda local: f"{local:%Y}"),
    )
    reasons: dict[str, str] = {}
    keep: set[str] = set()
    for records in by_database.values():
        for backup_id, kept, reason in _decide_database(records, policy, rules, zone, now):
            reasons[backup_id] = reason
            if kept:
                keep.add(backup_id)
    return RetentionDecision(
        keep=frozenset(keep),
        delete=frozenset(seen - keep),
        reasons=MappingProxyType(reasons),
    )


def _decide_database(
    records: list[BackupRecord],
    policy: RetentionPolicy,
    rules: tuple[_Rule, ...],
    zone: ZoneInfo,
    now: datetime,
) -> Iterable[tuple[str, bool, str]]:
    # All arithmetic in UTC: Python compares and subtracts two datetimes that share a tzinfo by wall time,
    # which is wrong across a DST change (a backup at 01:15 EST is newer than one at 01:45 EDT).
    now = now.astimezone(UTC)
    finished = {backup.id: backup.finished_at.astimezone(UTC) for backup in records}
    # Newest first; the id breaks ties so that equal timestamps cannot make the result order-dependent.
    newest_first = sorted(records, key=lambda backup: (finished[backup.id], backup.id), reverse=True)
    valid = [backup for backup in newest_first if backup.valid]
    newest_valid = valid[0].id if valid else None

    def expired(backup: BackupRecord) -> bool:
        return policy.max_age is not None and now - finished[backup.id] > policy.max_age

    kept_by: dict[str, list[str]] = defaultdict(list)
    candidates = [backup for backup in valid if not expired(backup)]
    for rule in rules:
        periods: set[str] = set()
        for backup in candidates:
            if len(periods) >= rule.count:
                break
            period = rule.period(backup.finished_at.astimezone(zone))
            if period not in periods:
                periods.add(period)
                kept_by[backup.id].append(f"{rule.name} {period}")

    for backup in newest_first:
        labels = kept_by.get(backup.id, [])
        young = now - finished[backup.id] < policy.min_age
        if backup.id == newest_valid:
            floor = f"{NEWEST_VALID} (kept past max_age)" if expired(backup) else NEWEST_VALID
            yield backup.id, True, ", ".join([floor, *labels])
        elif young:
            yield backup.id, True, ", ".join([YOUNGER_THAN_MIN_AGE, *labels])
        elif labels:
            yield backup.id, True, ", ".join(labels)
        elif not backup.valid:
            yield backup.id, False, INVALID
        elif expired(backup):
            yield backup.id, False, OLDER_THAN_MAX_AGE
        else:
            yield backup.id, False, NOT_SELECTED


def _iso_week(local: datetime) -> str:
    year, week, _ = local.isocalendar()
    return f"{year}-W{week:02d}"


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ValueError(f"timezone {name!r} is not a known IANA time zone") from exc
