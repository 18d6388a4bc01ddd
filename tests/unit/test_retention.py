"""Retention (kybdr_agent/backup/retention.py): the two floors (newest valid backup, min_age) hold whatever
the policy says, GFS keeps what restic/borg would, and the decision is stable: order-independent,
idempotent, and monotone in time, in new backups and in keep counts.

GFS results are checked against a second formulation of the rule: group by period, take each period's
newest backup, keep the newest N periods.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.retention import (
    INVALID,
    NEWEST_VALID,
    NOT_SELECTED,
    OLDER_THAN_MAX_AGE,
    SEVEN_YEARS,
    YOUNGER_THAN_MIN_AGE,
    BackupRecord,
    RetentionDecision,
    RetentionPolicy,
    decide,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
NOTHING = RetentionPolicy(keep_daily=0, keep_weekly=0, keep_monthly=0, keep_yearly=0, max_age=None)
RULES = ("daily", "weekly", "monthly", "yearly")
ZONES = ("UTC", "Asia/Tokyo", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Pacific/Kiritimati")


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def record(backup_id: str, finished_at: datetime, database: str = "app", valid: bool = True) -> BackupRecord:
    return BackupRecord(id=backup_id, database=database, finished_at=finished_at, valid=valid)


def kept_by(decision: RetentionDecision, rule: str) -> set[str]:
    """Ids whose reason names ``rule`` (``daily 2026-11-24`` → rule ``daily``)."""
    return {
        backup_id
        for backup_id, reason in decision.reasons.items()
        if any(part.startswith(f"{rule} ") for part in reason.split(", "))
    }


# ------------------------------------------------------------------------------------------ strategies

databases = st.sampled_from(["app", "billing", "auth"])
ages = st.one_of(
    st.sampled_from([0, 600, 3600, 86400, 86400 + 1]),  # exact ties, which only the id can order
    st.integers(-3600, 3 * 86400),  # recent, a few from a clock slightly ahead
    st.integers(0, 60 * 86400),
    st.integers(0, 9 * 366 * 86400),  # past the seven-year bound too
).map(lambda seconds: timedelta(seconds=seconds))
offsets = st.sampled_from([UTC, timezone(timedelta(hours=9)), timezone(timedelta(hours=-5, minutes=-30))])


def build_backups(rows: list[tuple[str, timedelta, bool, timezone]]) -> list[BackupRecord]:
    return [
        BackupRecord(id=f"b{n:03d}", database=database, finished_at=(NOW - age).astimezone(tz), valid=valid)
        for n, (database, age, valid, tz) in enumerate(rows)
    ]


def backup_lists(max_size: int = 40) -> st.SearchStrategy[list[BackupRecord]]:
    valid = st.booleans() | st.just(True)
    return st.lists(st.tuples(databases, ages, valid, offsets), max_size=max_size).map(build_backups)


policies = st.builds(
    RetentionPolicy,
    keep_daily=st.integers(0, 10),
    keep_weekly=st.integers(0, 6),
    keep_monthly=st.integers(0, 14),
    keep_yearly=st.integers(0, 8),
    min_age=st.timedeltas(timedelta(0), timedelta(days=2)),
    max_age=st.none() | st.timedeltas(timedelta(days=2), timedelta(days=8 * 366)),
    timezone=st.sampled_from(ZONES),
)


def newest_valid(backups: Iterable[BackupRecord]) -> dict[str, str]:
    best: dict[str, BackupRecord] = {}
    for backup in backups:
        if backup.valid:
            current = best.get(backup.database)
            if current is None or (backup.finished_at.astimezone(UTC), backup.id) > (
                current.finished_at.astimezone(UTC),
                current.id,
            ):
                best[backup.database] = backup
    return {database: backup.id for database, backup in best.items()}


def young(backups: Iterable[BackupRecord], policy: RetentionPolicy, now: datetime) -> set[str]:
    return {backup.id for backup in backups if now - backup.finished_at < policy.min_age}


def expired(backups: Iterable[BackupRecord], policy: RetentionPolicy, now: datetime) -> set[str]:
    if policy.max_age is None:
        return set()
    return {backup.id for backup in backups if now - backup.finished_at > policy.max_age}


# ------------------------------------------------------------------------------------------ invariants


@given(backup_lists(), policies)
@settings(max_examples=200)
def test_keep_and_delete_partition_the_input_and_every_id_has_a_reason(
    backups: list[BackupRecord], policy: RetentionPolicy
) -> None:
    decision = decide(backups, policy, NOW)
    ids = {backup.id for backup in backups}
    assert decision.keep | decision.delete == ids
    assert not decision.keep & decision.delete
    assert set(decision.reasons) == ids
    assert all(decision.reasons.values())


@given(backup_lists(), policies)
@settings(max_examples=200)
def test_the_newest_valid_backup_of_each_database_is_never_deleted(
    backups: list[BackupRecord], policy: RetentionPolicy
) -> None:
    decision = decide(backups, policy, NOW)
    for backup_id in newest_valid(backups).values():
        assert backup_id in decision.keep
        assert decision.reasons[backup_id].startswith(NEWEST_VALID)


@given(backup_lists(), policies)
@settings(max_examples=200)
def test_nothing_younger_than_min_age_is_deleted(backups: list[BackupRecord], policy: RetentionPolicy) -> None:
    decision = decide(backups, policy, NOW)
    assert young(backups, policy, NOW) <= decision.keep


@given(backup_lists(), policies)
@settings(max_examples=200)
def test_everything_older_than_max_age_is_deleted_but_the_newest_valid(
    backups: list[BackupRecord], policy: RetentionPolicy
) -> None:
    decision = decide(backups, policy, NOW)
    protected = set(newest_valid(backups).values())
    assert expired(backups, policy, NOW) - protected <= decision.delete


@given(backup_lists(), policies)
@settings(max_examples=200)
def test_invalid_backups_are_kept_only_while_young(backups: list[BackupRecord], policy: RetentionPolicy) -> None:
    decision = decide(backups, policy, NOW)
    invalid = {backup.id for backup in backups if not backup.valid}
    assert invalid & decision.keep <= young(backups, policy, NOW)
    for backup_id in invalid:
        assert not any(decision.reasons[backup_id].startswith(f"{rule} ") for rule in RULES)
        assert NEWEST_VALID not in decision.reasons[backup_id]


@given(backup_lists(), st.timedeltas(timedelta(0), timedelta(days=2)), st.sampled_from(ZONES))
@settings(max_examples=200)
def test_with_no_keep_rules_only_the_floors_remain(backups: list[BackupRecord], min_age: timedelta, zone: str) -> None:
    policy = replace(NOTHING, min_age=min_age, timezone=zone)
    decision = decide(backups, policy, NOW)
    assert decision.keep == set(newest_valid(backups).values()) | young(backups, policy, NOW)


@given(backup_lists(), policies, st.randoms(use_true_random=False))
@settings(max_examples=200)
def test_the_decision_does_not_depend_on_input_order(
    backups: list[BackupRecord], policy: RetentionPolicy, shuffler: random.Random
) -> None:
    shuffled = list(backups)
    shuffler.shuffle(shuffled)
    assert decide(shuffled, policy, NOW) == decide(backups, policy, NOW)
    assert decide(iter(shuffled), policy, NOW) == decide(backups, policy, NOW)


@given(backup_lists(), policies)
@settings(max_examples=200)
def test_deciding_again_on_what_was_kept_deletes_nothing_more(
    backups: list[BackupRecord], policy: RetentionPolicy
) -> None:
    first = decide(backups, policy, NOW)
    second = decide([backup for backup in backups if backup.id in first.keep], policy, NOW)
    assert second.delete == frozenset()
    assert second.keep == first.keep
    assert dict(second.reasons) == {backup_id: first.reasons[backup_id] for backup_id in first.keep}


@given(backup_lists(), policies, databases, ages, st.booleans())
@settings(max_examples=200)
def test_adding_a_backup_never_brings_back_a_deleted_one(
    backups: list[BackupRecord], policy: RetentionPolicy, database: str, age: timedelta, valid: bool
) -> None:
    before = decide(backups, policy, NOW)
    after = decide([*backups, record("new", NOW - age, database, valid)], policy, NOW)
    assert not before.delete & after.keep


@given(backup_lists(), policies, st.timedeltas(timedelta(0), timedelta(days=3 * 366)))
@settings(max_examples=200)
def test_time_passing_never_brings_back_a_deleted_backup(
    backups: list[BackupRecord], policy: RetentionPolicy, later: timedelta
) -> None:
    before = decide(backups, policy, NOW)
    after = decide(backups, policy, NOW + later)
    assert not before.delete & after.keep


@given(backup_lists(), policies, st.sampled_from(RULES), st.integers(1, 5))
@settings(max_examples=200)
def test_raising_a_keep_count_never_deletes_more(
    backups: list[BackupRecord], policy: RetentionPolicy, rule: str, extra: int
) -> None:
    more = replace(policy, **{f"keep_{rule}": getattr(policy, f"keep_{rule}") + extra})
    assert decide(backups, policy, NOW).keep <= decide(backups, more, NOW).keep


@given(backup_lists(), policies)
@settings(max_examples=200)
def test_each_database_is_decided_on_its_own(backups: list[BackupRecord], policy: RetentionPolicy) -> None:
    whole = decide(backups, policy, NOW)
    by_database: dict[str, list[BackupRecord]] = defaultdict(list)
    for backup in backups:
        by_database[backup.database].append(backup)
    for group in by_database.values():
        part = decide(group, policy, NOW)
        assert part.keep == whole.keep & {backup.id for backup in group}
        assert dict(part.reasons) == {backup.id: whole.reasons[backup.id] for backup in group}


def reference_gfs(
    backups: list[BackupRecord], policy: RetentionPolicy, now: datetime
) -> dict[str, dict[str, set[str]]]:
    """Per rule, per database: the labels GFS should hand out, as ``{rule: {id: {"daily 2026-11-24"}}}``."""
    zone = ZoneInfo(policy.timezone)
    periods: dict[str, Callable[[datetime], str]] = {
        "daily": lambda local: local.date().isoformat(),
        "weekly": lambda local: "{}-W{:02d}".format(*local.isocalendar()[:2]),
        "monthly": lambda local: local.strftime("%Y-%m"),
        "yearly": lambda local: str(local.year),
    }
    counts = {rule: getattr(policy, f"keep_{rule}") for rule in RULES}
    eligible = [
        backup
        for backup in backups
        if backup.valid and (policy.max_age is None or now - backup.finished_at <= policy.max_age)
    ]
    result: dict[str, dict[str, set[str]]] = {rule: defaultdict(set) for rule in RULES}
    for rule in RULES:
        newest_in: dict[tuple[str, str], BackupRecord] = {}
        for backup in eligible:
            key = (backup.database, periods[rule](backup.finished_at.astimezone(zone)))
            current = newest_in.get(key)
            if current is None or (backup.finished_at.astimezone(UTC), backup.id) > (
                current.finished_at.astimezone(UTC),
                current.id,
            ):
                newest_in[key] = backup
        per_database: dict[str, list[tuple[str, BackupRecord]]] = defaultdict(list)
        for (database, period), backup in newest_in.items():
            per_database[database].append((period, backup))
        for entries in per_database.values():
            entries.sort(key=lambda entry: (entry[1].finished_at.astimezone(UTC), entry[1].id), reverse=True)
            for period, backup in entries[: counts[rule]]:
                result[rule][backup.id].add(f"{rule} {period}")
    return result


@given(backup_lists(max_size=60), policies)
@settings(max_examples=200)
def test_gfs_labels_match_a_second_formulation(backups: list[BackupRecord], policy: RetentionPolicy) -> None:
    decision = decide(backups, policy, NOW)
    expected = reference_gfs(backups, policy, NOW)
    for rule in RULES:
        got = {
            backup_id: {part for part in reason.split(", ") if part.startswith(f"{rule} ")}
            for backup_id, reason in decision.reasons.items()
        }
        assert {backup_id: labels for backup_id, labels in got.items() if labels} == dict(expected[rule])
    # And with the floors, that is the whole keep set.
    labelled = set().union(*(expected[rule].keys() for rule in RULES))
    floors = set(newest_valid(backups).values()) | young(backups, policy, NOW)
    assert decision.keep == labelled | floors


# ------------------------------------------------------------------------------------------ examples


def daily_backups(first: date, last: date, hour: int = 2, tz: ZoneInfo | None = None) -> list[BackupRecord]:
    zone = tz or ZoneInfo("UTC")
    days = (last - first).days + 1
    return [
        record(
            f"d{n:04d}",
            datetime.combine(first + timedelta(days=n), datetime.min.time(), tzinfo=zone).replace(hour=hour),
        )
        for n in range(days)
    ]


def test_a_year_of_daily_backups_keeps_20() -> None:
    backups = daily_backups(date(2025, 11, 25), date(2026, 11, 24))
    assert len(backups) == 365
    policy = RetentionPolicy(keep_daily=7, keep_weekly=4, keep_monthly=12, keep_yearly=1)
    decision = decide(backups, policy, NOW)
    kept_days = sorted(backup.finished_at.date().isoformat() for backup in backups if backup.id in decision.keep)
    assert kept_days == [
        # monthly: the last day of each month, December 2025 to October 2026
        "2025-12-31",
        "2026-01-31",
        "2026-02-28",
        "2026-03-31",
        "2026-04-30",
        "2026-05-31",
        "2026-06-30",
        "2026-07-31",
        "2026-08-31",
        "2026-09-30",
        "2026-10-31",
        # weekly: the Sundays ending ISO weeks 45 and 46 (weeks 47 and 48 are already kept daily)
        "2026-11-08",
        "2026-11-15",
        # daily: the last seven days (the newest also stands for week 48, November and 2026)
        "2026-11-18",
        "2026-11-19",
        "2026-11-20",
        "2026-11-21",
        "2026-11-22",
        "2026-11-23",
        "2026-11-24",
    ]
    assert len(decision.keep) == 20
    assert len(decision.delete) == 345
    newest = backups[-1].id
    assert decision.reasons[newest] == (
        "newest valid backup, daily 2026-11-24, weekly 2026-W48, monthly 2026-11, yearly 2026"
    )
    assert decision.reasons[backups[-3].id] == "daily 2026-11-22, weekly 2026-W47"
    assert decision.reasons[backups[-10].id] == "weekly 2026-W46"
    assert decision.reasons[backups[-17].id] == "weekly 2026-W45"
    assert decision.reasons[backups[-25].id] == "monthly 2026-10"
    assert decision.reasons[backups[0].id] == NOT_SELECTED


def test_seven_years_of_daily_backups_in_a_dst_zone_with_the_default_policy() -> None:
    new_york = ZoneInfo("America/New_York")
    # 02:30 local does not exist on spring-forward days: those backups finish at 03:30 instead.
    backups = [
        record(f"d{n:04d}", datetime.combine(date(2019, 11, 1) + timedelta(days=n), datetime.min.time(), new_york))
        for n in range((date(2026, 11, 24) - date(2019, 11, 1)).days + 1)
    ]
    backups = [replace(backup, finished_at=backup.finished_at + timedelta(hours=2, minutes=30)) for backup in backups]
    policy = RetentionPolicy(timezone="America/New_York")
    decision = decide(backups, policy, NOW)
    for rule, count in (("daily", 7), ("weekly", 4), ("monthly", 12), ("yearly", 7)):
        assert len(kept_by(decision, rule)) == count
    # yearly keeps the last backup of 2020..2025 and today; 2019 is the eighth year.
    yearly = kept_by(decision, "yearly")
    yearly_days = sorted(backup.finished_at.astimezone(new_york).date() for backup in backups if backup.id in yearly)
    assert yearly_days == [*(date(year, 12, 31) for year in range(2020, 2026)), date(2026, 11, 24)]
    assert len(decision.keep) == 7 + 2 + 11 + 5  # daily, then what weekly, monthly and yearly add to it


def test_period_boundaries_are_local_to_the_policy_zone() -> None:
    # 23:30 UTC on the 23rd is 08:30 on the 24th in Tokyo: one local day with the 10:00 UTC backup.
    late = record("late", at(2026, 11, 23, 23, 30))
    later = record("later", at(2026, 11, 24, 10, 0))
    early = record("early", at(2026, 11, 23, 1, 0))
    backups = [early, late, later]
    daily_two = replace(NOTHING, keep_daily=2)

    in_utc = decide(backups, daily_two, NOW)
    assert in_utc.keep == {"later", "late"}
    assert in_utc.reasons["late"] == "daily 2026-11-23"

    in_tokyo = decide(backups, replace(daily_two, timezone="Asia/Tokyo"), NOW)
    assert in_tokyo.keep == {"later", "early"}
    assert in_tokyo.reasons["later"] == "newest valid backup, daily 2026-11-24"
    assert in_tokyo.reasons["early"] == "daily 2026-11-23"
    assert in_tokyo.reasons["late"] == NOT_SELECTED


def test_iso_weeks_cross_the_new_year() -> None:
    # 2026 has 53 ISO weeks: Thursday 2026-12-31 and Friday 2027-01-01 are both in 2026-W53.
    backups = [
        record("w51", at(2026, 12, 20, 3)),
        record("dec31", at(2026, 12, 31, 3)),
        record("jan01", at(2027, 1, 1, 3)),
    ]
    now = at(2027, 1, 2)
    weekly = decide(backups, replace(NOTHING, keep_weekly=2), now)
    assert weekly.keep == {"jan01", "w51"}
    assert weekly.reasons["jan01"] == "newest valid backup, weekly 2026-W53"
    assert weekly.reasons["w51"] == "weekly 2026-W51"
    yearly = decide(backups, replace(NOTHING, keep_yearly=2), now)
    assert yearly.keep == {"jan01", "dec31"}
    assert yearly.reasons["dec31"] == "yearly 2026"


def test_the_newest_valid_backup_survives_max_age() -> None:
    backups = [record("ancient", at(2010, 1, 1)), record("older", at(2009, 1, 1))]
    decision = decide(backups, RetentionPolicy(), NOW)
    assert decision.keep == {"ancient"}
    assert decision.reasons["ancient"] == "newest valid backup (kept past max_age)"
    assert decision.reasons["older"] == OLDER_THAN_MAX_AGE


def test_max_age_overrides_the_yearly_rule() -> None:
    backups = [record(f"y{year}", at(year, 6, 1)) for year in range(2015, 2027)]
    decision = decide(backups, RetentionPolicy(keep_yearly=20, max_age=timedelta(days=5 * 365)), NOW)
    assert decision.keep == {f"y{year}" for year in range(2022, 2027)}
    assert decision.reasons["y2021"] == OLDER_THAN_MAX_AGE


def test_an_invalid_newest_backup_does_not_protect_itself_or_hide_the_last_good_one() -> None:
    backups = [
        record("good", at(2026, 11, 1)),
        record("broken", at(2026, 11, 20), valid=False),
        record("fresh-broken", NOW - timedelta(minutes=5), valid=False),
    ]
    decision = decide(backups, replace(NOTHING, max_age=timedelta(days=3)), NOW)
    assert decision.keep == {"good", "fresh-broken"}
    assert decision.reasons["good"] == "newest valid backup (kept past max_age)"
    assert decision.reasons["broken"] == INVALID
    assert decision.reasons["fresh-broken"] == YOUNGER_THAN_MIN_AGE


def test_without_any_valid_backup_only_young_ones_stay() -> None:
    backups = [
        record("old-broken", at(2026, 10, 1), valid=False),
        record("new-broken", NOW - timedelta(minutes=30), valid=False),
    ]
    decision = decide(backups, RetentionPolicy(), NOW)
    assert decision.keep == {"new-broken"}
    assert decision.delete == {"old-broken"}


def test_young_backups_are_kept_and_still_count_for_gfs() -> None:
    backups = [record("today-early", at(2026, 11, 24, 1)), record("just-now", NOW - timedelta(minutes=10))]
    decision = decide(backups, replace(NOTHING, keep_daily=1, min_age=timedelta(hours=1)), NOW)
    assert decision.reasons["just-now"] == "newest valid backup, daily 2026-11-24"
    assert decision.reasons["today-early"] == NOT_SELECTED
    assert decision.delete == {"today-early"}


def test_min_age_boundary_is_exclusive() -> None:
    backups = [record("newest", NOW), record("exactly", NOW - timedelta(hours=1))]
    decision = decide(backups, NOTHING, NOW)
    assert decision.reasons["newest"] == NEWEST_VALID
    assert decision.reasons["exactly"] == NOT_SELECTED


def test_backups_in_a_repeated_hour_are_ordered_by_instant_not_wall_time() -> None:
    new_york = ZoneInfo("America/New_York")
    # On 2026-11-01 01:15 EST (fold=1) comes 30 minutes after 01:45 EDT (fold=0).
    first_pass = record("edt-0145", datetime(2026, 11, 1, 1, 45, tzinfo=new_york))
    second_pass = record("est-0115", datetime(2026, 11, 1, 1, 15, tzinfo=new_york, fold=1))
    decision = decide([second_pass, first_pass], replace(NOTHING, keep_daily=1, timezone="America/New_York"), NOW)
    assert decision.keep == {"est-0115"}
    assert decision.reasons["est-0115"] == "newest valid backup, daily 2026-11-01"


def test_ages_are_real_durations_even_when_now_shares_the_backups_zone() -> None:
    new_york = ZoneInfo("America/New_York")
    # 00:50 EDT to 01:10 EST (the second pass of 01:00-02:00 on 2026-11-01) is 80 minutes, not 20.
    old = record("old", datetime(2026, 11, 1, 0, 50, tzinfo=new_york))
    new = record("new", datetime(2026, 11, 1, 1, 5, tzinfo=new_york, fold=1))
    now = datetime(2026, 11, 1, 1, 10, tzinfo=new_york, fold=1)
    decision = decide([old, new], NOTHING, now)
    assert decision.keep == {"new"}
    assert decision.reasons["old"] == NOT_SELECTED


def test_ties_are_broken_by_id() -> None:
    moment = at(2026, 11, 20)
    decision = decide([record("a", moment), record("b", moment)], replace(NOTHING, keep_daily=1), NOW)
    assert decision.keep == {"b"}


def test_databases_do_not_share_periods_or_the_newest_valid_floor() -> None:
    backups = [
        record("app-1", at(2026, 11, 23), "app"),
        record("app-2", at(2026, 11, 22), "app"),
        record("billing-1", at(2026, 11, 1), "billing"),
        record("billing-2", at(2026, 10, 1), "billing"),
    ]
    decision = decide(backups, replace(NOTHING, keep_monthly=1), NOW)
    assert decision.keep == {"app-1", "billing-1"}
    assert decision.reasons["billing-1"] == "newest valid backup, monthly 2026-11"


def test_empty_input() -> None:
    decision = decide([], RetentionPolicy(), NOW)
    assert decision == RetentionDecision(frozenset(), frozenset(), {})


def test_decision_is_immutable() -> None:
    decision = decide([record("only", at(2026, 11, 1))], RetentionPolicy(), NOW)
    with pytest.raises(TypeError):
        decision.reasons["only"] = "tampered"  # type: ignore[index]


def test_duplicate_ids_are_refused() -> None:
    backups = [record("same", at(2026, 11, 1)), record("same", at(2026, 11, 2), "billing")]
    with pytest.raises(ValueError, match="'same' appears more than once"):
        decide(backups, RetentionPolicy(), NOW)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="finished_at must be timezone-aware"):
        record("naive", datetime(2026, 11, 1))
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        decide([], RetentionPolicy(), datetime(2026, 11, 1))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"keep_daily": -1}, "keep_daily must be a whole number >= 0"),
        ({"keep_weekly": 1.5}, "keep_weekly must be a whole number"),
        ({"keep_yearly": True}, "keep_yearly must be a whole number"),
        ({"min_age": timedelta(seconds=-1)}, "min_age must not be negative"),
        ({"max_age": timedelta(minutes=30)}, "max_age .* must not be shorter than min_age"),
        ({"timezone": "Mars/Olympus_Mons"}, "timezone 'Mars/Olympus_Mons' is not a known IANA time zone"),
        ({"timezone": ""}, "is not a known IANA time zone"),
        ({"timezone": "../../etc/passwd"}, "is not a known IANA time zone"),
    ],
)
def test_invalid_policies_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**changes)  # type: ignore[arg-type]


def test_policy_defaults() -> None:
    policy = RetentionPolicy()
    assert (policy.keep_daily, policy.keep_weekly, policy.keep_monthly, policy.keep_yearly) == (7, 4, 12, 7)
    assert policy.min_age == timedelta(hours=1)
    assert policy.max_age == SEVEN_YEARS == timedelta(days=2557)
    assert policy.timezone == "UTC"
