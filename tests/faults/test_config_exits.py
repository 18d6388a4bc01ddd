"""Issue 7, item 13: no operational failure ends in a Python traceback.

Whatever ends a command — a config file the user may not read, a stdout whose reader went away, a port
already taken, a state directory that is a file, an agent whose answer the CLI did not expect — prints one
paragraph with the documented exit status; the traceback appears only with ``-v``. Each case below printed a
traceback (or, for ``run``, started anyway or blamed the wrong address) before.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.report import FaultTally
from tests.faults.test_config_common import can_run_unprivileged, one_line, run_as, start_refused
from tests.support import KYBDR, run_cli


def _config(tmp_path: Path, extra: str = "", backup_dir: Path | None = None) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[backup]\nencryption = false\nbackup_dir = "{backup_dir or tmp_path / "state"}"\n'
        f'[repository]\nurl = "file://{tmp_path / "repo"}"\n[drill]\nschedule = ""\n'
        f'[control]\nsocket = "{tmp_path / "control.sock"}"\n{extra}'
    )
    return config


@pytest.mark.skipif(not can_run_unprivileged(), reason="no unprivileged user can run the system Python here")
def test_a_config_file_the_user_may_not_read_is_exit_78_not_permission_error(tmp_path: Path) -> None:
    """``Path.exists`` raises PermissionError under a directory the user may not enter."""
    hidden = tmp_path / "agent.toml"  # pytest's tmp dirs are 0700 root
    hidden.write_text("[backup]\nencryption = false\n")
    for argv in (["list"], ["config", "check"], ["run"]):
        proc = run_as("nobody", "--config", str(hidden), *argv)
        assert proc.returncode == 78, (argv, proc.stderr)
        assert f"cannot read config file {hidden}: Permission denied" in one_line(proc.stderr)


def test_stdout_closed_by_its_reader_is_no_traceback(tmp_path: Path) -> None:
    """``kybdr-agent config check | head -1``: the reader is gone before the output is written."""
    config = _config(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [*KYBDR, "--config", str(config), "config", "check"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "Exception ignored" not in proc.stderr


def test_run_refuses_a_state_directory_that_is_a_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory\n")
    config = _config(tmp_path)
    outcome = start_refused(config, tmp_path, socket_path=tmp_path / "control.sock")
    tally = FaultTally(fault="run: unusable start-up resource", injected=1, hung=int(outcome.hung))
    tally.left_behind = outcome.left_behind
    tally.assert_clean()
    assert outcome.returncode == 78, outcome
    assert f"backup.backup_dir {state}" in one_line(outcome.stderr)


def test_run_names_the_tcp_address_it_cannot_bind(tmp_path: Path) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    token = tmp_path / "viewer.token"
    token.write_text("a-token-of-more-than-16-characters\n")
    token.chmod(0o600)
    try:
        config = _config(
            tmp_path,
            f'tcp_listen = "127.0.0.1:{port}"\n[[control.tokens]]\nrole = "viewer"\ntoken_file = "{token}"\n',
        )
        outcome = start_refused(config, tmp_path)
    finally:
        taken.close()
    assert outcome.returncode == 78, outcome
    line = one_line(outcome.stderr)
    assert f"control.tcp_listen 127.0.0.1:{port}: cannot listen" in line, line
    assert not (tmp_path / "control.sock").exists()  # the unix socket it did bind is cleaned up


class _OddAgent:
    """A trusted (root's) process on the control socket that answers 200 with JSON the CLI does not expect:
    what a newer or broken agent might send."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        body = b'{"unexpected": true}'
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if data:
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body
                        )
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def odd_agent(tmp_path: Path) -> Iterator[Path]:
    agent = _OddAgent(tmp_path / "control.sock")
    try:
        yield tmp_path / "control.sock"
    finally:
        agent.close()


def test_an_answer_the_cli_does_not_understand_is_one_line_and_a_traceback_only_with_v(
    tmp_path: Path, odd_agent: Path
) -> None:
    config = _config(tmp_path)
    quiet = run_cli(config, "status")
    assert quiet.returncode == 1, quiet.stderr
    line = one_line(quiet.stderr)
    assert line.startswith("kybdr-agent: status failed: internal error"), line
    assert "run with -v for details" in line

    loud = run_cli(config, "-v", "status")
    assert loud.returncode == 1
    assert "Traceback" in loud.stderr
    assert loud.stderr.rstrip().splitlines()[-1].startswith("kybdr-agent: status failed: internal error")


def test_run_startup_failure_is_one_line_even_when_the_socket_directory_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the socket's directory should be\n")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[backup]\nencryption = false\nbackup_dir = "{tmp_path / "state"}"\n[drill]\nschedule = ""\n'
        f'[control]\nsocket = "{blocker / "run" / "control.sock"}"\n'
    )
    outcome = start_refused(config, tmp_path)
    assert outcome.returncode == 78, outcome
    assert "control.socket" in one_line(outcome.stderr)
