"""``kybdr-agent audit verify|show`` (kybdr_agent/cli_audit.py) on a real journal under ``backup.backup_dir``:
exit 0 and a count for an intact trail, exit 1 naming file, line, seq and reason for a tampered one; ``show``
as lines or JSON lines, filtered by ``--since`` given as a duration or a time. The arguments come from the
subcommand's own argparse parser, as ``cli.py`` will build them."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kybdr_agent import cli_audit
from kybdr_agent.audit import AuditTrail, segment_name
from kybdr_agent.config import AgentSettings

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AgentSettings:
    monkeypatch.delenv("KYBDR_CONFIG", raising=False)
    return AgentSettings(backup={"backup_dir": tmp_path, "encryption": False})


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kybdr-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_audit.add_parser(sub)
    return parser.parse_args(["audit", *argv])


def write_trail(settings: AgentSettings, count: int) -> Path:
    minutes = iter(range(count))
    trail = AuditTrail(
        cli_audit.directory_of(settings),
        clock=lambda: T0 + timedelta(minutes=next(minutes)),
        host="db1",
        max_bytes=700,
    )
    for i in range(count):
        trail.append(f"uid:{1000 + i}", "POST backup", f"db{i}", "202", {"i": i})
    return trail.directory


def run(settings: AgentSettings, capsys: pytest.CaptureFixture[str], *argv: str, now: datetime = T0) -> tuple[int, str]:
    code = cli_audit.run(settings, parse(*argv), clock=lambda: now)
    return code, capsys.readouterr().out


def test_verify_an_intact_a_missing_and_a_tampered_trail(
    settings: AgentSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(settings, capsys, "verify")
    assert code == 0
    assert out.startswith("audit trail OK: 0 records")

    directory = write_trail(settings, 6)
    assert len(list(directory.iterdir())) >= 2  # the chain spans segments
    code, out = run(settings, capsys, "verify")
    assert (code, out) == (0, "audit trail OK: 6 records\n")

    second = directory / segment_name(2)
    lines = second.read_text().splitlines(keepends=True)
    seq = json.loads(lines[0])["seq"]
    second.write_text(lines[0].replace('"outcome":"202"', '"outcome":"200"') + "".join(lines[1:]))
    code, out = run(settings, capsys, "verify")
    assert code == 1
    assert f"{second} line 1 (seq {seq})" in out
    assert "edited" in out
    assert f"{seq} records before it verified" in out

    code, out = run(settings, capsys, "verify", "--json")
    assert code == 1
    report = json.loads(out)
    assert (report["ok"], report["file"], report["line"], report["seq"]) == (False, second.name, 1, seq)


def test_show_prints_lines_or_json_since_a_duration_or_a_time(
    settings: AgentSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    write_trail(settings, 4)  # at T0, T0+1m, T0+2m, T0+3m
    code, out = run(settings, capsys, "show")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4
    assert lines[0] == "2026-03-01T12:00:00.000000+00:00  uid:1000  POST backup  db0  202"

    code, out = run(settings, capsys, "show", "--since", "90s", now=T0 + timedelta(minutes=3))
    assert [line.split("  ")[3] for line in out.splitlines()] == ["db2", "db3"]

    code, out = run(settings, capsys, "show", "--since", "2026-03-01T12:03:00", "--json")
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert (record["seq"], record["target"], record["host"]) == (3, "db3", "db1")
    assert set(record) == {"seq", "at", "host", "caller", "operation", "target", "outcome", "detail", "prev", "hash"}


def test_since_must_be_a_duration_or_a_time(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse("show", "--since", "2d").since == timedelta(days=2)
    assert parse("show", "--since", "2026-03-01T12:00Z").since == T0
    with pytest.raises(SystemExit) as exit_info:
        parse("show", "--since", "yesterday")
    assert exit_info.value.code == 2
    assert "neither a duration" in capsys.readouterr().err
