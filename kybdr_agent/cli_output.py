"""What the ``kybdr-agent`` commands print on success: tables and lines for people, JSON with ``--json``.

Kept apart from ``cli`` so that module is about running a command (parsing, dispatch, signals, exit status)
and this one only about how a result reads. Warnings and a failed check's one line go to stderr, as before.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


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


def print_config(masked: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print_json(masked)
    else:
        for section, values in masked.items():
            print(f"[{section}]")
            for key, value in values.items():
                print(f"{key} = {json.dumps(value)}")
            print()
        print("configuration is valid")


def print_backups(made: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if args.json:
        print_json(made[0] if len(made) == 1 else made)
    else:
        for m in made:
            print(m["id"])


def print_backup_list(found: dict[str, Any], args: argparse.Namespace) -> None:
    for item in found["unreadable"]:
        print(
            f"kybdr-agent: warning: {item['key']} is not a valid manifest ({item['problem']}); not listed",
            file=sys.stderr,
        )
    backups = found["backups"]
    if args.json:
        print_json(backups)
        return
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
        ]
        for m in backups
    ]
    print(table(rows, ["ID", "DATABASE", "STATUS", "FINISHED", "STORED", "COMPRESSION", "CIPHER"]))


def print_manifest(m: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print_json(m)
        return
    ratio = m["dump_bytes"] / m["stored_bytes"] if m["stored_bytes"] else 0
    rows = [
        ["id", m["id"]],
        ["database", m["database"]],
        ["status", m["status"]],
        ["started", m["started_at"]],
        ["finished", m["finished_at"]],
        ["duration", f"{m['duration_seconds']:.1f} s"],
        ["server", m["server_version"]],
        ["pg_dump", m["pg_dump_version"]],
        ["dump size", human_bytes(m["dump_bytes"])],
        ["stored size", f"{human_bytes(m['stored_bytes'])} ({ratio:.2f}x)"],
        ["compression", m["compression"]],
        ["cipher", m["encryption"]["cipher"]],
        ["key id", m["encryption"]["key_id"] or "-"],
        ["sha256", m["sha256"]],
        ["object", m["object_key"]],
        ["parts", str(m["part_count"] or "-")],
        ["tables counted", str(len(m["row_counts"]))],
        ["labels", ", ".join(m["labels"]) or "-"],
        ["description", m["description"] or "-"],
    ]
    print(table(rows, ["FIELD", "VALUE"]))


def print_restore(result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print_json(result)
    else:
        replaced = " (replaced the existing database)" if result["replaced_existing"] else ""
        if result.get("terminated_sessions"):
            replaced += f", terminating {result['terminated_sessions']} client session(s) connected to it"
        print(
            f"restored {result['backup_id']} into {result['target_database']}{replaced} "
            f"in {result['seconds']:.1f} s ({human_bytes(result['dump_bytes'])} of dump)"
        )


def print_validation(result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print_json(result)
    else:
        for check in result["checks"]:
            print(f"ok    {check}")
        if result["ok"]:
            print(f"backup {args.backup_id} is valid ({args.level}, {result['seconds']:.1f} s)")
        else:
            print(f"FAIL  {result['error']}")
    if not result["ok"]:
        print(f"kybdr-agent: validate failed: {result['error']}", file=sys.stderr)


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


def print_stats(stats: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print_json(stats)
        return
    rate = stats["success_rate"]
    print(
        f"backups: {stats['backups']['count']} stored, {human_bytes(stats['backups']['stored_bytes'])}; "
        f"success rate {'-' if rate is None else f'{rate:.1%}'} {stats['by_outcome']}"
    )
    if stats["duration_seconds"]:
        d = stats["duration_seconds"]
        print(f"duration: p50 {d['p50']:.1f} s, p90 {d['p90']:.1f} s, max {d['max']:.1f} s")
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


def print_drills(result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print_json(result)
    else:
        for drill in result["drills"]:
            verdict = "PASS" if drill["passed"] else "FAIL"
            detail = f"restored in {drill.get('restore_seconds', 0):.1f} s, {drill.get('tables_compared', 0)} tables"
            print(f"{verdict}  {drill['database']}  {drill['backup_id']}  {drill.get('error') or detail}")
    failed = [d for d in result["drills"] if not d["passed"]]
    if failed:
        print(f"kybdr-agent: test failed: {len(failed)} restore drill(s) failed", file=sys.stderr)


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
