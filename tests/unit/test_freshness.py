"""The freshness core (``backup/freshness.py``): policy windows from schedules, and which databases are stale."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.freshness import (
    GRACE,
    BackupSeen,
    ScheduleWindow,
    assess,
    longest_gap,
    window_of,
)
from kybdr_agent.backup.schedule import CronSpec

NOW = datetime(2031, 3, 4, 12, 0, tzinfo=UTC)


def test_windows_of_common_schedules() -> None:
    assert window_of(ScheduleWindow("0 2 * * *", UTC), NOW) == timedelta(days=1) + GRACE
    assert window_of(ScheduleWindow("*/5 * * * *", UTC), NOW) == timedelta(minutes=5) + GRACE
    assert window_of(ScheduleWindow("0 3 * * sun", UTC), NOW) == timedelta(days=7) + GRACE
    # The first of every month: the longest gap is a 31-day month.
    assert window_of(ScheduleWindow("0 4 1 * *", UTC), NOW) == timedelta(days=31) + GRACE
    # Weekdays only: Friday to Monday is the longest gap.
    assert window_of(ScheduleWindow("0 2 * * mon-fri", UTC), NOW) == timedelta(days=3) + GRACE
    jittered = ScheduleWindow("0 2 * * *", UTC, jitter=timedelta(minutes=5))
    assert window_of(jittered, NOW) == timedelta(days=1, minutes=5) + GRACE
    explicit = ScheduleWindow("0 2 * * *", UTC, stale_after=timedelta(hours=30))
    assert window_of(explicit, NOW) == timedelta(hours=30)


def test_a_dst_change_lengthens_the_window_by_its_hour() -> None:
    # Noon in New York: the day the clocks go back (2031-11-02) is 25 h long, so that gap is the longest.
    october = datetime(2031, 10, 20, 12, 0, tzinfo=UTC)
    assert longest_gap(CronSpec.parse("0 12 * * *"), ZoneInfo("America/New_York"), october) == timedelta(hours=25)
    # The spring-forward day is 23 h: no gap is longer than a day around it.
    march = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)
    assert longest_gap(CronSpec.parse("0 12 * * *"), ZoneInfo("America/New_York"), march) == timedelta(hours=24)


def test_stale_fresh_newest_and_bad_backups() -> None:
    covered = {"app": [ScheduleWindow("0 2 * * *", UTC)], "crm": [ScheduleWindow("0 2 * * *", UTC)], "new": []}
    backups = [
        BackupSeen("app", "old", NOW - timedelta(days=3)),
        BackupSeen("app", "newest", NOW - timedelta(hours=2)),
        BackupSeen("crm", "corrupt", NOW - timedelta(hours=1), good=False),
        BackupSeen("crm", "good", NOW - timedelta(hours=26)),
        BackupSeen("other", "uncovered", NOW),
    ]
    found = {f.database: f for f in assess(covered, backups, NOW)}
    assert list(found) == ["app", "crm", "new"]
    assert found["app"].newest_backup_id == "newest"
    assert not found["app"].stale
    assert found["crm"].newest_backup_id == "good"  # the corrupt newer one does not count
    assert found["crm"].stale
    assert found["new"].stale  # no backup at all
    assert found["new"].window == timedelta(days=1) + GRACE  # covered by no policy: the default window
    strict = {f.database: f for f in assess(covered, backups, NOW, max_age=timedelta(hours=1))}
    assert strict["app"].stale
    assert strict["app"].window == timedelta(hours=1)


def test_the_strictest_policy_decides() -> None:
    covered = {"app": [ScheduleWindow("0 4 1 * *", UTC), ScheduleWindow("0 2 * * *", UTC)]}
    [found] = assess(covered, [BackupSeen("app", "b", NOW - timedelta(days=2))], NOW)
    assert found.window == timedelta(days=1) + GRACE
    assert found.stale


ages = st.lists(
    st.tuples(st.integers(0, 60 * 24 * 40), st.booleans()),  # minutes ago, good
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(ages=ages, max_age_minutes=st.one_of(st.none(), st.integers(1, 60 * 24 * 40)))
def test_stale_exactly_when_no_good_backup_is_within_the_window(
    ages: list[tuple[int, bool]], max_age_minutes: int | None
) -> None:
    backups = [BackupSeen("db", f"b{i}", NOW - timedelta(minutes=m), good) for i, (m, good) in enumerate(ages)]
    max_age = None if max_age_minutes is None else timedelta(minutes=max_age_minutes)
    [found] = assess({"db": [ScheduleWindow("0 2 * * *", UTC)]}, backups, NOW, max_age=max_age)
    window = max_age or timedelta(days=1) + GRACE
    good = [NOW - timedelta(minutes=m) for m, ok in ages if ok]
    assert found.window == window
    assert found.newest_good_at == (max(good) if good else None)
    assert found.stale == (not any(NOW - at <= window for at in good))


@settings(max_examples=100, deadline=None)
@given(
    minute=st.integers(0, 59),
    hour=st.integers(0, 23),
    step=st.sampled_from([1, 2, 3, 4, 6, 8, 12]),
)
def test_an_every_n_hours_schedule_has_an_n_hour_gap(minute: int, hour: int, step: int) -> None:
    spec = CronSpec.parse(f"{minute} */{step} * * *")
    gap = longest_gap(spec, UTC, NOW + timedelta(hours=hour))
    # */step from 0: the gap over midnight is 24 - (last slot) which may exceed step when step ∤ 24.
    expected = timedelta(hours=max(step, 24 - (23 // step) * step))
    assert gap == expected
