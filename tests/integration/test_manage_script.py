"""scripts/manage-backup-dr.sh, the seed's management script: its own logic, run as bash.

The script only translates the seed's calling convention into kybdr-agent commands, so most tests point
``KYBDR_AGENT`` at a small recorder (a Python script that writes its argv to a log and answers
``config check --json`` with a configuration given by the test): that tests the script's argument
parsing, environment → configuration path, the --dr-region check, the vault explanation, --help and the
verb mapping, not the agent. The last tests run the real agent (``python -m kybdr_agent``, a multi-word
KYBDR_AGENT) against a folder repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "manage-backup-dr.sh"
VERBS = [
    "backup",
    "list",
    "show",
    "restore",
    "validate",
    "cleanup",
    "stats",
    "status",
    "test",
    "failover",
    "failback",
    "test-failover",
    "test-failback",
    "history",
    "health",
    "rejoin",
    "resume",
    "auto-failover",
    "auto-failback",
]

RECORDER = textwrap.dedent(
    """
    import json, os, sys
    args = sys.argv[1:]
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    if args[-3:] == ["config", "check", "--json"]:
        if os.environ.get("FAKE_CONFIG_RC"):
            print("kybdr-agent: configuration error: fake", file=sys.stderr)
            sys.exit(int(os.environ["FAKE_CONFIG_RC"]))
        print(os.environ["FAKE_CONFIG_JSON"])
        sys.exit(0)
    sys.exit(int(os.environ.get("FAKE_RC", "0")))
    """
)


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    calls: list[list[str]]


class Harness:
    """The script with a recorder as its agent and a config folder of its own."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.config_dir = tmp_path / "etc"
        self.config_dir.mkdir()
        self.recorder = tmp_path / "recorder.py"
        self.recorder.write_text(RECORDER)
        self.log = tmp_path / "calls.jsonl"
        self.dr: dict[str, Any] = {"enabled": True, "dr_region": "us-east-1"}
        self.env: dict[str, str] = {}

    def environment(self, name: str) -> Path:
        path = self.config_dir / f"{name}.toml"
        path.write_text("# the recorder does not read it\n")
        return path

    def run(self, *args: str, **env: str) -> Run:
        self.log.unlink(missing_ok=True)
        full_env = {
            "PATH": os.environ["PATH"],
            "KYBDR_AGENT": f"{sys.executable} {self.recorder}",
            "KYBDR_CONFIG_DIR": str(self.config_dir),
            "FAKE_LOG": str(self.log),
            "FAKE_CONFIG_JSON": json.dumps({"backup": {}, "dr": self.dr}),
            **self.env,
            **env,
        }
        done = subprocess.run(
            ["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True, timeout=60, check=False
        )
        calls = [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []
        return Run(done.returncode, done.stdout, done.stderr, calls)


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def _without_config_checks(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if c[-3:] != ["config", "check", "--json"]]


def test_help_lists_every_verb_with_one_line_each(h: Harness) -> None:
    for flag in ("--help", "-h", "help"):
        out = h.run(flag)
        assert out.rc == 0
        assert out.calls == []
        for verb in VERBS:
            assert re.search(rf"^  {re.escape(verb)}(\s|$)", out.stdout, re.MULTILINE), verb
    for example in ("backup -e production -v kyb-platform-backup-vault", "failover --dr-region us-east-1"):
        assert example in h.run("--help").stdout
    no_verb = h.run()
    assert no_verb.rc == 64
    assert "Usage:" in no_verb.stderr


def test_seed_backup_example(h: Harness) -> None:
    config = h.environment("production")
    out = h.run("backup", "-e", "production", "-v", "kyb-platform-backup-vault")
    assert out.rc == 0, out.stderr
    assert out.calls == [["--config", str(config), "backup"]]
    # the vault is explained, not silently dropped
    assert "kyb-platform-backup-vault" in out.stderr
    assert "does not drive AWS Backup" in out.stderr
    assert "terraform" in out.stderr


def test_environment_config_path_and_errors(h: Harness, tmp_path: Path) -> None:
    missing = h.run("list", "-e", "staging")
    assert missing.rc == 78
    assert str(h.config_dir / "staging.toml") in missing.stderr
    assert missing.calls == []
    bad = h.run("list", "-e", "../etc/passwd")
    assert bad.rc == 64
    assert bad.calls == []
    h.environment("staging")
    assert h.run("list", "--env=staging").calls == [["--config", str(h.config_dir / "staging.toml"), "list"]]
    # without KYBDR_CONFIG_DIR the folder is /etc/kybdr-agent
    env = {k: v for k, v in os.environ.items() if k != "KYBDR_CONFIG_DIR"}
    done = subprocess.run(
        ["bash", str(SCRIPT), "list", "-e", "no-such-env-here"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 78
    assert "/etc/kybdr-agent/no-such-env-here.toml" in done.stderr
    # -c FILE instead; no config at all → the agent's own default (no --config)
    own = tmp_path / "own.toml"
    assert h.run("stats", "-c", str(own)).calls == [["--config", str(own), "stats"]]
    assert h.run("stats").calls == [["stats"]]
    both = h.run("stats", "-e", "staging", "-c", str(own))
    assert both.rc == 64
    assert both.calls == []


def test_seed_failover_example_checks_the_dr_region(h: Harness) -> None:
    out = h.run("failover", "--dr-region", "us-east-1")
    assert out.rc == 0, out.stderr
    assert out.calls == [["config", "check", "--json"], ["dr", "failover"]]
    forced = h.run("failover", "--dr-region", "us-east-1", "--force", "-e", "production")
    assert forced.rc == 78  # production.toml does not exist yet
    config = h.environment("production")
    forced = h.run("failover", "--dr-region=us-east-1", "--force", "-e", "production")
    assert forced.calls == [
        ["--config", str(config), "config", "check", "--json"],
        ["--config", str(config), "dr", "failover", "--force"],
    ]


def test_dr_region_mismatch_is_a_clear_error_and_nothing_runs(h: Harness) -> None:
    out = h.run("failover", "--dr-region", "eu-west-1")
    assert out.rc == 78
    assert "eu-west-1" in out.stderr
    assert 'dr.dr_region = "us-east-1"' in out.stderr
    assert _without_config_checks(out.calls) == []
    h.dr = {"enabled": True, "dr_region": None}
    unset = h.run("failover", "--dr-region", "us-east-1")
    assert unset.rc == 78
    assert "sets no dr.dr_region" in unset.stderr
    assert _without_config_checks(unset.calls) == []
    broken = h.run("failover", "--dr-region", "us-east-1", FAKE_CONFIG_RC="78")
    assert broken.rc == 78
    assert "config check failed" in broken.stderr
    assert _without_config_checks(broken.calls) == []


def test_status_and_test_add_dr_when_dr_is_enabled(h: Harness) -> None:
    assert _without_config_checks(h.run("status").calls) == [["status"], ["dr", "status"]]
    assert _without_config_checks(h.run("test").calls) == [["test"], ["dr", "test-failover"]]
    assert _without_config_checks(h.run("test", "--database", "app", "--json").calls) == [
        ["test", "--database", "app", "--json"],
        ["dr", "test-failover", "--json"],
    ]
    h.dr = {"enabled": False}
    assert _without_config_checks(h.run("status").calls) == [["status"]]
    assert _without_config_checks(h.run("test").calls) == [["test"]]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["list", "--database", "app"], ["list", "--database", "app"]),
        (["show", "ID1"], ["show", "ID1"]),
        (["restore", "ID1", "--target-database", "copy"], ["restore", "ID1", "--target-database", "copy"]),
        (["validate", "ID1", "--level", "full"], ["validate", "ID1", "--level", "full"]),
        (["cleanup", "--dry-run"], ["cleanup", "--dry-run"]),
        (["stats", "--json"], ["stats", "--json"]),
        (["failback"], ["dr", "failback"]),
        (["test-failover"], ["dr", "test-failover"]),
        (["test-failback"], ["dr", "test-failback"]),
        (["history", "--json"], ["dr", "history", "--json"]),
        (["health"], ["dr", "health"]),
        (["rejoin"], ["dr", "rejoin"]),
        (["resume"], ["dr", "resume"]),
        (["auto-failover", "enable"], ["dr", "auto-failover", "enable"]),
        (["auto-failback", "disable"], ["dr", "auto-failback", "disable"]),
        (["list", "--", "-e", "x"], ["list", "-e", "x"]),
    ],
)
def test_verb_mapping(h: Harness, args: list[str], expected: list[str]) -> None:
    out = h.run(*args)
    assert out.rc == 0, out.stderr
    assert out.calls == [expected]


def test_usage_errors(h: Harness) -> None:
    for args in (["bogus"], ["auto-failover"], ["auto-failback", "maybe"], ["--frobnicate", "list"], ["list", "-e"]):
        out = h.run(*args)
        assert out.rc == 64, args
        assert out.calls == [], args
        assert "manage-backup-dr.sh:" in out.stderr


def test_the_agents_exit_status_is_the_scripts(h: Harness) -> None:
    assert h.run("list", FAKE_RC="3").rc == 3
    assert h.run("failback", FAKE_RC="75").rc == 75
    out = h.run("status", FAKE_RC="2")  # both commands run, the failure is reported
    assert out.rc == 2
    assert _without_config_checks(out.calls) == [["status"], ["dr", "status"]]


def test_verbose_shows_the_commands(h: Harness) -> None:
    out = h.run("list", "--verbose")
    assert out.calls == [["-v", "list"]]
    assert "running:" in out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean() -> None:
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def _real_env(tmp_path: Path, dr_region: str) -> dict[str, str]:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "dev.toml").write_text(
        textwrap.dedent(
            f"""
            [backup]
            backup_dir = "{tmp_path / "state"}"
            encryption = false
            [repository]
            url = "file://{tmp_path / "repo"}"
            [dr]
            dr_region = "{dr_region}"
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KYBDR_")}
    return {**env, "KYBDR_CONFIG_DIR": str(etc), "KYBDR_AGENT": f"{sys.executable} -m kybdr_agent"}


def test_real_agent_list_on_a_folder_repository(tmp_path: Path) -> None:
    env = _real_env(tmp_path, "us-east-1")
    done = subprocess.run(
        ["bash", str(SCRIPT), "list", "-e", "dev", "--json", "-v", "kyb-platform-backup-vault"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    assert "does not drive AWS Backup" in done.stderr


def test_real_agent_config_decides_the_dr_region(tmp_path: Path) -> None:
    """The region comes from the agent's own effective configuration (``config check --json``), which
    includes KYBDR_* environment overrides."""
    env = _real_env(tmp_path, "us-east-1")
    done = subprocess.run(
        ["bash", str(SCRIPT), "failover", "-e", "dev", "--dr-region", "us-west-2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 78
    assert 'dr.dr_region = "us-east-1"' in done.stderr
    done = subprocess.run(
        ["bash", str(SCRIPT), "list", "-e", "dev", "--dr-region", "us-west-2"],
        env={**env, "KYBDR_DR__DR_REGION": "us-west-2"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
