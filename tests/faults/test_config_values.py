"""Issue 7, item 11: hostile values in agent.toml end as exit 78 and one ConfigError, at ``config check`` and
at ``run`` alike — never a traceback, never a start that spins or dies later.

Each case was a traceback (overflowing durations and numbers, deep nesting), or passed ``config check`` and
then killed ``run`` (a negative housekeeping interval) or made it spin (a 0 s interval: thousands of sweeps a
second), or reached a library that choked on it long after start-up (a NUL in a path or DSN, an endpoint
without a host).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Final

import pytest

from tests.faults.report import FaultTally
from tests.faults.test_config_common import check, start_refused

SECRET = "Endp0int-Pa55word-" + secrets.token_hex(4)

BASE = '[backup]\nencryption = false\nbackup_dir = "{state}"\n[drill]\nschedule = ""\n[control]\nsocket = "{sock}"\n'

# (name, TOML appended to BASE, the field the one error must name)
CASES: list[tuple[str, str, str]] = [
    (
        "min_age overflows timedelta",
        '[[backup.policies]]\nname = "p"\nschedule = "0 2 * * *"\ndatabases = ["a"]\nmin_age = "99999999999999y"\n',
        "backup.policies.0.min_age",
    ),
    (
        "max_age of 10^12 seconds",
        '[[backup.policies]]\nname = "p"\nschedule = "0 2 * * *"\ndatabases = ["a"]\nmax_age = 1000000000000\n',
        "backup.policies.0.max_age",
    ),
    ("retention_days = 2**63-1", '[database]\ndatabases = ["a"]\n', "backup.retention_days"),
    ("housekeeping_interval = -5", "[daemon]\nhousekeeping_interval = -5\n", "daemon.housekeeping_interval"),
    ('housekeeping_interval = "0s"', '[daemon]\nhousekeeping_interval = "0s"\n', "daemon.housekeeping_interval"),
    ('sweep_older_than = "-1"', "[daemon]\nsweep_older_than = -1\n", "daemon.sweep_older_than"),
    (
        "keep_daily = 2**62",
        '[[backup.policies]]\nname = "p"\nschedule = "@daily"\ndatabases = ["a"]\nkeep_daily = 4611686018427387904\n',
        "backup.policies.0.keep_daily",
    ),
    (
        "jitter_seconds = nan",
        '[[backup.policies]]\nname = "p"\nschedule = "@daily"\ndatabases = ["a"]\njitter_seconds = nan\n',
        "backup.policies.0.jitter_seconds",
    ),
    ("a NUL in the DSN", '[database]\ndsn = "host=/tmp\\u0000 user=x"\n', "database.dsn"),
    ("a NUL in a database name", '[database]\ndatabases = ["a\\u0000b"]\n', "database.databases"),
    (
        "endpoint_url without a host",
        '[repository]\nurl = "s3://b/p"\nendpoint_url = "http://"\n',
        "repository.endpoint_url",
    ),
    (
        "endpoint_url with a password",
        f'[repository]\nurl = "s3://b/p"\nendpoint_url = "https://admin:{SECRET}@minio.internal:9000"\n',
        "repository.endpoint_url",
    ),
    ("region that is not a DNS label", '[repository]\nurl = "s3://b/p"\nregion = "../../x"\n', "repository.region"),
    ("a relative control socket", "", "control.socket"),
    ("tcp_listen host of 300 characters", "", "control.tcp_listen"),
]


def _write(tmp_path: Path, name: str, body: str) -> tuple[Path, Path, Path]:
    state = tmp_path / "state"
    sock = tmp_path / "control.sock"
    text = BASE.format(state=state, sock=sock)
    if name == "retention_days = 2**63-1":
        text = text.replace("[backup]\n", "[backup]\nretention_days = 9223372036854775807\n", 1)
    if name == "tcp_listen host of 300 characters":
        token = tmp_path / "viewer.token"
        token.write_text(secrets.token_urlsafe(24))
        token.chmod(0o600)
        text = text.replace("[control]\n", f'[control]\ntcp_listen = "{"a" * 300}:8080"\n', 1)
        body = f'[[control.tokens]]\nrole = "viewer"\ntoken_file = "{token}"\n'
    if name == "a relative control socket":
        text = text.replace(f'socket = "{sock}"\n', 'socket = "control.sock"\n')
    config = tmp_path / "agent.toml"
    config.write_text(text + body)
    return config, sock, state


RUN_CASES: Final = frozenset({CASES[0][0], "housekeeping_interval = -5", 'housekeeping_interval = "0s"'})


@pytest.mark.parametrize(("name", "body", "field"), CASES, ids=[c[0] for c in CASES])
def test_hostile_value_is_one_config_error_at_check_and_at_run(
    tmp_path: Path, name: str, body: str, field: str
) -> None:
    config, sock, state = _write(tmp_path, name, body)
    tally = FaultTally(fault="config: hostile value", injected=1)

    checked = check(config, "-v")
    assert checked.returncode == 78, (name, checked.stdout, checked.stderr)
    assert "Traceback" not in checked.stderr
    assert f"  {field}: " in checked.stderr, checked.stderr
    assert SECRET not in checked.stderr + checked.stdout
    if name not in RUN_CASES:
        # `run` loads the configuration with the same function as `config check`; the cases that once got
        # past `config check` and broke `run` are the ones worth an agent start each.
        tally.assert_clean()
        return

    outcome = start_refused(config, tmp_path, socket_path=sock, state_dir=state)
    tally.hung = int(outcome.hung)
    tally.left_behind = outcome.left_behind
    tally.assert_clean()
    assert outcome.returncode == 78, outcome
    assert "Traceback" not in outcome.stderr
    assert f"  {field}: " in outcome.stderr
    assert SECRET not in outcome.stderr


def test_nesting_deeper_than_the_parser_recurses_is_one_error(tmp_path: Path) -> None:
    """3,000 lines of RecursionError traceback before; one line now."""
    config = tmp_path / "agent.toml"
    config.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    for argv in (["config", "check"], ["list"], ["-v", "status"]):
        proc = check(config) if argv == ["config", "check"] else _cli(config, *argv)
        assert proc.returncode == 78, proc.stderr[-2000:]
        assert "nested too deeply" in proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
    outcome = start_refused(config, tmp_path)
    assert outcome.returncode == 78
    assert len(outcome.stderr.splitlines()) == 1, outcome.stderr[-2000:]


def test_an_integer_of_5000_digits_is_one_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[backup]\nencryption = false\nretention_days = " + "9" * 5000 + "\n")
    proc = check(config)
    assert proc.returncode == 78
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]


def test_an_environment_value_that_is_not_json_is_one_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[backup]\nencryption = false\n")
    proc = _cli(config, "config", "check", env={"KYBDR_BACKUP__POLICIES": "[" * 3000})
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "KYBDR_" in proc.stderr


def test_sweep_older_than_may_be_zero_and_defaults_to_zero(tmp_path: Path) -> None:
    """Leftovers without a live lease are swept at once: 0 s is the default and a valid grace."""
    config = tmp_path / "agent.toml"
    config.write_text(f'[backup]\nencryption = false\n[control]\nsocket = "{tmp_path / "s.sock"}"\n')
    proc = _cli(config, "config", "check", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"sweep_older_than": "0s"' in proc.stdout
    config.write_text(config.read_text() + '[daemon]\nsweep_older_than = "0s"\nhousekeeping_interval = "10s"\n')
    assert _cli(config, "config", "check").returncode == 0


def _cli(config: Path, *args: str, env: dict[str, str] | None = None) -> object:
    from tests.support import run_cli

    return run_cli(config, *args, env=env)
