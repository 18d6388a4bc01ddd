"""Helpers shared by the configuration and secret-file fault tests (this module holds no tests of its own).

A refused start is judged from outside, as systemd would see it: the real ``kybdr-agent run`` process, a
notify socket the test binds, and what exists on disk afterwards. "Hung" is a start that neither exits nor
gets refused within the deadline (today's code would start and run); "left behind" is anything a refused
start nevertheless did: READY=1 sent, the control socket created, the state directory or journal created.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import subprocess
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import KYBDR, REPO_ROOT, run_cli

REFUSAL_DEADLINE = 20.0


@dataclass
class StartOutcome:
    """How one ``kybdr-agent run`` ended: its status (None: still running at the deadline), its stderr,
    and what it did that a refused start must not do."""

    returncode: int | None
    stderr: str
    ready: bool
    socket_created: bool
    state_created: bool

    @property
    def hung(self) -> bool:
        return self.returncode is None

    @property
    def left_behind(self) -> int:
        return int(self.ready) + int(self.socket_created) + int(self.state_created)


def start_refused(
    config: Path,
    workdir: Path,
    *,
    socket_path: Path | None = None,
    state_dir: Path | None = None,
    deadline: float = REFUSAL_DEADLINE,
    env: dict[str, str] | None = None,
) -> StartOutcome:
    """Run the agent and wait for it to give up; a start that does not is stopped and reported as hung."""
    notify_path = workdir / f"notify-{uuid.uuid4().hex[:8]}.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.05)
    socket_existed = socket_path is not None and os.path.lexists(socket_path)
    state_existed = state_dir is not None and state_dir.exists()
    stderr_path = workdir / f"run-{uuid.uuid4().hex[:8]}.err"
    messages: list[str] = []
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [*KYBDR, "--config", str(config), "run"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path), **(env or {})},
        )
        ends = time.monotonic() + deadline
        try:
            while proc.poll() is None and time.monotonic() < ends:
                with contextlib.suppress(TimeoutError, BlockingIOError):
                    messages.append(notify.recv(4096).decode())
        finally:
            hung = proc.poll() is None
            if hung:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            notify.close()
            notify_path.unlink(missing_ok=True)
    ready = any("READY=1" in message.split("\n") for message in messages)
    return StartOutcome(
        returncode=None if hung else proc.returncode,
        stderr=stderr_path.read_text(errors="replace"),
        ready=ready,
        socket_created=socket_path is not None and not socket_existed and os.path.lexists(socket_path),
        state_created=state_dir is not None and not state_existed and state_dir.exists(),
    )


def one_line(stderr: str) -> str:
    """The single line a refusal prints (asserting there is exactly one, and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# --- running the CLI as another user ------------------------------------------------------------

# The venv's interpreter lives under /root, which other users cannot enter; the system Python of the same
# minor version runs the same code with the venv's site-packages on its path.
SYSTEM_PYTHON = Path("/usr/bin/python3")


def can_run_unprivileged() -> bool:
    if os.geteuid() != 0 or not SYSTEM_PYTHON.exists():
        return False
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return False
    probe = run_as("nobody", "--version")
    return probe.returncode == 0


def run_as(user: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Any:
    """``kybdr-agent ARGS`` as ``user`` (via runuser), from a directory that user may enter."""
    site = sysconfig.get_paths()["purelib"]
    argv = [
        "runuser",
        "-u",
        user,
        "--",
        "env",
        f"PYTHONPATH={REPO_ROOT}:{site}",
        *(f"{key}={value}" for key, value in (env or {}).items()),
        str(SYSTEM_PYTHON),
        "-m",
        "kybdr_agent",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd="/")


def shared_dir(mode: int = 0o755, owner: str | None = None) -> Path:
    """A fresh directory under /tmp (pytest's own are 0700 root: other users could not reach them)."""
    path = Path(tempfile.mkdtemp(prefix="kybdr-fault-", dir="/tmp"))
    if owner is not None:
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    path.chmod(mode)
    return path


def check(config: Path, *extra: str) -> Any:
    return run_cli(config, *extra, "config", "check")
