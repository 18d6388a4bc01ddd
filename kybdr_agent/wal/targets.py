"""PURE. Recovery targets — a time, an LSN, a restore point's name, consistency, or the end of the WAL — parsed
from what an operator types and checked the way PostgreSQL 15 checks them, so a typo fails before anything is
downloaded rather than after a base backup has been written out.

PostgreSQL's checks (``check_recovery_target_*`` in ``src/backend/access/transam/xlogrecovery.c``): an LSN is
what ``pg_lsn`` reads; a name is shorter than 64 bytes (``MAXFNAMELEN``); a time is anything ``timestamptz``
parses except ``now``/``today``/``tomorrow``/``yesterday``, interpreted **in the server's ``TimeZone``** when it
carries no zone. That last rule is why a time here must carry its zone: the restored server's time zone is
whatever its copied ``postgresql.conf`` says, which is not necessarily the operator's. The accepted syntax is
ISO 8601 (``2026-12-02 03:22:11.5+01:00``, ``…T…Z``); it is handed to PostgreSQL normalised to UTC with
microseconds, PostgreSQL's own precision.

How PostgreSQL stops (``recoveryStopsBefore``/``recoveryStopsAfter``): a time target stops at the first commit
or abort record whose timestamp is after the target (at or after it when not inclusive) — so the rows a
restore to T shows are exactly those committed at or before T. An LSN target stops after (before, when not
inclusive) the first record at or past the LSN. A name stops at the first restore point of that name after
consistency. Since PostgreSQL 14 a recovery that reaches the end of the WAL without reaching its target fails
(FATAL "recovery ended before configured recovery target was reached") instead of promoting.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from kybdr_agent.wal.names import WalError, WalNameError, check_lsn, parse_lsn

MAX_NAME_BYTES: Final = 63  # MAXFNAMELEN - 1
_REFUSED_TIMES: Final = frozenset({"now", "today", "tomorrow", "yesterday", "epoch", "infinity", "-infinity"})


class TargetError(WalError):
    """A recovery target is not valid."""


@dataclass(frozen=True, slots=True)
class TimeTarget:
    """Recover to the state as of ``at``: every transaction committed at or before it (before it, when not
    ``inclusive``) and none after."""

    at: datetime
    inclusive: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.at, datetime) or self.at.tzinfo is None or self.at.utcoffset() is None:
            raise TargetError("a target time must carry its time zone")

    @property
    def setting(self) -> str:
        """The value of ``recovery_target_time``: UTC, microseconds (``2026-12-02 03:22:11.383054+00:00``)."""
        return self.at.astimezone(UTC).isoformat(sep=" ", timespec="microseconds")


@dataclass(frozen=True, slots=True)
class LsnTarget:
    """Recover up to the record at ``lsn`` (through it when ``inclusive``)."""

    lsn: int
    inclusive: bool = True

    def __post_init__(self) -> None:
        try:
            check_lsn(self.lsn)
        except WalNameError as exc:
            raise TargetError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class NameTarget:
    """Recover to the first restore point of this name (``pg_create_restore_point``) after consistency."""

    name: str

    def __post_init__(self) -> None:
        check_restore_point_name(self.name)


@dataclass(frozen=True, slots=True)
class ImmediateTarget:
    """Stop as soon as the base backup is consistent: its own point in time, no later."""


@dataclass(frozen=True, slots=True)
class LatestTarget:
    """No target: replay every WAL segment there is, to the end of the archive."""


RecoveryTarget = TimeTarget | LsnTarget | NameTarget | ImmediateTarget | LatestTarget


def parse_target_time(text: str, *, inclusive: bool = True) -> TimeTarget:
    """An ISO 8601 time with its zone (``2026-12-02 03:22:11+01:00``, ``2026-12-02T02:22:11Z``)."""
    cleaned = text.strip() if isinstance(text, str) else ""
    if cleaned.lower() in _REFUSED_TIMES:
        raise TargetError(f"{cleaned!r} is not a fixed point in time; give a date and time with a zone")
    try:
        at = datetime.fromisoformat(cleaned)
    except ValueError:
        raise TargetError(
            f"{text!r} is not a time (expected ISO 8601 with a zone, e.g. 2026-12-02 03:22:11+00:00)"
        ) from None
    if at.tzinfo is None:
        raise TargetError(
            f"{text!r} has no time zone; add one (+00:00, Z, +01:00): a zone-less time would be read in "
            "the restored server's TimeZone setting"
        )
    return TimeTarget(at, inclusive)


def parse_target_lsn(text: str, *, inclusive: bool = True) -> LsnTarget:
    try:
        return LsnTarget(parse_lsn(text.strip() if isinstance(text, str) else text), inclusive)
    except WalNameError as exc:
        raise TargetError(str(exc)) from None


def check_restore_point_name(name: str) -> str:
    """A restore point name PostgreSQL accepts (1–63 bytes), without control characters, which no restore point
    created through SQL carries and which would not survive the configuration file."""
    if not isinstance(name, str) or not name:
        raise TargetError("a restore point name is empty")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise TargetError("a restore point name contains a control character")
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise TargetError(f"a restore point name is at most {MAX_NAME_BYTES} bytes; this one is {size}")
    return name


def parse_target_name(text: str) -> NameTarget:
    return NameTarget(check_restore_point_name(text))
