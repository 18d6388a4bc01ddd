"""What the ``kybdr-agent`` commands print on success: tables and lines for people, JSON with ``--json``.

Kept apart from ``cli`` so that module is about running a command (parsing, dispatch, signals, exit status)
and this one only about how a result reads. Warnings and a failed check's one line go to stderr, as before.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from collections.abc import Callable
from typing import Any, Final, ParamSpec

from kybdr_agent.telemetry.logs import WARNING, stderr_line

P = ParamSpec("P")


def _flushed(printer: Callable[P, None]) -> Callable[P, None]:
    """Each printer writes out what it buffered before it returns, inside the command, not at exit.

    When the reader has gone (``kybdr-agent config check | head -1``), the failed write then raises
    ``BrokenPipeError`` inside the command, where ``cli`` ends it quietly; left to the interpreter's final
    flush, the same error printed "Exception ignored ... BrokenPipeError" on stderr and exited 120.
    """

    @functools.wraps(printer)
    def printed(*args: P.args, **kwargs: P.kwargs) -> None:
        printer(*args, **kwargs)
        sys.stdout.flush()

    return printed


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


@_flushed
def print_config(masked: dict[str, Any], args: argparse.Namespace) -> None:
    """The effective configuration: JSON with ``--json``, else TOML that ``tomllib`` reads back (unset
    values shown as comments, since TOML has no null), ending in a comment saying it is valid."""
    if args.json:
        print_json(masked)
    else:
        for section, values in masked.items():
            print("\n".join(_toml_table(f"[{_toml_key(section)}]", _toml_key(section), values)))
            print()
        print("# configuration is valid")


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPES: Final = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def _toml_table(header: str, path: str, values: dict[str, Any]) -> list[str]:
    """A table (``header`` is ``[path]`` or ``[[path]]``): its plain keys first, then its sub-tables and
    arrays of tables, as TOML wants every plain key of a table before the next header."""
    lines = [header]
    nested: list[str] = []
    for key, value in values.items():
        inner = f"{path}.{_toml_key(key)}"
        if value is None:
            lines.append(f"# {_toml_key(key)} = (not set)")
        elif isinstance(value, dict):
            nested += ["", *_toml_table(f"[{inner}]", inner, value)]
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for item in value:
                nested += ["", *_toml_table(f"[[{inner}]]", inner, item)]
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value, key)}")
    return lines + nested


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any, key: str = "") -> str:
    """One value inline. A file mode is shown in octal (``0o660``), as it is written; an inline table
    cannot hold a comment, so an unset value inside one is left out."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"0o{value:o}" if key.endswith("_mode") and value >= 0 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = [f"{_toml_key(str(k))} = {_toml_value(v, str(k))}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(pairs) + " }" if pairs else "{}"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped; a lone surrogate (an
    undecodable byte in a path) becomes U+FFFD, since TOML text is UTF-8."""
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        elif 0xD800 <= ord(char) <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


@_flushed
def print_backups(made: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if args.json:
        print_json(made[0] if len(made) == 1 else made)
    else:
        for m in made:
            print(m["id"])


@_flushed
def _notices(document: dict[str, Any]) -> None:
    """What the reader must know about where an answer came from (a region that could not be read)."""
    for message in document.get("notices", []):
        stderr_line(f"kybdr-agent: {message}", WARNING)


def print_backup_list(found: dict[str, Any], args: argparse.Namespace) -> None:
    for item in found["unreadable"]:
        stderr_line(
            f"kybdr-agent: warning: {item['key']} is not a valid manifest ({item['problem']}); not listed", WARNING
        )
    _notices(found)
    for region, state in found.get("regions", {}).items():
        if not state.get("reachable", True):
            stderr_line(
                f"kybdr-agent: warning: the {region} region's repository could not be read ({state.get('error')}); "
                "where backups live is shown from what could be read",
                WARNING,
            )
    backups = found["backups"]
    windows = {w["system_identifier"]: w for w in found.get("recovery_windows", [])}
    if args.json:
        # Still an array of manifests; a physical backup carries its cluster's recoverable window.
        for m in backups:
            if m.get("kind") == "physical" and m.get("physical"):
                m["recovery_window"] = windows.get(m["physical"]["system_identifier"])
        print_json(backups)
        return
    for window in windows.values():
        print(_window_line(window))
    if not backups:
        print("no backups")
        return
    rows = [
        [
            m["id"],
            m["database"],
            m["status"],
            m["finished_at"][:19].replace("T", " ") + "Z",
            human_bytes(m["stored_bytes"]),
            m["compression"],
            m["encryption"]["cipher"],
            ",".join(m.get("locations", [])) or "-",
        ]
        for m in backups
    ]
    print(table(rows, ["ID", "DATABASE", "STATUS", "FINISHED", "STORED", "COMPRESSION", "CIPHER", "WHERE"]))


@_flushed
def print_manifest(m: dict[str, Any], args: argparse.Namespace) -> None:
    _notices(m)
    if args.json:
        print_json(m)
        return
    ratio = m["dump_bytes"] / m["stored_bytes"] if m["stored_bytes"] else 0
    physical = m.get("physical")
    rows = [
        ["id", m["id"]],
        ["kind", m.get("kind", "logical")],
        ["cluster" if physical else "database", physical["system_identifier"] if physical else m["database"]],
        ["status", m["status"]],
        ["started", m["started_at"]],
        ["finished", m["finished_at"]],
        ["duration", f"{m['duration_seconds']:.1f} s"],
        ["server", m["server_version"]],
        ["pg_basebackup" if physical else "pg_dump", m["pg_dump_version"]],
        ["tar size" if physical else "dump size", human_bytes(m["dump_bytes"])],
    ]
    if physical:
        rows += [
            ["timeline", str(physical["timeline"])],
            ["WAL needed", f"{physical['start_lsn']} to {physical['stop_lsn']}"],
            ["consistent from", physical["stop_time"]],
        ]
    rows += [
        ["stored size", f"{human_bytes(m['stored_bytes'])} ({ratio:.2f}x)"],
        ["compression", m["compression"]],
        ["cipher", m["encryption"]["cipher"]],
        ["key id", m["encryption"]["key_id"] or "-"],
        ["sha256", m["sha256"]],
        ["object", m["object_key"]],
        ["stored in", ", ".join(m.get("locations", [])) or "-"],
        ["globals", "- (the cluster's roles are in the base backup)" if physical else _globals_line(m.get("globals"))],
        ["parts", str(m["part_count"] or "-")],
        ["tables counted", "-" if physical else str(len(m["row_counts"]))],
        ["labels", ", ".join(m["labels"]) or "-"],
        ["description", m["description"] or "-"],
    ]
    print(table(rows, ["FIELD", "VALUE"]))


def _globals_line(g: dict[str, Any] | None) -> str:
    if not g:
        return "- (made before roles were recorded)"
    passwords = "with role passwords" if g["role_passwords"] else "without role passwords"
    return f"{g['object_key']} ({human_bytes(g['stored_bytes'])}, {passwords})"


@_flushed
def print_restore(result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print_json(result)
    else:
        replaced = " (replaced the existing database)" if result["replaced_existing"] else ""
        if result.get("terminated_sessions"):
            replaced += f", terminating {result['terminated_sessions']} client session(s) connected to it"
        source = " from the DR region's copy" if result.get("region") == "dr" else ""
        print(
            f"restored {result['backup_id']}{source} into {result['target_database']}{replaced} "
            f"in {result['seconds']:.1f} s ({human_bytes(result['dump_bytes'])} of dump)"
        )
        if result.get("renamed"):
            print("added: " + ", ".join(f"{old} as {new}" for old, new in result["renamed"].items()))
        elif result.get("tables"):
            print(f"tables: {', '.join(result['tables'])}")
        applied = result.get("globals")
        if applied:
            print(
                f"globals: {len(applied['roles_created'])} role(s) created, {len(applied['roles_existing'])} "
                f"already there and left as they were, {len(applied['tablespaces_created'])} tablespace(s) created"
            )


@_flushed
def print_validation(result: dict[str, Any], args: argparse.Namespace) -> None:
    _notices(result)
    if args.json:
        print_json(result)
    else:
        for check in result["checks"]:
            print(f"ok    {check}")
        where = ", the DR region's copy" if result.get("region") == "dr" else ""
        if result["ok"]:
            print(f"backup {args.backup_id} is valid ({args.level}{where}, {result['seconds']:.1f} s)")
        else:
            print(f"FAIL  {result['error']}")
    if not result["ok"]:
        stderr_line(f"kybdr-agent: validate failed: {result['error']}")


@_flushed
def print_cleanup(result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print_json(result)
        return
    gone = result["would_delete"] if args.dry_run else result["deleted"]
    verb = "would delete" if args.dry_run else "deleted"
    for backup_id in gone:
        print(f"{verb:12}  {backup_id}  ({result['reasons'].get(backup_id, '')})")
    for backup_id in result["kept"]:
        print(f"{'keep':12}  {backup_id}  ({result['reasons'].get(backup_id, '')})")
    print(
        f"{verb} {len(gone)} backup(s), kept {len(result['kept'])}, "
        f"{human_bytes(result['freed_bytes'])} {'to free' if args.dry_run else 'freed'}"
    )
    for system_identifier, wal in (result.get("wal") or {}).items():
        if wal.get("error"):
            stderr_line(f"kybdr-agent: warning: {wal['error']}", WARNING)
            continue
        count = wal["would_delete_count"] if args.dry_run else wal["deleted"] + wal["orphans_deleted"]
        more = f", {wal['remaining']} left for the next pass" if wal.get("remaining") else ""
        print(
            f"WAL of cluster {system_identifier}: {verb} {count} file(s), kept {wal['kept']}, "
            f"{human_bytes(wal['bytes_freed'])} {'to free' if args.dry_run else 'freed'}{more}"
        )
    dr = result.get("dr")
    if dr is not None:
        if dr.get("error"):
            stderr_line(f"kybdr-agent: warning: {dr['error']}", WARNING)
        else:
            dr_gone = dr["would_delete"] if args.dry_run else dr["deleted"]
            print(
                f"DR region: {verb} {len(dr_gone)} backup(s), kept {len(dr['kept'])}, "
                f"{human_bytes(dr['freed_bytes'])} {'to free' if args.dry_run else 'freed'}"
            )


@_flushed
def print_contents(document: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print_json(document)
        return
    from kybdr_agent.backup.contents_doc import render_text

    for line in render_text(document):
        print(line)


@_flushed
def print_backfill(result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print_json(result)
        return
    for backup_id in result["copied"]:
        print(f"copied  {backup_id}")
    for backup_id, error in result["failed"].items():
        stderr_line(f"kybdr-agent: backfill failed at {backup_id}: {error}")
    print(f"copied {len(result['copied'])} backup(s) to the DR region; {result['still_missing']} still missing there")


@_flushed
def print_stats(stats: dict[str, Any], args: argparse.Namespace) -> None:
    """The statistics document (``backup.stats.render_stats``) as lines and a table: every nested value is
    spelt out here, so nothing reaches the reader as a Python dict or list."""
    if args.json:
        print_json(stats)
        return
    backups = stats["backups"]
    print(
        f"backups: {backups['count']} stored, {human_bytes(backups['stored_bytes'])} "
        f"({human_bytes(backups.get('dump_bytes', 0))} of dumps)"
    )
    outcomes = ", ".join(f"{count} {outcome}" for outcome, count in stats["by_outcome"].items())
    rate = stats["success_rate"]
    print(f"outcomes: {outcomes or 'none recorded'}; success rate {'-' if rate is None else f'{rate:.1%}'}")
    if stats["duration_seconds"]:
        d = stats["duration_seconds"]
        print(f"duration: p50 {d['p50']:.1f} s, p90 {d['p90']:.1f} s, max {d['max']:.1f} s")
    failure = stats.get("last_failure")
    if failure:
        print(
            f"last failure: {_when(failure.get('at'))} {failure.get('database') or '-'}: {failure.get('error') or '-'}"
        )
    drill = stats.get("last_drill")
    if drill:
        print(f"last drill: {drill.get('status', '-')} {_when(drill.get('finished_at'))}{_drill_detail(drill)}")
    if stats.get("unreadable_manifests"):
        print(f"unreadable manifests: {stats['unreadable_manifests']} (see `kybdr-agent list`)")
    rows = [
        [
            db,
            str(e["count"]),
            human_bytes(e["stored_bytes"]),
            e["last_good_id"],
            f"{e['last_good_age_seconds'] / 3600:.1f} h",
        ]
        for db, e in sorted(stats["databases"].items())
    ]
    if rows:
        print(table(rows, ["DATABASE", "BACKUPS", "STORED", "LAST GOOD", "AGE"]))


def _when(timestamp: object) -> str:
    """An ISO timestamp from the journal as ``2026-01-01 02:00:00Z``; "-" if there is none."""
    if not isinstance(timestamp, str) or len(timestamp) < 19:
        return "-"
    return timestamp[:19].replace("T", " ") + "Z"


def _drill_detail(drill: dict[str, Any]) -> str:
    """How many of a drill job's restores passed, or its error: the job record's result is free-form."""
    if drill.get("error"):
        return f": {drill['error']}"
    result = drill.get("result")
    runs = result.get("drills") if isinstance(result, dict) else None
    if not isinstance(runs, list) or not runs:
        return ""
    passed = sum(1 for run in runs if isinstance(run, dict) and run.get("passed"))
    return f": {passed} of {len(runs)} restore(s) passed"


@_flushed
def print_drills(result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print_json(result)
    else:
        for drill in result["drills"]:
            verdict = "PASS" if drill["passed"] else "FAIL"
            detail = f"restored in {drill.get('restore_seconds', 0):.1f} s, {drill.get('tables_compared', 0)} tables"
            if drill.get("kind") == "physical" and drill.get("rto_seconds") is not None:
                detail = f"point-in-time restore answering after {drill['rto_seconds']:.1f} s (RTO)"
            print(f"{verdict}  {drill['database']}  {drill['backup_id']}  {drill.get('error') or detail}")
    failed = [d for d in result["drills"] if not d["passed"]]
    if failed:
        stderr_line(f"kybdr-agent: test failed: {len(failed)} restore drill(s) failed")


@_flushed
def print_status(status: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print_json(status)
        return
    agent = status["agent"]
    print(
        f"agent {agent['status']}: version {agent['version']}, up {agent['uptime_seconds']:.0f} s, "
        f"{agent['jobs_running']} job(s) running"
    )
    housekeeping = agent.get("housekeeping") or {}
    if housekeeping.get("error"):
        print(f"last sweep failed: {housekeeping['error']}")
    for name, why in (housekeeping.get("scratch_not_dropped") or {}).items():
        print(f"scratch database {name} was not dropped: {why}")
    rows = [[j["id"], j["kind"], j["status"], j["database"] or "-", j["created_at"][:19]] for j in status["jobs"]]
    if rows:
        print(table(rows, ["JOB", "KIND", "STATUS", "DATABASE", "CREATED"]))


def _window_line(window: dict[str, Any]) -> str:
    """One cluster's recoverable window for people: its newest interval, and why it ends there."""
    cluster = f"cluster {window['system_identifier']}"
    if window.get("error"):
        return f"{cluster}: recoverable window unknown ({window['error']})"
    if not window.get("latest_recovery_time"):
        why = f" ({window['problems'][0]})" if window.get("problems") else ""
        return f"{cluster}: nothing recoverable to a point in time{why}"
    line = f"{cluster}: recoverable from {window['earliest_recovery_time']} to {window['latest_recovery_time']}"
    if window.get("gaps"):
        line += f" (WAL missing at {window['gaps'][0]}: the window ends there)"
    return line
