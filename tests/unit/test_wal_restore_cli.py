"""``restore --physical``: which switches go together (exit 2 before anything runs), targets parsed as PostgreSQL
will read them, and the directory checks that refuse without changing anything."""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kybdr_agent import cli_physical
from kybdr_agent.backup.manifest import InvalidBackupId
from kybdr_agent.wal.restore_physical import PhysicalRestoreError, PhysicalRestoreRequest, check_request
from kybdr_agent.wal.targets import LatestTarget, LsnTarget, NameTarget, TimeTarget


def _parser() -> argparse.ArgumentParser:
    """The ``restore`` subcommand's own switches as cli.py declares them, plus the physical ones."""
    p = argparse.ArgumentParser(prog="kybdr-agent restore")
    p.add_argument("backup_id", nargs="?")
    p.add_argument("--target-database")
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-owner", action="store_true")
    p.add_argument("--with-globals", action="store_true")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--table", action="append", default=[])
    p.add_argument("--schema", action="append", default=[])
    p.add_argument("--into-existing", action="store_true")
    p.add_argument("--rename-to")
    p.add_argument("--json", action="store_true")
    p.add_argument("--region", choices=("primary", "dr"))
    cli_physical.add_arguments(p)
    return p


def _check(*argv: str) -> argparse.Namespace:
    args = _parser().parse_args(list(argv))
    cli_physical.check_usage(args)
    return args


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        _check(*argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_targets_are_parsed_as_postgresql_reads_them() -> None:
    assert isinstance(_check("--physical", "--pgdata", "/x").recovery_target, LatestTarget)
    assert isinstance(_check("--physical", "--pgdata", "/x", "--latest").recovery_target, LatestTarget)
    at = _check("--physical", "--pgdata", "/x", "--target-time", "2026-12-02T03:22:11.5+01:00").recovery_target
    assert at == TimeTarget(datetime(2026, 12, 2, 2, 22, 11, 500000, tzinfo=UTC))
    assert _check("--physical", "--pgdata", "/x", "--target-lsn", "0/3000148").recovery_target == LsnTarget(0x3000148)
    assert _check("--physical", "--pgdata", "/x", "--target-name", "before-migration").recovery_target == NameTarget(
        "before-migration"
    )


def test_a_time_without_its_zone_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert "time zone" in _refused(capsys, "--physical", "--pgdata", "/x", "--target-time", "2026-12-02 03:22:11")
    assert "not a fixed point" in _refused(capsys, "--physical", "--pgdata", "/x", "--target-time", "now")


def test_two_targets_at_once_are_refused_by_argparse() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--physical", "--pgdata", "/x", "--latest", "--target-lsn", "0/1"])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("--physical",), "--pgdata"),
        (("--physical", "--pgdata", "/x", "--target-database", "db"), "--target-database cannot be used"),
        (("--physical", "--pgdata", "/x", "--table", "t", "--jobs", "2"), "--table, --jobs cannot be used"),
        (("--physical", "--pgdata", "/x", "--port", "5433"), "--port needs --start"),
        (("ID-less", "--target-database", "db", "--pgdata", "/x"), "--pgdata need --physical"),
        (("20261124T215226Z-3f9a1c2b", "--target-database", "db", "--start"), "--start need --physical"),
        (("--target-database", "db"), "backup ID is required"),
        (("20261124T215226Z-3f9a1c2b",), "--target-database is required"),
    ],
)
def test_switches_that_do_not_go_together(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], says: str) -> None:
    assert says in _refused(capsys, *argv)


def test_a_logical_restore_still_parses() -> None:
    args = _check("20261124T215226Z-3f9a1c2b", "--target-database", "db")
    assert not args.physical


def test_a_bad_backup_id_is_refused_before_anything_runs() -> None:
    with pytest.raises(InvalidBackupId):
        _check("../../etc", "--physical", "--pgdata", "/x")


def test_the_directory_must_be_new_or_empty_and_nothing_changes_when_refused(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "PG_VERSION").write_text("15\n")
    with pytest.raises(PhysicalRestoreError, match=r"not empty.*nothing was changed"):
        check_request(PhysicalRestoreRequest(busy, LatestTarget()))
    assert sorted(os.listdir(busy)) == ["PG_VERSION"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(PhysicalRestoreError, match="not a directory"):
        check_request(PhysicalRestoreRequest(afile, LatestTarget()))
    spool = tmp_path / "new.wal-spool"
    spool.mkdir()
    (spool / "000000010000000000000003").write_text("x")
    with pytest.raises(PhysicalRestoreError, match=r"WAL spool .* not empty"):
        check_request(PhysicalRestoreRequest(tmp_path / "new", LatestTarget()))
    with pytest.raises(PhysicalRestoreError, match="outside the data directory"):
        check_request(PhysicalRestoreRequest(tmp_path / "d", LatestTarget(), spool=tmp_path / "d" / "spool"))
    with pytest.raises(PhysicalRestoreError, match="does not exist"):
        check_request(PhysicalRestoreRequest(tmp_path / "no" / "such" / "d", LatestTarget()))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_request(PhysicalRestoreRequest(empty, LatestTarget())) == (empty, tmp_path / "empty.wal-spool")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is for root")
def test_start_as_root_is_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(PhysicalRestoreError, match="does not run as root"):
        check_request(PhysicalRestoreRequest(tmp_path / "d", LatestTarget(), start=True))
    assert not (tmp_path / "d").exists()
