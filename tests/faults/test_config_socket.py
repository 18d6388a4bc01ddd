"""Issue 7, item 9: a control socket anyone can pre-empt.

``control.socket = "/tmp/x.sock"`` was accepted; an unprivileged user who listened there first made the root
agent exit ("another agent is already listening") and then received the root CLI's ``restore --force`` and
answered its ``status``. Now a socket whose directory someone untrusted could write is refused by
``config check`` and ``run`` (exit 78, nothing created), and the CLI refuses to talk to a socket that is not
owned — and served — by root, itself or ``daemon.service_user``, without falling back to doing the work in
its own process.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kybdr_agent.postgres.cluster import Cluster
from tests.faults.report import FaultTally
from tests.faults.test_config_common import (
    SYSTEM_PYTHON,
    can_run_unprivileged,
    check,
    one_line,
    run_as,
    shared_dir,
    start_refused,
)
from tests.support import run_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create other users' directories")

IMPOSTOR = r"""
import os, socket, sys
path, log = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o666)
server.listen(16)
open(log + ".ready", "w").close()
body = b'{"agent": {"status": "ok", "version": "impostor", "uptime_seconds": 1, "jobs_running": 0}, "jobs": []}'
while True:
    conn, _ = server.accept()
    conn.settimeout(2)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    with open(log, "ab") as fh:
        fh.write(b"CONNECTION %d\n" % len(data) + data + b"\n")
    if data:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
    conn.close()
"""


@pytest.fixture
def dirs() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def _config(tmp_path: Path, socket_path: Path, extra: str = "") -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[backup]\nencryption = false\nbackup_dir = "{tmp_path / "state"}"\n'
        f'[repository]\nurl = "file://{tmp_path / "repo"}"\n[drill]\nschedule = ""\n'
        f'[control]\nsocket = "{socket_path}"\n{extra}'
    )
    return config


def _unsafe_places(dirs: list[Path]) -> list[tuple[str, Path]]:
    tag = secrets.token_hex(4)
    world = shared_dir(0o777)
    group = shared_dir(0o775)
    foreign = shared_dir(0o755, owner="nobody")
    outer = shared_dir(0o777)
    (outer / "inner").mkdir(mode=0o755)
    dirs += [world, group, foreign, outer]
    dirs.append(Path(f"/tmp/kybdr-absent-{tag}"))
    return [
        ("/tmp itself (world-writable, sticky)", Path(f"/tmp/kybdr-{tag}.sock")),
        ("a 0777 directory", world / "control.sock"),
        ("a group-writable directory", group / "control.sock"),
        ("a directory owned by nobody", foreign / "control.sock"),
        ("a directory still to be created under /tmp", Path(f"/tmp/kybdr-absent-{tag}/run/control.sock")),
        ("a private directory inside a 0777 one", outer / "inner" / "control.sock"),
    ]


def test_config_check_and_run_refuse_a_socket_others_could_pre_empt(tmp_path: Path, dirs: list[Path]) -> None:
    places = _unsafe_places(dirs)
    tally = FaultTally(fault="config: control socket others could pre-empt", injected=len(places))
    for name, socket_path in places:
        config = _config(tmp_path, socket_path)
        checked = check(config)
        assert checked.returncode == 78, (name, checked.stdout, checked.stderr)
        line = one_line(checked.stderr)
        assert f"control.socket {socket_path}" in line, (name, line)

        outcome = start_refused(config, tmp_path, socket_path=socket_path, state_dir=tmp_path / "state")
        tally.hung += int(outcome.hung)
        tally.left_behind += outcome.left_behind + int(socket_path.parent.exists() and "absent" in str(socket_path))
        assert outcome.returncode == 78, (name, outcome)
        assert f"control.socket {socket_path}" in one_line(outcome.stderr), (name, outcome.stderr)
    tally.assert_clean()


def _start_impostor(place: Path, logs: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    socket_path = place / "control.sock"
    log = logs / "impostor.log"
    script = logs / "impostor.py"
    script.write_text(IMPOSTOR)
    proc = subprocess.Popen(
        ["runuser", "-u", "nobody", "--", str(SYSTEM_PYTHON), str(script), str(socket_path), str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # runuser forks: the impostor is its child, stopped with the whole group
    )
    deadline = time.monotonic() + 20
    while not Path(f"{log}.ready").exists():
        assert proc.poll() is None, "the impostor did not start"
        assert time.monotonic() < deadline, "the impostor did not start"
        time.sleep(0.05)
    return proc, socket_path, log


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="the impostor runs as nobody with the system Python")
@pytest.mark.parametrize("variant", ["socket file owned by nobody", "root-owned file, nobody listening"])
def test_cli_refuses_an_impostor_and_does_not_run_in_process(
    pg: Cluster, tmp_path: Path, dirs: list[Path], variant: str
) -> None:
    """The directory was nobody's to write once (here: 0777 while the impostor bound), then made private:
    the location check passes, so the CLI has to judge the socket itself."""
    place = shared_dir(0o777)
    logs = shared_dir(0o755, owner="nobody")
    dirs += [place, logs]
    impostor, socket_path, log = _start_impostor(place, logs)
    try:
        place.chmod(0o755)
        if variant == "root-owned file, nobody listening":
            os.chown(socket_path, 0, 0)
        config = _config(
            tmp_path,
            socket_path,
            extra=f'[database]\ndsn = "host={pg.socket_dir} port={pg.port} user=postgres"\n',
        )
        commands = [
            ["status"],
            ["restore", "20261124T215226Z-3f9a1c2b", "--target-database", "victim", "--force"],
            ["backup", "--database", "postgres"],
            ["list"],
        ]
        tally = FaultTally(fault=f"control: impostor socket ({variant})", injected=len(commands))
        for argv in commands:
            proc = run_cli(config, *argv)
            assert proc.returncode == 78, (argv, proc.stdout, proc.stderr)
            line = one_line(proc.stderr)
            assert "refusing to talk to it" in line, line
            assert "not running the command in this process" in line, line
        received = log.read_bytes() if log.exists() else b""
        heard = [entry for entry in received.split(b"CONNECTION ")[1:] if not entry.startswith(b"0\n")]
        tally.left_behind = len(heard)
        # Nothing was done in-process instead: no backup, no journal, no repository.
        tally.left_behind += int((tmp_path / "repo").exists()) + int((tmp_path / "state").exists())
        tally.assert_clean()
        assert heard == [], received
        # --local is the explicit way to work here, impostor or not.
        local = run_cli(config, "--local", "list", "--json")
        assert local.returncode == 0, local.stderr
        assert json.loads(local.stdout) == []
    finally:
        _stop_group(impostor, signal.SIGKILL)


@pytest.mark.skipif(not can_run_unprivileged(), reason="no unprivileged user can run the system Python here")
def test_unprivileged_agent_is_trusted_by_itself_and_by_root_only_as_service_user(
    tmp_path: Path, dirs: list[Path]
) -> None:
    """As nobody: its own directory is fine for config check, run and the CLI. Root's CLI trusts that agent
    only when ``daemon.service_user`` names nobody; a directory of root's that is 0777 is refused even to
    nobody."""
    home = shared_dir(0o700, owner="nobody")
    dirs.append(home)
    socket_path = home / "control.sock"
    nobody = pwd.getpwnam("nobody")

    def config_for(service_user: str) -> Path:
        config = home / f"agent-{service_user}.toml"
        config.write_text(
            f'[backup]\nencryption = false\nbackup_dir = "{home / "state"}"\n'
            f'[repository]\nurl = "file://{home / "repo"}"\n[drill]\nschedule = ""\n'
            f'[control]\nsocket = "{socket_path}"\n[daemon]\nservice_user = "{service_user}"\n'
        )
        os.chown(config, nobody.pw_uid, nobody.pw_gid)
        return config

    as_kybdr = config_for("kybdr")
    as_nobody = config_for("nobody")
    checked = run_as("nobody", "--config", str(as_kybdr), "config", "check")
    assert checked.returncode == 0, checked.stderr

    agent = subprocess.Popen(
        [
            "runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={_pythonpath()}",
            str(SYSTEM_PYTHON), "-m", "kybdr_agent", "--config", str(as_kybdr), "run",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert agent.poll() is None, "the unprivileged agent exited"
            assert time.monotonic() < deadline, "the unprivileged agent did not listen"
            time.sleep(0.1)
        mine = run_as("nobody", "--config", str(as_kybdr), "status", "--json")
        assert mine.returncode == 0, mine.stderr
        assert json.loads(mine.stdout)["agent"]["status"]

        refused = run_cli(as_kybdr, "status")
        assert refused.returncode == 78, refused.stderr
        assert "owned by nobody" in one_line(refused.stderr)

        trusted = run_cli(as_nobody, "status", "--json")
        assert trusted.returncode == 0, trusted.stderr
    finally:
        _stop_group(agent, signal.SIGTERM)

    shared = shared_dir(0o777)
    dirs.append(shared)
    config = home / "shared.toml"
    config.write_text(f'[backup]\nencryption = false\n[control]\nsocket = "{shared / "control.sock"}"\n')
    os.chown(config, nobody.pw_uid, nobody.pw_gid)
    refused = run_as("nobody", "--config", str(config), "config", "check")
    assert refused.returncode == 78, refused.stderr
    assert "writable by others" in one_line(refused.stderr)


def _stop_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    """Signal runuser and what it started (a session of their own), then reap runuser."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _pythonpath() -> str:
    import sysconfig

    from tests.support import REPO_ROOT

    return f"{REPO_ROOT}:{sysconfig.get_paths()['purelib']}"
