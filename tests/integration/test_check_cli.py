"""``kybdr-agent check`` (issue 10, item 7) as a monitoring system runs it: the real CLI in a subprocess,
against a folder repository holding one real backup of a throwaway cluster's database.

The Nagios convention is the contract: exit 0 OK, 1 WARNING, 2 CRITICAL, one status line on stdout with
performance data after ``|``. A configuration that does not load and a repository that cannot be read are
CRITICAL too — never 78 or 1, which a monitoring system would read as a broken plugin.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kybdr_agent.backup.freshness import DatabaseFreshness
from kybdr_agent.cli_check import CRITICAL, OK, WARNING, judge
from kybdr_agent.postgres.cluster import Cluster
from tests.support import run_cli, unique_db, write_config

DAILY_WINDOW = 25 * 3600  # "0 2 * * *": a 24 h gap, plus the hour of grace
_LINE = re.compile(r"^KYBDR (OK|WARNING|CRITICAL) - [^|\n]+( \| [^\n]+)?$")


@dataclass(frozen=True)
class Backed:
    """A database with one real backup in a folder repository, and how to configure an agent for it."""

    pg: Cluster
    database: str
    repo: Path
    finished_at: datetime

    def config(self, directory: Path, *, repo: Path | None = None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        return write_config(
            directory / "agent.toml",
            f"""
[backup]
encryption = false
backup_dir = "{directory / "state"}"

[[backup.policies]]
name = "daily"
schedule = "0 2 * * *"
databases = ["{self.database}"]

[database]
dsn = "host={self.pg.socket_dir} port={self.pg.port} user=postgres"

[repository]
url = "file://{repo or self.repo}"

[control]
socket = "{directory / "control.sock"}"
""",
        )


@pytest.fixture(scope="module")
def backed(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Backed:
    database = unique_db("checked")
    pg.psql("postgres", f'create database "{database}"')
    pg.psql(database, "create table t (id int); insert into t select generate_series(1, 100);")
    base = tmp_path_factory.mktemp("check")
    made = Backed(pg, database, base / "repo", datetime.now(UTC))
    proc = run_cli(made.config(base / "agent"), "--local", "backup", "--json")
    assert proc.returncode == 0, proc.stderr
    finished = datetime.fromisoformat(json.loads(proc.stdout)["finished_at"])
    return Backed(pg, database, made.repo, finished)


def check(config: Path, *args: str) -> tuple[int, str]:
    proc = run_cli(config, "check", *args, timeout=60)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert _LINE.match(lines[0]), lines[0]
    return proc.returncode, lines[0]


def copy_of(backed: Backed, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(backed.repo, repo, symlinks=True)
    return repo


def test_fresh_backup_is_ok_with_its_age_as_performance_data(backed: Backed, tmp_path: Path) -> None:
    before = sorted(p.relative_to(backed.repo) for p in backed.repo.rglob("*"))
    status, line = check(backed.config(tmp_path))  # no agent runs: the probe reads the repository itself
    assert status == OK, line
    assert line.startswith("KYBDR OK - 1 database has a good backup within its window | ")
    age = re.search(rf"age_{backed.database}=(\d+)s;;{DAILY_WINDOW}$", line)
    assert age is not None, line
    assert int(age.group(1)) < DAILY_WINDOW
    assert sorted(p.relative_to(backed.repo) for p in backed.repo.rglob("*")) == before  # it only reads
    assert not (tmp_path / "state").exists()


def test_older_than_max_age_is_critical(backed: Backed, tmp_path: Path) -> None:
    config = backed.config(tmp_path)
    wait = (backed.finished_at + timedelta(seconds=1.2) - datetime.now(UTC)).total_seconds()
    if wait > 0:
        time.sleep(wait)
    status, line = check(config, "--max-age", "1s")
    assert status == CRITICAL, line
    assert f"1 of 1 database without a good recent backup: {backed.database} (newest good backup" in line
    assert "window 1s" in line
    assert re.search(rf"age_{backed.database}=\d+s;;1$", line), line


def test_a_database_no_policy_covers_is_a_warning(backed: Backed, tmp_path: Path) -> None:
    config = backed.config(tmp_path)
    status, line = check(config, "--database", "not_covered")
    assert status == WARNING, line
    assert "not covered by any policy or database.databases: not_covered" in line

    status, line = check(config, "--database", backed.database, "--database", "not_covered")
    assert status == WARNING, line
    assert "1 database has a good backup within its window; not covered" in line
    assert f"age_{backed.database}=" in line


def test_unreadable_manifests_beside_fresh_backups_are_a_warning(backed: Backed, tmp_path: Path) -> None:
    repo = copy_of(backed, tmp_path)
    broken = repo / "backups" / backed.database / "20250101T020000Z-00000000" / "manifest.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    status, line = check(backed.config(tmp_path, repo=repo))
    assert status == WARNING, line
    assert "1 database has a good backup within its window; 1 manifest in the repository cannot be read" in line


def test_a_repository_that_cannot_be_read_is_critical(backed: Backed, tmp_path: Path) -> None:
    repo = copy_of(backed, tmp_path)
    loop = repo / "backups" / "loop"
    loop.symlink_to(loop)  # listing stats it: "Too many levels of symbolic links"
    status, line = check(backed.config(tmp_path, repo=repo))
    assert status == CRITICAL, line
    assert "KYBDR CRITICAL - cannot read the repository:" in line


def test_no_backup_at_all_is_critical(backed: Backed, tmp_path: Path) -> None:
    status, line = check(backed.config(tmp_path, repo=tmp_path / "empty"))
    assert status == CRITICAL, line
    assert f"{backed.database} (no good backup, window 25h)" in line
    assert f"age_{backed.database}=U;;{DAILY_WINDOW}" in line


def test_an_invalid_configuration_is_critical_not_78(tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", "[backup]\nmax_parallel = 0\n")
    status, line = check(config)
    assert status == CRITICAL, line
    assert line.startswith("KYBDR CRITICAL - configuration error:")
    assert "max_parallel" in line

    status, line = check(tmp_path / "missing.toml")
    assert status == CRITICAL, line


def test_usage_errors_stay_usage_errors(tmp_path: Path) -> None:
    proc = run_cli(tmp_path / "missing.toml", "check", "--max-age", "soon", timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "--max-age" in proc.stderr


def test_judge_reports_nothing_to_check_and_quotes_odd_names() -> None:
    assert judge([], missing=[], unreadable=0, max_age=None).line() == (
        "KYBDR WARNING - nothing to check: no database is covered by a backup policy or database.databases"
    )
    now = datetime(2026, 1, 2, tzinfo=UTC)
    odd = DatabaseFreshness(
        database="it's | a=name",
        newest_good_at=now - timedelta(hours=30),
        newest_backup_id="x",
        age=timedelta(hours=30),
        window=timedelta(hours=25),
    )
    verdict = judge([odd], missing=[], unreadable=0, max_age=None)
    assert verdict.status == CRITICAL
    line = verdict.line()
    assert line.count("|") == 1  # only the separator before the performance data
    assert line.endswith("| 'age_it''s / a_name'=108000s;;90000")
    assert "(newest good backup 30h old, window 25h)" in line
