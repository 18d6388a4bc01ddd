"""What ``kybdr-agent config check`` prints (issue 8): TOML that reads back to what ``--json`` shows, and
nothing on stderr when the reader of its output goes away early. Real subprocesses, as an operator runs it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

from tests.support import KYBDR, REPO_ROOT, run_cli, write_config

SECRET = "Pg-Sekr1t-Pass"


def _config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "agent.toml",
        f"""
[backup]
encryption = false
backup_dir = "{tmp_path / "state"}"

[[backup.policies]]
name = "daily"
schedule = "0 2 * * *"
databases = ["app", "with \\"quotes\\" and \\\\ back"]
keep_daily = 7

[[backup.policies]]
name = "weekly"
schedule = "0 3 * * sun"
databases = ["app"]

[database]
dsn = "postgresql://backup:{SECRET}@db1:5432,db2:5433/app?options=-c%20search_path%3Dx"

[repository]
url = "file://{tmp_path / "repo"}"

[control]
socket = "{tmp_path / "control.sock"}"
""",
    )


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_none(item) for item in value]
    return value


def test_config_check_prints_toml_that_reads_back_as_the_json_does(tmp_path: Path) -> None:
    config = _config(tmp_path)
    human = run_cli(config, "config", "check")
    assert human.returncode == 0, human.stderr
    as_json = run_cli(config, "config", "check", "--json")
    assert as_json.returncode == 0, as_json.stderr
    parsed = tomllib.loads(human.stdout)  # raises on `null`, a JSON object in a list, or a bare last line
    assert parsed == _without_none(json.loads(as_json.stdout))
    assert "# cross_region_bucket = (not set)" in human.stdout
    assert "socket_mode = 0o660" in human.stdout
    assert human.stdout.rstrip().endswith("# configuration is valid")
    assert SECRET not in human.stdout


def test_config_check_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    config = _config(tmp_path)
    # As in an operator's shell: stdout block-buffered (the suite itself runs with PYTHONUNBUFFERED).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    argv = [*KYBDR, "--config", str(config), "config", "check"]

    # The reader is gone before anything is written (`| true`): every write fails.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 1)
    assert stderr == ""

    # And the pipeline from the issue, literally.
    piped = subprocess.run(
        ["bash", "-o", "pipefail", "-c", shlex.join(argv) + " | head -1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    assert piped.stdout == "[backup]\n"
    assert piped.stderr == ""
    assert piped.returncode in (0, 1)
