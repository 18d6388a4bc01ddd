"""PURE. How fresh each covered database's newest good backup is, against its policy's window.

One answer for three readers: the housekeeping tick (``BackupAgeSeconds`` for CloudWatch, the last-success
gauges, the "stale" alert) and ``kybdr-agent check``. A database is *stale* when it has no good backup
younger than its window; no good backup at all is stale too.

The window of a policy is, unless the policy sets ``stale_after``, the longest gap between two consecutive
runs of its schedule, plus its jitter, plus ``GRACE`` for the backup itself to finish. A daily 02:00
schedule has a 25 h window: the backup of 02:00 may fail once and still be reported only when the next
one is also missing — a backup that is merely late by minutes is not a page at 02:01. A database several
policies cover is held to the strictest (shortest) window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Final

from kybdr_agent.backup.schedule import CronSpec, ScheduleError, next_run, previous_run

GRACE: Final = timedelta(hours=1)
# The walk that finds a schedule's longest gap: enough runs to see the whole pattern of a weekly or
# monthly schedule, bounded for an every-second one.
MAX_GAPS: Final = 64
MIN_SPAN: Final = timedelta(days=35)
MAX_SPAN: Final = timedelta(days=400)


@dataclass(frozen=True)
class ScheduleWindow:
    """What a policy contributes: its schedule (cron text, zone), its jitter and an explicit window."""

    schedule: str
    tz: tzinfo
    jitter: timedelta = timedelta(0)
    stale_after: timedelta | None = None


@dataclass(frozen=True)
class BackupSeen:
    """A completed backup in the repository: which database, when it finished, and whether it is good
    (not found corrupt by its latest conclusive full validation)."""

    database: str
    backup_id: str
    finished_at: datetime
    good: bool = True


@dataclass(frozen=True)
class DatabaseFreshness:
    database: str
    newest_good_at: datetime | None
    newest_backup_id: str | None
    age: timedelta | None
    window: timedelta

    @property
    def stale(self) -> bool:
        return self.age is None or self.age > self.window


def longest_gap(spec: CronSpec, tz: tzinfo, now: datetime) -> timedelta:
    """The longest interval between consecutive runs, over the run before ``now`` and those after it."""
    try:
        at = previous_run(spec, now, tz)
    except ScheduleError:
        at = now
    start, longest, gaps = at, timedelta(0), 0
    while gaps < MAX_GAPS:
        try:
            following = next_run(spec, at, tz)
        except ScheduleError:
            break
        longest = max(longest, following - at)
        gaps += 1
        at = following
        covered = at - start
        if covered >= MAX_SPAN or (covered >= MIN_SPAN and gaps >= 2):
            break
    return longest if gaps else MAX_SPAN


def window_of(policy: ScheduleWindow, now: datetime) -> timedelta:
    if policy.stale_after is not None:
        return policy.stale_after
    return longest_gap(CronSpec.parse(policy.schedule), policy.tz, now) + policy.jitter + GRACE


def assess(
    covered: Mapping[str, Iterable[ScheduleWindow]],
    backups: Iterable[BackupSeen],
    now: datetime,
    *,
    max_age: timedelta | None = None,
    default_window: timedelta = timedelta(days=1) + GRACE,
) -> list[DatabaseFreshness]:
    """Each covered database, in the order given: its newest good backup and its window.

    ``max_age`` (``check --max-age``) replaces every policy's window; a database covered by no policy
    (only listed in ``database.databases``) is held to ``default_window``."""
    newest: dict[str, BackupSeen] = {}
    for seen in backups:
        if not seen.good or seen.database not in covered:
            continue
        best = newest.get(seen.database)
        if best is None or seen.finished_at > best.finished_at:
            newest[seen.database] = seen
    found: list[DatabaseFreshness] = []
    for database, policies in covered.items():
        if max_age is not None:
            window = max_age
        else:
            windows = [window_of(p, now) for p in policies]
            window = min(windows) if windows else default_window
        best = newest.get(database)
        found.append(
            DatabaseFreshness(
                database=database,
                newest_good_at=best.finished_at if best else None,
                newest_backup_id=best.backup_id if best else None,
                age=max(timedelta(0), now - best.finished_at) if best else None,
                window=window,
            )
        )
    return found
