"""PURE. The recovery settings a point-in-time restore writes into the restored data directory, as text, and the
signal file that makes PostgreSQL use them.

Since PostgreSQL 12 recovery is configured by ordinary settings plus an empty ``recovery.signal`` in the data
directory; the restore appends ``conf_text()`` to ``postgresql.auto.conf`` (read last, so it wins over the
copied ``postgresql.conf``). Every ``recovery_target*`` parameter is written, the unused ones as ``''``: a base
backup of a server that was itself restored carries its old target in its ``postgresql.auto.conf``, and two
different targets set at once stop PostgreSQL ("multiple recovery targets specified"). A later line of the
same name wins, so ours replace theirs.

**restore_command** is a shell command with no agent process in it: ``cp`` from a local spool the restore
fills ahead of PostgreSQL. PostgreSQL runs it through ``/bin/sh`` with ``%f`` replaced by the file it wants
(``000000010000000000000003``, ``00000002.history``) and ``%p`` by where to put it (``pg_wal/RECOVERYXLOG``),
``%%`` by ``%``. The spool's path is therefore quoted twice: for the shell (single quotes), then its ``%``
doubled, then the whole value quoted for the configuration file (``'`` doubled, ``\\`` doubled — the file's
parser reads backslash escapes). A path with control characters is refused.

The spool protocol, when ``wait`` is on (the fetcher works while PostgreSQL replays):

* ``<spool>/<f>`` complete (the fetcher renames it into place once verified) → copied, exit 0 (a failed copy,
  a full disk say, exits ``EXIT_COPY_FAILED``: exit 1 would read as the end of the WAL);
* ``<spool>/<f>.pending`` → planned but not fetched yet: wait for it (at most ``wait_seconds``, then exit
  ``EXIT_WAIT_TIMEOUT``);
* ``<spool>/<f>.failed`` → fetching or verifying it failed: its text goes to PostgreSQL's log and the command
  exits ``EXIT_FETCH_FAILED``;
* nothing → not in the plan: exit 1, which PostgreSQL reads as "not in the archive" (the end of the WAL, or a
  history file that does not exist).

Exit statuses above 125 make PostgreSQL abort recovery (``wait_result_is_any_signal`` in
``RestoreArchivedFile``) instead of taking the end of the WAL as reached and promoting: a segment that
failed verification must stop the restore, never open a silently shorter database. ``<spool>/<f>.wanted`` is
touched on every request so the fetcher can see how far recovery has got and bound its look-ahead.
"""

from __future__ import annotations

import shlex
import unicodedata
from dataclasses import dataclass
from typing import Final, Literal

from kybdr_agent.wal.names import MAX_TIMELINE, WalError, format_lsn
from kybdr_agent.wal.targets import (
    ImmediateTarget,
    LatestTarget,
    LsnTarget,
    NameTarget,
    RecoveryTarget,
    TimeTarget,
)

SIGNAL_FILE: Final = "recovery.signal"
STANDBY_SIGNAL_FILE: Final = "standby.signal"  # a backup taken with -R has one; it must not stay
AUTO_CONF_FILE: Final = "postgresql.auto.conf"

PENDING_SUFFIX: Final = ".pending"
FAILED_SUFFIX: Final = ".failed"
WANTED_SUFFIX: Final = ".wanted"
EXIT_FETCH_FAILED: Final = 200
EXIT_WAIT_TIMEOUT: Final = 201
EXIT_COPY_FAILED: Final = 202
DEFAULT_WAIT_SECONDS: Final = 900
_POLLS_PER_SECOND: Final = 5

TARGET_PARAMETERS: Final = (
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
)
Action = Literal["promote", "pause", "shutdown"]
Timeline = int | Literal["latest", "current"]


class RecoverySettingsError(WalError):
    """A recovery setting cannot be written safely (a path with control characters, a bad timeline …)."""


def _no_controls(value: str, what: str) -> None:
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise RecoverySettingsError(f"{what} contains a control character")


def conf_quote(value: str) -> str:
    """``value`` as a quoted string of ``postgresql.conf``: ``'`` doubled, ``\\`` doubled, no control chars."""
    _no_controls(value, "a configuration value")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def restore_command(
    spool_dir: str, *, wait: bool = True, wait_seconds: int = DEFAULT_WAIT_SECONDS, announce: bool = True
) -> str:
    """The ``restore_command`` copying from ``spool_dir`` (absolute), following the spool protocol above when
    ``wait``; only the copy otherwise (the spool must then be complete before PostgreSQL starts)."""
    if not isinstance(spool_dir, str) or not spool_dir.startswith("/"):
        raise RecoverySettingsError(f"the WAL spool must be an absolute path, not {spool_dir!r}")
    _no_controls(spool_dir, "the WAL spool path")
    if not 1 <= wait_seconds <= 86_400:
        raise RecoverySettingsError("wait_seconds must be from 1 to 86400")
    spool = shlex.quote(spool_dir.rstrip("/") or "/").replace("%", "%%")
    copy = f'cp "$d/$f" "%p" || exit {EXIT_COPY_FAILED}'
    if not wait:
        return "; ".join([f'd={spool}; f="%f"', '[ -f "$d/$f" ] || exit 1', copy])
    polls = wait_seconds * _POLLS_PER_SECOND
    steps = [
        f'd={spool}; f="%f"; i=0',
        f'true 2>/dev/null >"$d/$f{WANTED_SUFFIX}"' if announce else "",
        f'while [ -e "$d/$f{PENDING_SUFFIX}" ]; do if [ $i -ge {polls} ]; then '
        f'echo "kybdr-agent restore: gave up waiting for $f after {wait_seconds} s" >&2; exit {EXIT_WAIT_TIMEOUT}; '
        f"fi; i=$((i+1)); sleep {1 / _POLLS_PER_SECOND}; done",
        f'if [ -e "$d/$f{FAILED_SUFFIX}" ]; then cat "$d/$f{FAILED_SUFFIX}" >&2; exit {EXIT_FETCH_FAILED}; fi',
        '[ -f "$d/$f" ] || exit 1',
        copy,
    ]
    return "; ".join(step for step in steps if step)


def _timeline_setting(timeline: Timeline) -> str:
    if timeline in ("latest", "current"):
        return str(timeline)
    if isinstance(timeline, bool) or not isinstance(timeline, int) or not 1 <= timeline <= MAX_TIMELINE:
        raise RecoverySettingsError(f"{timeline!r} is not a recovery target timeline")
    return str(timeline)


@dataclass(frozen=True)
class RecoverySettings:
    """What the restored server recovers with.

    ``timeline`` is the planned lineage's tip (``FetchPlan.timeline``), named explicitly: with every archived
    history file in the spool, ``'latest'`` could follow a sibling branch (see ``wal.fetch_plan``)."""

    restore_command: str
    target: RecoveryTarget
    timeline: Timeline
    action: Action = "promote"
    disable_archiving: bool = False  # drills: a scratch copy must not archive into the source's repository

    def parameters(self) -> tuple[tuple[str, str], ...]:
        """The settings in the order they are written; the target's own parameter comes after the blanks."""
        if self.action not in ("promote", "pause", "shutdown"):
            raise RecoverySettingsError(f"{self.action!r} is not a recovery_target_action")
        target = self.target
        chosen: list[tuple[str, str]] = []
        if isinstance(target, TimeTarget):
            chosen = [("recovery_target_time", target.setting), ("recovery_target_inclusive", _on(target.inclusive))]
        elif isinstance(target, LsnTarget):
            lsn = format_lsn(target.lsn)
            chosen = [("recovery_target_lsn", lsn), ("recovery_target_inclusive", _on(target.inclusive))]
        elif isinstance(target, NameTarget):
            chosen = [("recovery_target_name", target.name)]
        elif isinstance(target, ImmediateTarget):
            chosen = [("recovery_target", "immediate")]
        elif not isinstance(target, LatestTarget):
            raise RecoverySettingsError(f"{target!r} is not a recovery target")
        named = {name for name, _ in chosen}
        blanks = [(name, "") for name in TARGET_PARAMETERS if name not in named]
        settings = [
            ("restore_command", self.restore_command),
            *blanks,
            *chosen,
            ("recovery_target_timeline", _timeline_setting(self.timeline)),
            ("recovery_target_action", self.action),
        ]
        if self.disable_archiving:
            settings.append(("archive_mode", "off"))
        return tuple(settings)

    def conf_text(self, comment: str = "point-in-time recovery written by kybdr-agent") -> str:
        """The block appended to ``postgresql.auto.conf`` (a comment line, then ``name = 'value'`` lines)."""
        _no_controls(comment, "the comment")
        lines = [f"# {comment}"] + [f"{name} = {conf_quote(value)}" for name, value in self.parameters()]
        return "\n".join(lines) + "\n"


def _on(flag: bool) -> str:
    return "on" if flag else "off"
