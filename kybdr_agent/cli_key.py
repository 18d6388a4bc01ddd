"""``kybdr-agent key status|rotate``: which key opens which backup, and moving every backup to the current key.

``rotate`` re-wraps each backup's data key under the current master key (``encryption.key_file``, or the KMS
key with ``key_provider = "kms"``) without touching the data (``backup/rotate.py``), in the repository and, with
``backup.cross_region``, in the DR bucket. It is safe to interrupt and to run again: it resumes where it
stopped. ``status`` counts, per location, the backups each configured key opens and lists the ones none opens:
an old key file can be removed from ``encryption.old_key_files`` once it opens nothing anywhere.

The procedure: put the new key in ``key_file`` and the old one in ``old_key_files``, reload the agent (so new
backups use the new key), run ``key rotate`` until it exits 0, check ``key status``, then retire the old key.
Both commands run here, not in the agent: they need only the configuration, the keys and the repository.
Exit status: 0 done (every backup opens / every backup is under the current key), 1 otherwise, 78 configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING, Any

import anyio

from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.rotate import RotationReport, StatusReport, key_status, rotate
from kybdr_agent.cli_output import table
from kybdr_agent.config import AgentSettings
from kybdr_agent.errors import ConfigError
from kybdr_agent.storage.base import BlobStore

if TYPE_CHECKING:
    # The composition root is imported by the commands that run: the CLI builds this parser on every start.
    from kybdr_agent import app


def add_parser(sub: Any) -> None:
    p = sub.add_parser("key", help="master keys: which backups each key opens; re-wrap them under the current key")
    commands = p.add_subparsers(dest="key_command", required=True, metavar="SUBCOMMAND")
    s = commands.add_parser("status", help="how many backups each configured key opens, and which none opens")
    s.add_argument(
        "--verify", action="store_true", help="unwrap every data key (a KMS Decrypt each), not only match key ids"
    )
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    r = commands.add_parser(
        "rotate", help="re-wrap every backup's data key under the current key (no data rewritten; resumable)"
    )
    r.add_argument("--dry-run", action="store_true", help="only count what would be re-wrapped")
    r.add_argument("--json", action="store_true", help="print the report as JSON")


def run(settings: AgentSettings, args: argparse.Namespace) -> int:
    if args.key_command == "rotate":
        return anyio.run(_rotate, settings, args)
    return anyio.run(_status, settings, args)


async def _locations(settings: AgentSettings, stores: app.Stores) -> list[tuple[str, BlobStore]]:
    """The repository, and the DR bucket when backups are copied there (its manifests wrap the same keys)."""
    found: list[tuple[str, BlobStore]] = [("primary", await stores.get(settings.repository))]
    replica = await stores.replica(settings)
    if replica is not None:
        found.append(("dr", replica))
    return found


async def _rotate(settings: AgentSettings, args: argparse.Namespace) -> int:
    from kybdr_agent import app

    async with app.open_stores() as stores:
        ring = app.keyring(settings, stores)
        if ring is None:
            raise ConfigError(
                'key rotate needs a current key: set encryption.key_file, or key_provider = "kms" and kms_key_id'
            )
        reports = [
            await rotate(store, ring, location=location, dry_run=args.dry_run)
            for location, store in await _locations(settings, stores)
        ]
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "locations": [dataclasses.asdict(r) for r in reports]}, indent=2))
    else:
        for report in reports:
            print(_rotation_text(report, dry_run=args.dry_run))
    return 0 if all(r.ok for r in reports) else 1


async def _status(settings: AgentSettings, args: argparse.Namespace) -> int:
    from kybdr_agent import app

    async with app.open_stores() as stores:
        ring: KeyRing | None = app.keyring(settings, stores)
        reports = [
            await key_status(store, ring, location=location, verify=args.verify)
            for location, store in await _locations(settings, stores)
        ]
    if args.json:
        print(json.dumps({"locations": [dataclasses.asdict(r) for r in reports]}, indent=2))
    else:
        print("\n\n".join(_status_text(r) for r in reports))
        retirable = _retirable(reports)
        if retirable:
            print("\nopens no backup in any location (can be removed from the configuration): " + ", ".join(retirable))
    return 0 if all(r.ok for r in reports) else 1


def _retirable(reports: list[StatusReport]) -> list[str]:
    """Older keys that open nothing anywhere: the ones ``old_key_files`` no longer needs."""
    if not reports:
        return []
    labels = [use.key.label for use in reports[0].keys if not use.key.current]
    return [label for label in labels if all(_count(r, label) == 0 for r in reports)]


def _count(report: StatusReport, label: str) -> int:
    return sum(use.backups for use in report.keys if use.key.label == label)


def _rotation_text(report: RotationReport, *, dry_run: bool) -> str:
    verb = "to re-wrap" if dry_run else "re-wrapped"
    lines = [
        f"{report.location} ({report.store}): {report.backups} backups; {len(report.rewrapped)} {verb}, "
        f"{report.already_current} already under {report.current_key}, {report.unencrypted} unencrypted"
        + (f", {len(report.gone)} deleted meanwhile" if report.gone else "")
    ]
    for backup_id, why in report.failed:
        lines.append(f"  NOT re-wrapped {backup_id}: {why}")
    for key, why in report.unreadable:
        lines.append(f"  unreadable manifest {key}: {why}")
    if report.failed:
        lines.append(f"  {len(report.failed)} backups still need a key of the old ring; keep it until they are fixed")
    return "\n".join(lines)


def _status_text(report: StatusReport) -> str:
    checked = "data keys unwrapped" if report.verified else "by key id"
    head = f"{report.location} ({report.store}): {report.backups} backups ({checked})"
    rows = [
        [use.key.label + (" (current)" if use.key.current else ""), use.key.wrap, use.key.key_id, str(use.backups)]
        for use in report.keys
    ]
    lines = [head]
    if rows:
        lines.append(table(rows, ["KEY", "WRAP", "KEY ID", "BACKUPS"]))
    else:
        lines.append("no key configured")
    if report.unencrypted:
        lines.append(f"unencrypted: {report.unencrypted}")
    if report.unopened:
        lines.append(f"no configured key opens {len(report.unopened)} backups:")
        for u in report.unopened:
            lines.append(f"  {u.backup_id}  {u.database}  {u.wrap} key id {u.key_id}: {u.reason}")
    for key, why in report.unreadable:
        lines.append(f"unreadable manifest {key}: {why}")
    return "\n".join(lines)
