"""What ``kybdr-agent stats`` prints for people (kybdr_agent/cli_output.py): a realistic statistics document,
rendered by ``render_stats`` from manifests and journal records, reads as lines and a table, never as a
Python dict or list."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

import pytest

from kybdr_agent.backup.catalog import Catalog
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.stats import OutcomeTally, render_stats
from kybdr_agent.cli_output import print_stats
from tests.unit.test_manifest import manifest_fields

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _backup(database: str, day: int, stored: int) -> Manifest:
    backup_id = f"202611{day:02d}T020000Z-0000{day:04d}"
    finished = datetime(2026, 11, day, 2, 5, tzinfo=UTC)
    return Manifest(
        **manifest_fields(
            id=backup_id,
            database=database,
            started_at=finished - timedelta(minutes=5),
            finished_at=finished,
            duration_seconds=300.0 + day,
            stored_bytes=stored,
            object_key=f"backups/{database}/{backup_id}/data",
        )
    )


def _stats() -> dict[str, object]:
    catalog = Catalog(
        backups=[_backup("app", 28, 3 << 20), _backup("app", 29, 3 << 20), _backup("billing", 30, 512 << 10)],
        unreadable=[("backups/app/x/manifest.json", "not JSON")],
    )
    tally = OutcomeTally()
    for status in ("succeeded", "succeeded", "succeeded", "failed", "cancelled"):
        tally.observe(
            {
                "kind": "backup",
                "status": status,
                "database": "billing",
                "finished_at": "2026-11-30T02:01:00+00:00",
                "error": "pg_dump exited with status 1: permission denied for table ledger"
                if status == "failed"
                else None,
            }
        )
    tally.observe(
        {
            "kind": "test",
            "status": "succeeded",
            "finished_at": "2026-11-29T05:10:00+00:00",
            "result": {"drills": [{"passed": True}, {"passed": False}]},
            "error": None,
        }
    )
    return render_stats(catalog, tally, NOW)


def test_stats_print_as_lines_and_a_table_without_python_reprs(capsys: pytest.CaptureFixture[str]) -> None:
    print_stats(_stats(), argparse.Namespace(json=False))
    out = capsys.readouterr().out
    assert not re.search(r"[{}\[\]]", out), out  # no dict or list repr anywhere
    assert "'" not in out, out  # nor the quotes of one
    assert "backups: 3 stored, 6.5 MiB" in out
    assert "3 succeeded, 1 failed, 1 cancelled" in out
    assert "success rate 60.0%" in out
    assert "duration: p50 329.0 s" in out
    assert "last failure: 2026-11-30 02:01:00Z billing: pg_dump exited with status 1" in out
    assert "last drill: succeeded 2026-11-29 05:10:00Z: 1 of 2 restore(s) passed" in out
    assert "unreadable manifests: 1" in out
    header, *rows = out.splitlines()[-3:]
    assert header.split() == ["DATABASE", "BACKUPS", "STORED", "LAST", "GOOD", "AGE"]
    assert rows[0].split()[:2] == ["app", "2"]
    assert rows[1].split()[:2] == ["billing", "1"]


def test_stats_of_an_empty_repository_print_without_reprs(capsys: pytest.CaptureFixture[str]) -> None:
    print_stats(render_stats(Catalog(), OutcomeTally(), NOW), argparse.Namespace(json=False))
    out = capsys.readouterr().out
    assert not re.search(r"[{}\[\]]", out), out
    assert "backups: 0 stored" in out
    assert "success rate -" in out
