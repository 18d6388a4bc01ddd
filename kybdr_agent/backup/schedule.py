"""Cron schedules: when each backup policy runs next, and which run was missed while the agent was down.

PURE. The scheduler loop owns the clock; everything here takes ``now``/``after`` as a parameter, so a
policy's whole future can be computed (and tested) without waiting for it. No ``croniter``: the grammar is
small, and owning it lets us pin down the two things libraries disagree on — daylight saving time and the
day-of-month/day-of-week rule — instead of inheriting whatever a dependency's next release decides.

Grammar: classic 5-field cron (minute hour day-of-month month day-of-week) or 6 fields with a leading
seconds field. Each field is ``*``, a number, a range ``a-b``, a list ``a,b``, and steps ``*/n``, ``a-b/n``
and ``a/n`` (``a`` to the field's maximum). Months and weekdays take names (``jan``, ``mon``), weekday 7 is
Sunday, and the macros ``@yearly @annually @monthly @weekly @daily @midnight @hourly`` stand for their
usual expansions.

Day matching follows Vixie cron (and cronie, which every Linux host runs): a field that starts with ``*``
(``*`` or ``*/n``) is *unrestricted*; when both day fields are restricted a day matches if EITHER matches
(``0 0 1 * mon`` = the 1st and every Monday), otherwise both must match.

Fields are evaluated in the policy's local time, and local time is not continuous. Our rules, chosen so a
backup is never silently skipped and never doubled:

* **Gap (spring forward).** A matching wall time that does not exist runs at the first instant after the
  gap (``30 2 * * *`` in New York on the spring-forward day runs at 03:00 EDT). This is what Vixie cron
  does for fixed-time jobs; skipping instead would lose one daily backup a year. Several slots in one gap
  collapse into that single instant.
* **Overlap (fall back).** An ambiguous wall time runs once, at its first occurrence (``fold=0``). The
  repeated hour's slots are not run again — a per-minute schedule pauses for that hour rather than running
  twice.

With these rules the map from local wall time to instant is non-decreasing, which is what lets the search
walk candidate wall times in order and stop at the first one past ``after``.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Final

SEARCH_YEARS: Final = 8
"""How far ahead (or back) a search looks before declaring the spec unsatisfiable.

Eight years is the longest gap between two matches of any satisfiable spec: ``0 0 29 2 *`` skips the
non-leap year 2100, so 2096-02-29 is followed by 2104-02-29.
"""
_SEARCH_DAYS: Final = SEARCH_YEARS * 366 + 1

FIELD_NAMES: Final = ("second", "minute", "hour", "day-of-month", "month", "day-of-week")
_BOUNDS: Final = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_MONTH_NAMES: Final = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1
    )
}
_WEEKDAY_NAMES: Final = {name: number for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_NAMES: Final[dict[str, dict[str, int]]] = {"month": _MONTH_NAMES, "day-of-week": _WEEKDAY_NAMES}
MACROS: Final = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_JITTER_DOMAIN: Final = b"kybdr-agent jitter\x00"


class ScheduleError(ValueError):
    """A cron expression is malformed, or can never match; the message names the field and the problem."""


@dataclass(frozen=True)
class CronSpec:
    """A parsed cron expression: the allowed values of each field, sorted, so the search can bisect.

    ``weekdays`` use cron numbering (0 = Sunday … 6 = Saturday; 7 has been folded into 0). The two
    ``*_restricted`` flags carry the Vixie day rule; ``text`` is what the operator wrote, kept for messages
    and left out of equality (``@daily`` equals ``0 0 * * *``).
    """

    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]
    day_of_month_restricted: bool
    day_of_week_restricted: bool
    text: str = field(default="", compare=False)

    @classmethod
    def parse(cls, text: str) -> CronSpec:
        """Parse 5 fields, 6 fields (leading seconds) or a macro; anything else is a ``ScheduleError``."""
        if not isinstance(text, str):
            raise ScheduleError(f"a cron expression must be a string, not {type(text).__name__}")
        stripped = text.strip()
        expanded = MACROS.get(stripped.lower(), stripped)
        if expanded.startswith("@"):
            raise ScheduleError(f"unknown macro {stripped!r} (known: {', '.join(MACROS)})")
        parts = expanded.split()
        if len(parts) == 5:
            parts = ["0", *parts]
        elif len(parts) != 6:
            raise ScheduleError(
                f"expected 5 fields (or 6 with a leading seconds field), got {len(parts)} in {stripped!r}"
            )
        values = [
            _parse_field(name, part, low, high)
            for name, part, (low, high) in zip(FIELD_NAMES, parts, _BOUNDS, strict=True)
        ]
        weekdays = tuple(sorted({day % 7 for day in values[5]}))
        return cls(
            seconds=values[0],
            minutes=values[1],
            hours=values[2],
            days=values[3],
            months=values[4],
            weekdays=weekdays,
            day_of_month_restricted=not parts[3].startswith("*"),
            day_of_week_restricted=not parts[5].startswith("*"),
            text=stripped,
        )

    def matches_day(self, day: date) -> bool:
        """Whether a local calendar day can hold runs: its month, and the Vixie either/both day rule."""
        if day.month not in self.months:
            return False
        by_month_day = day.day in self.days
        by_weekday = day.isoweekday() % 7 in self.weekdays
        if self.day_of_month_restricted and self.day_of_week_restricted:
            return by_month_day or by_weekday
        return by_month_day and by_weekday

    def matches(self, local: datetime) -> bool:
        """Whether a local wall time (its tzinfo, if any, is ignored) is one of the spec's slots."""
        return (
            local.microsecond == 0
            and local.second in self.seconds
            and local.minute in self.minutes
            and local.hour in self.hours
            and self.matches_day(local.date())
        )

    def __str__(self) -> str:
        return self.text


def _parse_field(name: str, text: str, low: int, high: int) -> tuple[int, ...]:
    if not text:
        raise ScheduleError(f"{name}: empty field")
    chosen: set[int] = set()
    for item in text.split(","):
        chosen.update(_parse_item(name, item, low, high))
    return tuple(sorted(chosen))


def _parse_item(name: str, item: str, low: int, high: int) -> range:
    if not item:
        raise ScheduleError(f"{name}: empty list element")
    base, slash, step_text = item.partition("/")
    step = 1
    if slash:
        step = _parse_number(name, step_text, "step")
        if step < 1:
            raise ScheduleError(f"{name}: step must be at least 1, got {step}")
    if base == "*":
        return range(low, high + 1, step)
    first_text, dash, last_text = base.partition("-")
    first = _parse_value(name, first_text, low, high)
    if dash:
        last = _parse_value(name, last_text, low, high)
        if first > last:
            raise ScheduleError(f"{name}: range {first}-{last} runs backwards")
    else:
        # "a/n" is "a" to the field's end in steps of n (cronie, Quartz); a bare "a" is just "a".
        last = high if slash else first
    return range(first, last + 1, step)


def _parse_value(name: str, text: str, low: int, high: int) -> int:
    names = _NAMES.get(name, {})
    value = names.get(text.lower()) if names else None
    if value is None:
        value = _parse_number(name, text, "value")
        if not low <= value <= high:
            raise ScheduleError(f"{name}: {value} is outside {low}-{high}")
    return value


def _parse_number(name: str, text: str, what: str) -> int:
    if not text:
        raise ScheduleError(f"{name}: a {what} is missing")
    # isdecimal() alone would accept other scripts' digits; cron is ASCII.
    if not (text.isascii() and text.isdecimal()):
        raise ScheduleError(f"{name}: {what} {text!r} is not a number" + _name_hint(name))
    return int(text)


def _name_hint(name: str) -> str:
    names = _NAMES.get(name)
    return f" or one of {', '.join(names)}" if names else ""


# ------------------------------------------------------------------------------------------ local time


def _local_to_utc(wall: datetime, tz: tzinfo) -> datetime:
    """The instant a local wall time runs at, by the module's DST rules (first occurrence; gap → its end)."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # ``wall`` is in a gap. fold=1 reads it with the offset after the transition and fold=0 with the one
    # before, so the transition lies in (later_offset_reading, first]; bisect it to the second.
    low = int(wall.replace(tzinfo=tz, fold=1).timestamp())
    high = int(first.timestamp())
    if low >= high:  # a tzinfo that ignores fold: nothing better to offer than PEP 495's reading
        return first
    after_offset = first.astimezone(tz).utcoffset()
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, tz).utcoffset() == after_offset:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


def _offset(value: datetime) -> timedelta:
    return value.utcoffset() or timedelta(0)


def _check_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ScheduleError(f"{name} must be a timezone-aware datetime, got {value!r}")


def _days(start: date, step: int) -> Iterator[date]:
    """``start`` and the days after (step 1) or before (step -1) it, at most the search bound."""
    day = start
    delta = timedelta(days=step)
    for _ in range(_SEARCH_DAYS):
        yield day
        try:
            day += delta
        except OverflowError:
            return


def _times_forward(spec: CronSpec, start: time | None) -> Iterator[time]:
    """Slot times of one day in order, from ``start`` (inclusive) or from midnight."""
    if start is None:
        start = time.min
    for hour in spec.hours[bisect_left(spec.hours, start.hour) :]:
        from_minute = start.minute if hour == start.hour else 0
        for minute in spec.minutes[bisect_left(spec.minutes, from_minute) :]:
            from_second = start.second if (hour, minute) == (start.hour, start.minute) else 0
            for second in spec.seconds[bisect_left(spec.seconds, from_second) :]:
                yield time(hour, minute, second)


def _times_backward(spec: CronSpec, start: time | None) -> Iterator[time]:
    """Slot times of one day in reverse order, from ``start`` (inclusive) or from the day's last second."""
    if start is None:
        start = time(23, 59, 59)
    for hour in reversed(spec.hours[: bisect_right(spec.hours, start.hour)]):
        to_minute = start.minute if hour == start.hour else 59
        for minute in reversed(spec.minutes[: bisect_right(spec.minutes, to_minute)]):
            to_second = start.second if (hour, minute) == (start.hour, start.minute) else 59
            for second in reversed(spec.seconds[: bisect_right(spec.seconds, to_second)]):
                yield time(hour, minute, second)


def _walls(spec: CronSpec, start: datetime, step: int) -> Iterator[datetime]:
    """Matching naive wall times from ``start`` (inclusive), forwards (step 1) or backwards (step -1)."""
    times = _times_forward if step > 0 else _times_backward
    first_day = start.date()
    for day in _days(first_day, step):
        if spec.matches_day(day):
            for slot in times(spec, start.time() if day == first_day else None):
                yield datetime.combine(day, slot)


def _unsatisfiable(spec: CronSpec, direction: str, at: datetime) -> ScheduleError:
    return ScheduleError(f"{spec.text or spec!r}: no run within {SEARCH_YEARS} years {direction} {at.isoformat()}")


# ------------------------------------------------------------------------------------------ public API


def next_run(spec: CronSpec, after: datetime, tz: tzinfo) -> datetime:
    """The first slot strictly after ``after``, as an aware UTC datetime; fields are read in ``tz``.

    Walks days (skipping those the day fields exclude) and, within a matching day, only the allowed
    hours/minutes/seconds, so a yearly spec costs a few thousand cheap day checks, never a scan by second.
    """
    _check_aware("after", after)
    # Every wall time earlier than after's own maps to an instant at or before ``after`` (the map is
    # non-decreasing and fold=0 is the earlier reading), so the walk can start at after's wall time.
    try:
        start = after.astimezone(tz).replace(tzinfo=None, fold=0, microsecond=0)
        for wall in _walls(spec, start, 1):
            instant = _local_to_utc(wall, tz)
            if instant > after:
                return instant
    except OverflowError:
        # Ran into datetime's year 1 or 9999: as unsatisfiable as a spec can get.
        pass
    raise _unsatisfiable(spec, "after", after)


def previous_run(spec: CronSpec, at: datetime, tz: tzinfo) -> datetime:
    """The latest slot at or before ``at``, as an aware UTC datetime; the mirror image of ``next_run``."""
    _check_aware("at", at)
    try:
        local = at.astimezone(tz)
        # In the second pass of a repeated hour, wall times up to the fold's width later than ``at``'s
        # still ran (at their first occurrence), before ``at``: start the backward walk there.
        fold_width = max(timedelta(0), _offset(local.replace(fold=0)) - _offset(local))
        start = (local.replace(tzinfo=None, fold=0) + fold_width).replace(microsecond=0)
        for wall in _walls(spec, start, -1):
            instant = _local_to_utc(wall, tz)
            if instant <= at:
                return instant
    except OverflowError:
        pass
    raise _unsatisfiable(spec, "before", at)


def missed_run(spec: CronSpec, last_run: datetime | None, now: datetime, tz: tzinfo) -> datetime | None:
    """The latest slot in ``(last_run, now]`` — the one run to make up after downtime — or None.

    However many slots passed while the agent was down, only the latest is returned: a backup taken now
    covers them all, and running N catch-up backups back to back would only load the database. A fresh
    agent (``last_run`` None) has missed nothing and waits for the next slot.
    """
    _check_aware("now", now)
    if last_run is None:
        return None
    _check_aware("last_run", last_run)
    if next_run(spec, last_run, tz) > now:
        return None
    return previous_run(spec, now, tz)


def jitter(run_at: datetime, max_jitter_seconds: float, key: str) -> datetime:
    """``run_at`` plus a stable offset in ``[0, max_jitter_seconds)`` derived from ``key``.

    Hosts sharing a schedule (and a repository) would otherwise all start ``pg_dump`` and hit S3 in the
    same second. The offset comes from a hash of ``key`` (policy name + database), not from a random
    generator, so it survives restarts: a restarted agent keeps its place in the spread, and the slot it
    computes is the one it computed before. Resolution is one microsecond, datetime's own.
    """
    if math.isnan(max_jitter_seconds) or math.isinf(max_jitter_seconds) or max_jitter_seconds < 0:
        raise ValueError(f"max_jitter_seconds must be a finite number >= 0, got {max_jitter_seconds}")
    # Whole microseconds, rounded down, and an offset taken modulo the span: always strictly below the bound.
    span = math.floor(max_jitter_seconds * 1_000_000)
    if span <= 0:
        return run_at
    digest = hashlib.sha256(_JITTER_DOMAIN + key.encode("utf-8", "surrogatepass")).digest()
    return run_at + timedelta(microseconds=int.from_bytes(digest[:8], "big") % span)
