"""Cron schedules (kybdr_agent/backup/schedule.py): the grammar, the next/previous slot against a brute-force
scan of every minute (or second), daylight-saving gaps and overlaps, missed runs after downtime, jitter.

The brute force restates the module's rules independently: an instant is a run if its local wall time
matches at its first occurrence (fold=0), or if it ends a spring-forward gap that swallowed a matching wall
time. It then scans instants one by one, skipping only whole local days the day fields exclude.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.schedule import (
    FIELD_NAMES,
    MACROS,
    CronSpec,
    ScheduleError,
    jitter,
    missed_run,
    next_run,
    previous_run,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")  # a 30-minute DST shift
KOLKATA = ZoneInfo("Asia/Kolkata")  # a half-hour offset, no DST
SYDNEY = ZoneInfo("Australia/Sydney")  # southern hemisphere: DST over new year
UTC_ZONE = ZoneInfo("UTC")
# None of these zones changes offset at local midnight, which the brute force's day skipping relies on.
ZONES = (UTC_ZONE, BERLIN, NEW_YORK, TOKYO, LORD_HOWE, KOLKATA, SYDNEY)

MINUTE = timedelta(minutes=1)
SECOND = timedelta(seconds=1)

ALL_MINUTES = tuple(range(60))
ALL_HOURS = tuple(range(24))
ALL_DAYS = tuple(range(1, 32))
ALL_MONTHS = tuple(range(1, 13))
ALL_WEEKDAYS = tuple(range(7))


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def local(
    tz: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, *, fold: int = 0
) -> datetime:
    """A local wall time; ``fold=1`` picks the second pass of a repeated hour."""
    return datetime(year, month, day, hour, minute, second, tzinfo=tz, fold=fold)


# ------------------------------------------------------------------------------------------ brute force


def day_matches(spec: CronSpec, day: date) -> bool:
    if day.month not in spec.months:
        return False
    by_day = day.day in spec.days
    by_weekday = (day.weekday() + 1) % 7 in spec.weekdays
    if spec.day_of_month_restricted and spec.day_of_week_restricted:
        return by_day or by_weekday
    return by_day and by_weekday


def wall_matches(spec: CronSpec, wall: datetime) -> bool:
    return (
        wall.second in spec.seconds
        and wall.minute in spec.minutes
        and wall.hour in spec.hours
        and day_matches(spec, wall.date())
    )


def is_run(spec: CronSpec, instant: datetime, tz: ZoneInfo, step: timedelta) -> bool:
    """Whether ``instant`` is a run: a matching first occurrence, or the end of a gap holding a match."""
    here = instant.astimezone(tz)
    wall = here.replace(tzinfo=None)
    if here.fold == 0 and wall_matches(spec, wall):
        return True
    jump = here.utcoffset() - (instant - timedelta(microseconds=1)).astimezone(tz).utcoffset()  # type: ignore[operator]
    if jump > timedelta(0):
        skipped = wall - jump
        while skipped < wall:
            if wall_matches(spec, skipped):
                return True
            skipped += step
    return False


def step_for(spec: CronSpec) -> timedelta:
    return MINUTE if spec.seconds == (0,) else SECOND


def runs_between(spec: CronSpec, start: datetime, end: datetime, tz: ZoneInfo) -> list[datetime]:
    """Every run instant in ``(start, end]``, by checking each minute (or second) in turn."""
    step = step_for(spec)
    instant = start.astimezone(UTC).replace(microsecond=0)
    instant = instant.replace(second=0) if step == MINUTE else instant
    while instant <= start:
        instant += step
    found = []
    while instant <= end:
        here = instant.astimezone(tz)
        if not day_matches(spec, here.date()):
            midnight = datetime.combine(here.date() + timedelta(days=1), time(), tzinfo=tz)
            instant = midnight.astimezone(UTC)
            continue
        if is_run(spec, instant, tz, step):
            found.append(instant)
        instant += step
    return found


def first_run_after(spec: CronSpec, start: datetime, limit: datetime, tz: ZoneInfo) -> datetime | None:
    step = step_for(spec)
    instant = start.astimezone(UTC).replace(microsecond=0)
    instant = instant.replace(second=0) if step == MINUTE else instant
    while instant <= start:
        instant += step
    while instant <= limit:
        here = instant.astimezone(tz)
        if not day_matches(spec, here.date()):
            instant = datetime.combine(here.date() + timedelta(days=1), time(), tzinfo=tz).astimezone(UTC)
            continue
        if is_run(spec, instant, tz, step):
            return instant
        instant += step
    return None


# ------------------------------------------------------------------------------------------ strategies


def field_texts(low: int, high: int, names: Sequence[str] = ()) -> st.SearchStrategy[str]:
    number = st.integers(low, high)
    value = number.map(str) | st.sampled_from(names) if names else number.map(str)
    span = st.tuples(number, number).map(lambda pair: f"{min(pair)}-{max(pair)}")
    step = st.integers(1, high - low + 2)
    atom = st.one_of(
        st.just("*"),
        value,
        span,
        step.map(lambda n: f"*/{n}"),
        st.builds(lambda r, n: f"{r}/{n}", span, step),
        st.builds(lambda v, n: f"{v}/{n}", number, step),
    )
    return st.lists(atom, min_size=1, max_size=3).map(",".join)


MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "SUN", "Mon")
seconds_fields = field_texts(0, 59)
minute_fields = field_texts(0, 59)
hour_fields = field_texts(0, 23)
# Day fields lean towards "*" so that most random specs match within the brute force's window.
day_fields = st.one_of(st.just("*"), st.just("*"), field_texts(1, 31))
month_fields = st.one_of(st.just("*"), st.just("*"), field_texts(1, 12, MONTH_NAMES))
weekday_fields = st.one_of(st.just("*"), field_texts(0, 7, WEEKDAY_NAMES))

five_field_specs = st.builds(
    lambda *fields: " ".join(fields), minute_fields, hour_fields, day_fields, month_fields, weekday_fields
)
# Per-second specs are checked second by second, so they keep the days open and a window of hours.
six_field_specs = st.builds(
    lambda *fields: " ".join(fields),
    seconds_fields,
    minute_fields,
    st.one_of(st.just("*"), hour_fields),
    st.just("*"),
    st.just("*"),
    st.just("*"),
)
zones = st.sampled_from(ZONES)

TRANSITIONS = (
    local(BERLIN, 2026, 3, 29, 2),
    local(BERLIN, 2026, 10, 25, 2),
    local(NEW_YORK, 2026, 3, 8, 2),
    local(NEW_YORK, 2026, 11, 1, 1),
    local(LORD_HOWE, 2026, 4, 5, 1, 30),
    local(LORD_HOWE, 2026, 10, 4, 2),
    local(SYDNEY, 2026, 4, 5, 2),
    local(SYDNEY, 2026, 10, 4, 2),
)
anywhere = st.tuples(
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 12, 31), timezones=st.just(UTC)),
    zones,
)
# A moment near one of the zone's own transitions, weighted to the hours just before it.
near_transitions = st.builds(
    lambda moment, shift: (moment.astimezone(UTC) + shift, moment.tzinfo),
    st.sampled_from(TRANSITIONS),
    st.one_of(
        st.timedeltas(-timedelta(hours=26), timedelta(hours=4)),
        st.timedeltas(-timedelta(hours=2), timedelta(hours=1)),
    ),
)
moments_in_zones: st.SearchStrategy[tuple[datetime, ZoneInfo]] = st.one_of(anywhere, near_transitions)


# ------------------------------------------------------------------------------------------ grammar


def spec_of(
    seconds: Sequence[int] = (0,),
    minutes: Sequence[int] = ALL_MINUTES,
    hours: Sequence[int] = ALL_HOURS,
    days: Sequence[int] = ALL_DAYS,
    months: Sequence[int] = ALL_MONTHS,
    weekdays: Sequence[int] = ALL_WEEKDAYS,
    *,
    dom: bool = False,
    dow: bool = False,
) -> CronSpec:
    return CronSpec(tuple(seconds), tuple(minutes), tuple(hours), tuple(days), tuple(months), tuple(weekdays), dom, dow)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("* * * * *", spec_of()),
        ("0 2 * * *", spec_of(minutes=[0], hours=[2])),
        ("*/15 * * * *", spec_of(minutes=[0, 15, 30, 45])),
        ("5-20/5 * * * *", spec_of(minutes=[5, 10, 15, 20])),
        ("50/5 * * * *", spec_of(minutes=[50, 55])),
        ("1,2,3,2 * * * *", spec_of(minutes=[1, 2, 3])),
        ("0-4,58-59 * * * *", spec_of(minutes=[0, 1, 2, 3, 4, 58, 59])),
        ("0 0 1,15 * *", spec_of(minutes=[0], hours=[0], days=[1, 15], dom=True)),
        ("0 0 * jan,JUL *", spec_of(minutes=[0], hours=[0], months=[1, 7])),
        ("0 0 * mar-may *", spec_of(minutes=[0], hours=[0], months=[3, 4, 5])),
        ("0 0 * jan-dec/3 *", spec_of(minutes=[0], hours=[0], months=[1, 4, 7, 10])),
        ("0 0 * * mon-fri", spec_of(minutes=[0], hours=[0], weekdays=[1, 2, 3, 4, 5], dow=True)),
        ("0 0 * * 7", spec_of(minutes=[0], hours=[0], weekdays=[0], dow=True)),
        ("0 0 * * 5-7", spec_of(minutes=[0], hours=[0], weekdays=[0, 5, 6], dow=True)),
        ("0 0 * * sun,7,0", spec_of(minutes=[0], hours=[0], weekdays=[0], dow=True)),
        ("0 0 * * 0-7", spec_of(minutes=[0], hours=[0], dow=True)),
        ("0 0 */2 * *", spec_of(minutes=[0], hours=[0], days=range(1, 32, 2))),
        ("0 0 1 * 1", spec_of(minutes=[0], hours=[0], days=[1], weekdays=[1], dom=True, dow=True)),
        ("*/2 * * * * *", spec_of(seconds=range(0, 60, 2))),
        ("30 0 12 * * *", spec_of(seconds=[30], minutes=[0], hours=[12])),
        ("  0   2\t* * *  ", spec_of(minutes=[0], hours=[2])),
        ("@yearly", spec_of(minutes=[0], hours=[0], days=[1], months=[1], dom=True)),
        ("@annually", spec_of(minutes=[0], hours=[0], days=[1], months=[1], dom=True)),
        ("@monthly", spec_of(minutes=[0], hours=[0], days=[1], dom=True)),
        ("@weekly", spec_of(minutes=[0], hours=[0], weekdays=[0], dow=True)),
        ("@daily", spec_of(minutes=[0], hours=[0])),
        ("@midnight", spec_of(minutes=[0], hours=[0])),
        ("@hourly", spec_of(minutes=[0])),
        ("@DAILY", spec_of(minutes=[0], hours=[0])),
    ],
)
def test_parse(text: str, expected: CronSpec) -> None:
    spec = CronSpec.parse(text)
    assert spec == expected
    assert str(spec) == text.strip()


@pytest.mark.parametrize(("macro", "expansion"), sorted(MACROS.items()))
def test_macros_equal_their_expansion(macro: str, expansion: str) -> None:
    assert CronSpec.parse(macro) == CronSpec.parse(expansion)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected 5 fields"),
        ("* * * *", "expected 5 fields .* got 4"),
        ("* * * * * * *", "got 7"),
        ("61 * * * *", "minute: 61 is outside 0-59"),
        ("* 24 * * *", "hour: 24 is outside 0-23"),
        ("* * 0 * *", "day-of-month: 0 is outside 1-31"),
        ("* * 32 * *", "day-of-month: 32 is outside 1-31"),
        ("* * * 13 *", "month: 13 is outside 1-12"),
        ("* * * 0 *", "month: 0 is outside 1-12"),
        ("* * * * 8", "day-of-week: 8 is outside 0-7"),
        ("60 * * * * *", "second: 60 is outside 0-59"),
        ("*/0 * * * *", "minute: step must be at least 1"),
        ("5-1 * * * *", "minute: range 5-1 runs backwards"),
        ("* * * * sat-sun", "day-of-week: range 6-0 runs backwards"),
        ("1,,2 * * * *", "minute: empty list element"),
        ("1, * * * *", "minute: empty list element"),
        ("a * * * *", "minute: value 'a' is not a number"),
        ("* * * foo *", "month: value 'foo' is not a number or one of jan"),
        ("* * * * funday", "day-of-week: value 'funday' is not a number or one of sun"),
        ("* jan * * *", "hour: value 'jan'"),
        ("1- * * * *", "minute: a value is missing"),
        ("-1 * * * *", "minute: a value is missing"),
        ("*/ * * * *", "minute: a step is missing"),
        ("*/x * * * *", "minute: step 'x' is not a number"),
        ("*/2/3 * * * *", "minute: step '2/3' is not a number"),
        ("1-2-3 * * * *", "minute: value '2-3'"),
        ("*-5 * * * *", "minute: value '\\*'"),
        ("? * * * *", "minute: value '\\?'"),
        ("L * * * *", "minute: value 'L'"),
        ("\u0661 * * * *", "minute: value"),  # an Arabic-Indic digit one: not cron's ASCII
        ("@reboot", "unknown macro '@reboot'"),
        ("@daily extra", "unknown macro"),
        ("99999999999999999999 * * * *", "minute: 99999999999999999999 is outside 0-59"),
    ],
)
def test_invalid_specs_name_the_field_and_problem(text: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        CronSpec.parse(text)


def test_parse_rejects_a_non_string() -> None:
    with pytest.raises(ScheduleError, match="must be a string"):
        CronSpec.parse(None)  # type: ignore[arg-type]


def test_schedule_error_is_a_value_error() -> None:
    assert issubclass(ScheduleError, ValueError)


@given(st.text(alphabet=" */-,0123456789@?LW#abcdefhijlmnorstuwy\t\u0663", max_size=40))
@settings(max_examples=400)
def test_any_text_parses_or_raises_schedule_error(text: str) -> None:
    outcome = parse_or_error(text)
    if isinstance(outcome, ScheduleError):
        # Never an IndexError or a bare int() complaint: the message says where the problem is.
        assert str(outcome).startswith(ERROR_PREFIXES)
    else:
        assert all((outcome.seconds, outcome.minutes, outcome.hours, outcome.days, outcome.months, outcome.weekdays))


ERROR_PREFIXES = (*(f"{name}: " for name in FIELD_NAMES), "expected 5 fields", "unknown macro")


def parse_or_error(text: str) -> CronSpec | ScheduleError:
    try:
        return CronSpec.parse(text)
    except ScheduleError as exc:
        return exc


@given(st.one_of(five_field_specs, six_field_specs))
@settings(max_examples=300)
def test_generated_specs_parse_within_bounds(text: str) -> None:
    spec = CronSpec.parse(text)
    for values, low, high in (
        (spec.seconds, 0, 59),
        (spec.minutes, 0, 59),
        (spec.hours, 0, 23),
        (spec.days, 1, 31),
        (spec.months, 1, 12),
        (spec.weekdays, 0, 6),
    ):
        assert values
        assert list(values) == sorted(set(values))
        assert low <= values[0]
        assert values[-1] <= high
    assert CronSpec.parse(text) == spec


def test_day_rule_is_either_when_both_day_fields_are_restricted() -> None:
    # 2026-06-01 is a Monday; the 1st of July a Wednesday; 2026-06-08 a Monday that is not the 1st.
    spec = CronSpec.parse("0 0 1 * mon")
    assert spec.matches_day(date(2026, 6, 1))
    assert spec.matches_day(date(2026, 7, 1))
    assert spec.matches_day(date(2026, 6, 8))
    assert not spec.matches_day(date(2026, 6, 9))


def test_day_rule_is_both_when_a_day_field_starts_with_a_star() -> None:
    # Vixie cron: "*/2" counts as unrestricted, so the days must be odd AND Mondays.
    spec = CronSpec.parse("0 0 */2 * mon")
    assert spec.matches_day(date(2026, 6, 1))  # Monday the 1st
    assert not spec.matches_day(date(2026, 6, 8))  # Monday the 8th
    assert not spec.matches_day(date(2026, 6, 3))  # Wednesday the 3rd
    weekdays_only = CronSpec.parse("0 0 * * mon")
    assert weekdays_only.matches_day(date(2026, 6, 8))
    assert not weekdays_only.matches_day(date(2026, 6, 9))


def test_matches_requires_whole_seconds() -> None:
    spec = CronSpec.parse("* * * * *")
    assert spec.matches(datetime(2026, 6, 1, 3, 4))
    assert not spec.matches(datetime(2026, 6, 1, 3, 4, 0, 1))
    assert not spec.matches(datetime(2026, 6, 1, 3, 4, 5))


# ------------------------------------------------------------------------------------------ next_run


@pytest.mark.parametrize(
    ("text", "after", "tz", "expected"),
    [
        ("0 2 * * *", utc(2026, 11, 24, 1, 0), UTC_ZONE, utc(2026, 11, 24, 2, 0)),
        ("0 2 * * *", utc(2026, 11, 24, 2, 0), UTC_ZONE, utc(2026, 11, 25, 2, 0)),  # strictly after
        ("0 2 * * *", utc(2026, 11, 24, 1, 59, 59, 999999), UTC_ZONE, utc(2026, 11, 24, 2, 0)),
        ("0 2 * * *", utc(2026, 11, 24, 2, 0, 0, 1), UTC_ZONE, utc(2026, 11, 25, 2, 0)),
        ("0 2 * * *", utc(2026, 11, 24, 1, 0), TOKYO, utc(2026, 11, 24, 17, 0)),
        ("0 2 * * *", utc(2026, 12, 31, 23, 0), UTC_ZONE, utc(2027, 1, 1, 2, 0)),
        ("*/15 * * * *", utc(2026, 11, 24, 10, 7), UTC_ZONE, utc(2026, 11, 24, 10, 15)),
        ("*/2 * * * * *", utc(2026, 11, 24, 10, 7, 59), UTC_ZONE, utc(2026, 11, 24, 10, 8, 0)),
        ("*/2 * * * * *", utc(2026, 11, 24, 10, 7, 58, 500000), UTC_ZONE, utc(2026, 11, 24, 10, 8, 0)),
        ("@yearly", utc(2026, 11, 24), UTC_ZONE, utc(2027, 1, 1)),
        ("@monthly", utc(2026, 11, 24), UTC_ZONE, utc(2026, 12, 1)),
        ("@weekly", utc(2026, 11, 24), UTC_ZONE, utc(2026, 11, 29)),  # the next Sunday
        ("@daily", utc(2026, 11, 24, 0, 0, 1), UTC_ZONE, utc(2026, 11, 25)),
        ("@hourly", utc(2026, 11, 24, 23, 30), UTC_ZONE, utc(2026, 11, 25)),
        ("0 0 29 2 *", utc(2026, 3, 1), UTC_ZONE, utc(2028, 2, 29)),
        ("0 0 29 2 *", utc(2096, 2, 29, 0, 0, 1), UTC_ZONE, utc(2104, 2, 29)),  # 2100 is no leap year
        ("0 0 31 * *", utc(2026, 4, 1), UTC_ZONE, utc(2026, 5, 31)),
        ("0 0 30 2 mon", utc(2026, 2, 1), UTC_ZONE, utc(2026, 2, 2)),  # impossible day OR any Monday
        ("0 0 13 * fri", utc(2026, 2, 1), UTC_ZONE, utc(2026, 2, 6)),
        ("0 0 */2 * fri", utc(2026, 2, 1), UTC_ZONE, utc(2026, 2, 13)),  # odd AND Friday
        ("0 9 * * mon-fri", utc(2026, 11, 27, 10), UTC_ZONE, utc(2026, 11, 30, 9)),
        # Asia/Kolkata is UTC+5:30: local midnight is 18:30 UTC the day before.
        ("0 0 * * *", utc(2026, 11, 24, 12), KOLKATA, utc(2026, 11, 24, 18, 30)),
    ],
)
def test_next_run_examples(text: str, after: datetime, tz: ZoneInfo, expected: datetime) -> None:
    result = next_run(CronSpec.parse(text), after, tz)
    assert result == expected
    assert result.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "after", "tz", "expected"),
    [
        # Europe/Berlin springs forward at 02:00 CET (01:00 UTC) to 03:00 CEST on 2026-03-29.
        ("30 2 * * *", local(BERLIN, 2026, 3, 29, 0), BERLIN, utc(2026, 3, 29, 1, 0)),
        ("30 2 * * *", utc(2026, 3, 29, 1, 0), BERLIN, utc(2026, 3, 30, 0, 30)),
        ("0 2 * * *", local(BERLIN, 2026, 3, 29, 0), BERLIN, utc(2026, 3, 29, 1, 0)),
        ("0 3 * * *", local(BERLIN, 2026, 3, 29, 0), BERLIN, utc(2026, 3, 29, 1, 0)),
        ("0 4 * * *", local(BERLIN, 2026, 3, 29, 0), BERLIN, utc(2026, 3, 29, 2, 0)),
        ("59 1 * * *", local(BERLIN, 2026, 3, 29, 0), BERLIN, utc(2026, 3, 29, 0, 59)),
        # Gap slots collapse into one run at the gap's end, then the schedule carries on after it.
        ("*/15 * * * *", local(BERLIN, 2026, 3, 29, 1, 50), BERLIN, utc(2026, 3, 29, 1, 0)),
        ("*/15 * * * *", utc(2026, 3, 29, 1, 0), BERLIN, utc(2026, 3, 29, 1, 15)),
        ("*/2 * * * * *", local(BERLIN, 2026, 3, 29, 1, 59, 59), BERLIN, utc(2026, 3, 29, 1, 0)),
        # Europe/Berlin falls back at 03:00 CEST (01:00 UTC) to 02:00 CET on 2026-10-25: 02:30 runs once.
        ("30 2 * * *", local(BERLIN, 2026, 10, 25, 0), BERLIN, utc(2026, 10, 25, 0, 30)),
        ("30 2 * * *", utc(2026, 10, 25, 0, 30), BERLIN, utc(2026, 10, 26, 1, 30)),
        ("0 * * * *", utc(2026, 10, 25, 0, 0), BERLIN, utc(2026, 10, 25, 2, 0)),  # the repeated 02:00 is skipped
        ("0 3 * * *", utc(2026, 10, 25, 0, 30), BERLIN, utc(2026, 10, 25, 2, 0)),
        ("*/30 * * * *", local(BERLIN, 2026, 10, 25, 2, 10, fold=1), BERLIN, utc(2026, 10, 25, 2, 0)),
        # America/New_York: 02:00 EST -> 03:00 EDT on 2026-03-08; 02:00 EDT -> 01:00 EST on 2026-11-01.
        ("30 2 * * *", local(NEW_YORK, 2026, 3, 8, 0), NEW_YORK, utc(2026, 3, 8, 7, 0)),
        ("30 2 * * *", local(NEW_YORK, 2026, 3, 9, 0), NEW_YORK, utc(2026, 3, 9, 6, 30)),
        ("30 1 * * *", local(NEW_YORK, 2026, 11, 1, 0), NEW_YORK, utc(2026, 11, 1, 5, 30)),
        ("30 1 * * *", utc(2026, 11, 1, 5, 30), NEW_YORK, utc(2026, 11, 2, 6, 30)),
        ("30 1 * * *", local(NEW_YORK, 2026, 11, 1, 1, 10, fold=1), NEW_YORK, utc(2026, 11, 2, 6, 30)),
        ("*/15 * * * *", local(NEW_YORK, 2026, 11, 1, 1, 50), NEW_YORK, utc(2026, 11, 1, 7, 0)),
        # Australia/Lord_Howe moves by 30 minutes: 02:00 -> 02:30 on 2026-10-04 (15:30 UTC the day before).
        ("15 2 * * *", local(LORD_HOWE, 2026, 10, 4, 0), LORD_HOWE, utc(2026, 10, 3, 15, 30)),
        ("45 1 * * *", local(LORD_HOWE, 2026, 4, 5, 0), LORD_HOWE, utc(2026, 4, 4, 14, 45)),
    ],
)
def test_next_run_across_dst(text: str, after: datetime, tz: ZoneInfo, expected: datetime) -> None:
    assert next_run(CronSpec.parse(text), after, tz) == expected


def test_fall_back_hour_runs_each_wall_time_once() -> None:
    spec = CronSpec.parse("*/20 * * * *")
    runs = []
    instant = utc(2026, 10, 24, 23, 50)
    while instant < utc(2026, 10, 25, 3, 0):
        instant = next_run(spec, instant, BERLIN)
        runs.append(instant.astimezone(BERLIN).strftime("%H:%M%z"))
    assert runs == [
        "02:00+0200",
        "02:20+0200",
        "02:40+0200",
        "03:00+0100",
        "03:20+0100",
        "03:40+0100",
        "04:00+0100",
    ]


@pytest.mark.parametrize(
    "text",
    ["0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 31 2 *", "0 0 30,31 feb *", "0 0 31 apr,jun,sep,nov *"],
)
def test_unsatisfiable_spec_raises_instead_of_looping(text: str) -> None:
    spec = CronSpec.parse(text)
    with pytest.raises(ScheduleError, match="no run within 8 years"):
        next_run(spec, utc(2026, 1, 1), UTC_ZONE)
    with pytest.raises(ScheduleError, match="no run within 8 years"):
        previous_run(spec, utc(2026, 1, 1), UTC_ZONE)


def test_next_run_needs_an_aware_datetime() -> None:
    with pytest.raises(ScheduleError, match="timezone-aware"):
        next_run(CronSpec.parse("@daily"), datetime(2026, 1, 1), UTC_ZONE)


@pytest.mark.parametrize("tz", [UTC_ZONE, TOKYO, NEW_YORK])
def test_searches_at_the_ends_of_time_raise_schedule_error(tz: ZoneInfo) -> None:
    spec = CronSpec.parse("0 0 1 1 *")
    with pytest.raises(ScheduleError, match="no run"):
        next_run(spec, utc(9999, 6, 1), tz)
    with pytest.raises(ScheduleError, match="no run"):
        next_run(spec, datetime.max.replace(tzinfo=UTC), tz)
    with pytest.raises(ScheduleError, match="no run"):
        previous_run(CronSpec.parse("0 0 2 1 *"), datetime.min.replace(tzinfo=UTC), tz)


def test_a_century_of_yearly_runs_steps_one_year_at_a_time() -> None:
    spec = CronSpec.parse("0 3 1 jan *")
    instant = utc(2000, 6, 1)
    for year in range(2001, 2101):
        instant = next_run(spec, instant, BERLIN)
        assert instant == local(BERLIN, year, 1, 1, 3).astimezone(UTC)


@given(five_field_specs, moments_in_zones)
@settings(max_examples=250, deadline=None)
def test_next_run_is_the_first_run_after(text: str, case: tuple[datetime, ZoneInfo]) -> None:
    after, tz = case
    spec = CronSpec.parse(text)
    window_end = after + timedelta(days=800)
    try:
        result = next_run(spec, after, tz)
    except ScheduleError:
        # Only a spec with no run in 8 years may raise; the brute force must find none either.
        assert first_run_after(spec, after, window_end, tz) is None
        return
    assert result > after
    assert result.tzinfo is UTC
    assert is_run(spec, result, tz, MINUTE)
    expected = first_run_after(spec, after, min(result, window_end), tz)
    if result <= window_end:
        assert expected == result
    else:
        assert expected is None


SPRING_GAPS = (
    local(BERLIN, 2026, 3, 29, 2),
    local(NEW_YORK, 2026, 3, 8, 2),
    local(LORD_HOWE, 2026, 10, 4, 2),
    local(SYDNEY, 2026, 10, 4, 2),
)
FALL_OVERLAPS = (
    local(BERLIN, 2026, 10, 25, 2),
    local(NEW_YORK, 2026, 11, 1, 1),
    local(LORD_HOWE, 2026, 4, 5, 1, 30),
    local(SYDNEY, 2026, 4, 5, 2),
)


@given(
    minute_fields,
    st.one_of(st.just("*"), st.just("2"), st.just("1,2"), st.just("2-3"), hour_fields),
    st.sampled_from(SPRING_GAPS + FALL_OVERLAPS),
    st.timedeltas(-timedelta(minutes=150), timedelta(minutes=90)),
)
@settings(max_examples=250, deadline=None)
def test_next_run_around_dst_transitions(minutes: str, hours: str, transition: datetime, shift: timedelta) -> None:
    """Specs that have slots in or around the changed hour, asked about moments just before and inside it."""
    spec = CronSpec.parse(f"{minutes} {hours} * * *")
    tz = transition.tzinfo
    assert isinstance(tz, ZoneInfo)
    after = transition.astimezone(UTC) + shift
    result = next_run(spec, after, tz)
    assert is_run(spec, result, tz, MINUTE)
    assert first_run_after(spec, after, result, tz) == result


@given(six_field_specs, moments_in_zones)
@settings(max_examples=120, deadline=None)
def test_next_run_per_second_is_the_first_run_after(text: str, case: tuple[datetime, ZoneInfo]) -> None:
    after, tz = case
    spec = CronSpec.parse(text)
    result = next_run(spec, after, tz)
    assert result > after
    assert is_run(spec, result, tz, SECOND)
    window_end = after + timedelta(hours=2)
    expected = first_run_after(spec, after, min(result, window_end), tz)
    assert expected == (result if result <= window_end else None)


@given(five_field_specs, moments_in_zones)
@settings(max_examples=150, deadline=None)
def test_next_run_does_not_depend_on_the_zone_after_is_given_in(text: str, case: tuple[datetime, ZoneInfo]) -> None:
    after, tz = case
    spec = CronSpec.parse(text)
    try:
        expected = next_run(spec, after, tz)
    except ScheduleError:
        return
    assert next_run(spec, after.astimezone(tz), tz) == expected
    assert next_run(spec, after.astimezone(TOKYO), tz) == expected


# ------------------------------------------------------------------------------------------ previous_run


@given(five_field_specs, moments_in_zones)
@settings(max_examples=200, deadline=None)
def test_previous_run_is_the_last_run_at_or_before(text: str, case: tuple[datetime, ZoneInfo]) -> None:
    at, tz = case
    spec = CronSpec.parse(text)
    try:
        result = previous_run(spec, at, tz)
    except ScheduleError:
        assert runs_between(spec, at - timedelta(days=800), at, tz) == []
        return
    assert result <= at
    assert is_run(spec, result, tz, MINUTE)
    assert runs_between(spec, result, at, tz) == []
    # And the two searches agree: the run after the previous one is the first run after ``at``.
    assert next_run(spec, result, tz) > at


@given(six_field_specs, moments_in_zones)
@settings(max_examples=80, deadline=None)
def test_previous_run_per_second(text: str, case: tuple[datetime, ZoneInfo]) -> None:
    at, tz = case
    spec = CronSpec.parse(text)
    result = previous_run(spec, at, tz)
    assert result <= at
    assert is_run(spec, result, tz, SECOND)
    assert runs_between(spec, max(result, at - timedelta(hours=2)), at, tz) == []


def test_previous_run_in_the_repeated_hour_sees_its_first_pass() -> None:
    # 01:10 EST on 2026-11-01 comes after 01:45 EDT, which ran 25 minutes earlier: a wall time later
    # than ``at``'s own can still be the previous run.
    at = local(NEW_YORK, 2026, 11, 1, 1, 10, fold=1)
    assert previous_run(CronSpec.parse("45 1 * * *"), at, NEW_YORK) == utc(2026, 11, 1, 5, 45)
    assert previous_run(CronSpec.parse("*/15 * * * *"), at, NEW_YORK) == utc(2026, 11, 1, 5, 45)
    assert previous_run(CronSpec.parse("5 1 * * *"), at, NEW_YORK) == utc(2026, 11, 1, 5, 5)
    assert missed_run(CronSpec.parse("45 1 * * *"), utc(2026, 10, 31, 12), at, NEW_YORK) == utc(2026, 11, 1, 5, 45)


def test_previous_run_at_a_gap_end_is_that_run() -> None:
    at = local(NEW_YORK, 2026, 3, 8, 3, 0)
    assert previous_run(CronSpec.parse("30 2 * * *"), at, NEW_YORK) == at.astimezone(UTC)


# ------------------------------------------------------------------------------------------ missed_run


@pytest.mark.parametrize(
    ("last_run", "now", "expected"),
    [
        (None, utc(2026, 11, 24, 12), None),  # a fresh agent waits for the next slot
        (utc(2026, 11, 24, 2), utc(2026, 11, 24, 12), None),  # nothing due since the last run
        (utc(2026, 11, 20, 2), utc(2026, 11, 24, 12), utc(2026, 11, 24, 2)),  # four missed: one run
        (utc(2026, 11, 20, 2), utc(2026, 11, 24, 2), utc(2026, 11, 24, 2)),  # now is inclusive
        (utc(2026, 11, 23, 2), utc(2026, 11, 24, 1, 59), None),
        (utc(2026, 11, 23, 1), utc(2026, 11, 23, 3), utc(2026, 11, 23, 2)),
        (utc(2026, 11, 24, 12), utc(2026, 11, 24, 11), None),  # a clock that went backwards
        (utc(2019, 1, 1), utc(2026, 11, 24, 12), utc(2026, 11, 24, 2)),  # years of downtime
    ],
)
def test_missed_run_examples(last_run: datetime | None, now: datetime, expected: datetime | None) -> None:
    assert missed_run(CronSpec.parse("0 2 * * *"), last_run, now, UTC_ZONE) == expected


def test_missed_run_compares_instants_not_wall_times() -> None:
    # 01:50 EDT then 01:10 EST: 20 minutes later, though the wall clock went back. The 01:00 EST slot is
    # the repeated hour's second pass and does not run, so nothing was missed.
    spec = CronSpec.parse("0 * * * *")
    last_run = local(NEW_YORK, 2026, 11, 1, 1, 50)
    now = local(NEW_YORK, 2026, 11, 1, 1, 10, fold=1)
    assert missed_run(spec, last_run, now, NEW_YORK) is None
    assert missed_run(spec, last_run, local(NEW_YORK, 2026, 11, 1, 2, 5), NEW_YORK) == utc(2026, 11, 1, 7)


def test_missed_run_after_a_long_outage_of_a_per_second_schedule_is_one_run() -> None:
    spec = CronSpec.parse("*/2 * * * * *")
    assert missed_run(spec, utc(2025, 1, 1), utc(2026, 11, 24, 12, 0, 7), UTC_ZONE) == utc(2026, 11, 24, 12, 0, 6)


def test_missed_run_raises_for_an_unsatisfiable_spec() -> None:
    with pytest.raises(ScheduleError):
        missed_run(CronSpec.parse("0 0 30 2 *"), utc(2026, 1, 1), utc(2026, 6, 1), UTC_ZONE)


def test_missed_run_needs_aware_datetimes() -> None:
    spec = CronSpec.parse("@daily")
    with pytest.raises(ScheduleError, match="now must be"):
        missed_run(spec, utc(2026, 1, 1), datetime(2026, 1, 5), UTC_ZONE)
    with pytest.raises(ScheduleError, match="last_run must be"):
        missed_run(spec, datetime(2026, 1, 1), utc(2026, 1, 5), UTC_ZONE)


@given(
    five_field_specs,
    moments_in_zones,
    st.timedeltas(timedelta(0), timedelta(days=3)),
)
@settings(max_examples=150, deadline=None)
def test_missed_run_is_at_most_one_slot_and_the_latest(
    text: str, case: tuple[datetime, ZoneInfo], downtime: timedelta
) -> None:
    last_run, tz = case
    spec = CronSpec.parse(text)
    now = last_run + downtime
    slots = runs_between(spec, last_run, now, tz)
    try:
        result = missed_run(spec, last_run, now, tz)
    except ScheduleError:
        assert slots == []
        return
    assert result == (slots[-1] if slots else None)


@given(six_field_specs, moments_in_zones, st.timedeltas(timedelta(0), timedelta(minutes=30)))
@settings(max_examples=60, deadline=None)
def test_missed_run_per_second(text: str, case: tuple[datetime, ZoneInfo], downtime: timedelta) -> None:
    last_run, tz = case
    spec = CronSpec.parse(text)
    now = last_run + downtime
    slots = runs_between(spec, last_run, now, tz)
    assert missed_run(spec, last_run, now, tz) == (slots[-1] if slots else None)


# ------------------------------------------------------------------------------------------ jitter


@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.sampled_from(ZONES)),
    st.floats(min_value=0, max_value=7 * 86400, allow_nan=False),
    st.text(max_size=40),
)
@settings(max_examples=300)
def test_jitter_is_within_bounds_and_deterministic(run_at: datetime, max_jitter: float, key: str) -> None:
    result = jitter(run_at, max_jitter, key)
    offset = result - run_at
    assert offset >= timedelta(0)
    assert offset == timedelta(0) or offset / timedelta(microseconds=1) < max_jitter * 1_000_000
    assert result.tzinfo is run_at.tzinfo
    assert jitter(run_at, max_jitter, key) == result


@pytest.mark.parametrize("max_jitter", [0.0, 1e-7, 5e-7])
def test_jitter_below_a_microsecond_is_no_jitter(max_jitter: float) -> None:
    assert jitter(utc(2026, 11, 24, 2), max_jitter, "nightly/app") == utc(2026, 11, 24, 2)


def test_jitter_of_one_microsecond_is_zero() -> None:
    assert jitter(utc(2026, 11, 24, 2), 1e-6, "nightly/app") == utc(2026, 11, 24, 2)


def test_jitter_spreads_keys() -> None:
    run_at = utc(2026, 11, 24, 2)
    offsets = {jitter(run_at, 900, f"nightly/db{n}") - run_at for n in range(200)}
    assert len(offsets) == 200
    # The spread covers the window, not a corner of it: both halves are used.
    assert min(offsets) < timedelta(seconds=450) < max(offsets)


def test_jitter_is_stable_across_processes() -> None:
    # A fixed value pins the hash: a restarted (or upgraded) agent must keep its place in the spread.
    offset = jitter(utc(2026, 11, 24, 2), 600, "nightly/app") - utc(2026, 11, 24, 2)
    assert offset == jitter(utc(2020, 1, 1), 600, "nightly/app") - utc(2020, 1, 1)
    assert offset == timedelta(seconds=409, microseconds=445353)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), -float("inf")])
def test_jitter_rejects_bad_bounds(bad: float) -> None:
    with pytest.raises(ValueError, match="max_jitter_seconds"):
        jitter(utc(2026, 11, 24, 2), bad, "nightly/app")
