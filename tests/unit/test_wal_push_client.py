"""``kybdr-agent wal-push``'s client side without an agent: which command lines take the fast path, how the
configuration is resolved (the file, the default path, ``KYBDR_*`` over both), the refusals PostgreSQL will
log, and that the path imports none of the agent's heavy modules — proved in a fresh interpreter."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kybdr_agent.entry import is_wal_push
from kybdr_agent.wal.push_client import (
    DEFAULT_SOCKET,
    EXIT_CONFIG,
    EXIT_FAILED,
    PushError,
    load_push_settings,
    main,
)

ENABLED = '[wal]\nenabled = true\nmode = "archive_command"\n'
REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("argv", "fast"),
    [
        (["wal-push", "pg_wal/000000010000000000000001"], True),
        (["--config", "/x.toml", "wal-push", "p"], True),
        (["--config=/x.toml", "-v", "--local", "wal-push", "p"], True),
        (["wal-push", "--help"], False),
        (["--version", "wal-push", "p"], False),
        (["backup", "wal-push"], False),
        (["--config", "wal-push"], False),  # "wal-push" is the config file's name here
        ([], False),
        (["list", "--json"], False),
    ],
)
def test_which_command_lines_take_the_fast_path(argv: list[str], fast: bool) -> None:
    assert is_wal_push(argv) is fast


def test_settings_from_the_file_and_the_environment_over_it(tmp_path: Path) -> None:
    config = _config(tmp_path, ENABLED + '[control]\nsocket = "/srv/agent.sock"\n[daemon]\nservice_user = "pgagent"\n')
    settings = load_push_settings(config, {})
    assert (settings.socket_path, settings.service_user, settings.source) == ("/srv/agent.sock", "pgagent", config)

    # KYBDR_* win over the file, matched case-insensitively as pydantic-settings matches them; the
    # section's JSON form counts too, with the __ form over it.
    env = {"kybdr_control__socket": "/run/other.sock", "KYBDR_DAEMON": '{"service_user": "svc"}'}
    settings = load_push_settings(config, env)
    assert (settings.socket_path, settings.service_user) == ("/run/other.sock", "svc")
    env = {"KYBDR_CONTROL": '{"socket": "/a.sock"}', "KYBDR_CONTROL__SOCKET": "/b.sock"}
    assert load_push_settings(config, env).socket_path == "/b.sock"


def test_defaults_when_the_file_names_only_wal(tmp_path: Path) -> None:
    settings = load_push_settings(_config(tmp_path, ENABLED), {})
    assert (settings.socket_path, settings.service_user) == (DEFAULT_SOCKET, "kybdr")


def test_the_environment_alone_can_enable_it() -> None:
    # No --config and (on a test host) no /etc/kybdr-agent/agent.toml: defaults and environment, as the CLI.
    if Path("/etc/kybdr-agent/agent.toml").exists():
        pytest.skip("this host has a default configuration")
    env = {"KYBDR_WAL__ENABLED": "true", "KYBDR_WAL__MODE": "archive_command", "KYBDR_CONTROL__SOCKET": "/s.sock"}
    settings = load_push_settings(None, env)
    assert settings.socket_path == "/s.sock"
    assert "environment" in settings.source


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("", {}, "WAL archiving is not enabled"),
        ("[wal]\nenabled = false\n", {}, "WAL archiving is not enabled"),
        ("[wal]\nenabled = true\n", {}, "wal.mode is 'stream'"),
        (ENABLED, {"KYBDR_WAL__MODE": "stream"}, "wal.mode is 'stream'"),
        (ENABLED, {"KYBDR_WAL__ENABLED": "no"}, "not enabled"),
        (ENABLED, {"KYBDR_WAL__ENABLED": "maybe"}, "wal.enabled must be true or false"),
        (ENABLED + '[control]\nsocket = "relative.sock"\n', {}, "control.socket must be an absolute path"),
        ("[wal\n", {}, "not valid TOML"),
        (ENABLED, {"KYBDR_CONTROL": "{not json"}, "KYBDR_CONTROL is not a JSON object"),
    ],
)
def test_configurations_that_cannot_work_are_refused_with_a_reason(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(PushError, match=message) as caught:
        load_push_settings(_config(tmp_path, text), env)
    assert caught.value.status == EXIT_CONFIG


def test_a_named_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(PushError, match="does not exist"):
        load_push_settings(str(tmp_path / "missing.toml"), {})


def test_one_line_on_stderr_and_a_status_postgresql_retries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, ENABLED + f'[control]\nsocket = "{tmp_path}/nothing.sock"\n')
    segment = tmp_path / "000000010000000000000001"
    segment.write_bytes(b"\0" * 4096)

    status = main(["--config", config, "wal-push", str(segment)], env={})
    err = capsys.readouterr().err
    assert status == EXIT_FAILED
    assert err.count("\n") == 1
    assert err.startswith("kybdr-agent wal-push: 000000010000000000000001: the agent is not running")

    # A socket file nobody listens on (a crashed agent's): the same, not a hang.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "nothing.sock"))
    stale.close()
    assert main(["--config", config, "wal-push", str(segment)], env={}) == EXIT_FAILED
    assert "the agent is not running" in capsys.readouterr().err

    # Not a WAL file name (archive_command written with %f, or a path): refused before connecting.
    other = tmp_path / "postgresql.conf"
    other.write_text("")
    assert main(["--config", config, "wal-push", str(other)], env={}) == EXIT_FAILED
    assert "is not a WAL file name" in capsys.readouterr().err
    assert main(["--config", config, "wal-push", str(tmp_path / "000000010000000000000009")], env={}) == 1
    assert "cannot open" in capsys.readouterr().err

    for argv in (["wal-push"], ["wal-push", "a", "b"], ["--bogus", "wal-push", "x"]):
        assert main(argv, env={}) == 2
        assert "usage" in capsys.readouterr().err
    # Every status stays below 126: above it PostgreSQL would take the archiver for broken and restart it.


def test_the_fast_path_imports_nothing_heavy(tmp_path: Path) -> None:
    """In a fresh interpreter, a whole push attempt (configuration, hashing, connecting) loads no pydantic,
    aiohttp, anyio, structlog or agent module beyond the client."""
    config = _config(tmp_path, ENABLED + f'[control]\nsocket = "{tmp_path}/none.sock"\n')
    segment = tmp_path / "000000010000000000000001"
    segment.write_bytes(b"\1" * 8192)
    probe = (
        "import sys, json\n"
        "from kybdr_agent.entry import main\n"
        f"status = main(['--config', {config!r}, 'wal-push', {str(segment)!r}])\n"
        "print(json.dumps({'status': status, 'modules': sorted(sys.modules)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KYBDR_")}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True, cwd=REPO)
    result = json.loads(run.stdout)
    assert result["status"] == EXIT_FAILED  # no agent: but everything before connecting ran
    modules = set(result["modules"])
    heavy = {"pydantic", "aiohttp", "anyio", "structlog", "asyncio", "dataclasses", "kybdr_agent.cli"}
    assert not heavy & modules, heavy & modules
    ours = {m for m in modules if m.startswith("kybdr_agent")}
    assert ours == {"kybdr_agent", "kybdr_agent.entry", "kybdr_agent.wal", "kybdr_agent.wal.push_client"}
