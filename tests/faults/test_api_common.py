"""Helpers shared by the control-API fault tests (this module holds no tests of its own).

The agent always runs as a real process with a temp config, reached over its real unix socket or TCP;
these helpers only build that config, speak raw bytes where http.client would refuse to, and count what a
refused request may have left behind (jobs, databases, backups).
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kybdr_agent.postgres.cluster import Cluster, free_port
from tests.daemon_support import Daemon, Response, start_daemon


@dataclass
class Agent:
    """A running agent plus what a test needs to reach it over TCP."""

    daemon: Daemon
    tmp_path: Path
    port: int | None = None
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.daemon.process.pid

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Response:
        return self.daemon.request(method, path, body, **kwargs)

    def jobs(self) -> list[dict[str, Any]]:
        resp = self.request("GET", "/v1/jobs")
        assert resp.status == 200, resp.body
        jobs: list[dict[str, Any]] = resp.body["jobs"]
        return jobs

    def backup_ids(self) -> list[str]:
        resp = self.request("GET", "/v1/backup")
        assert resp.status == 200, resp.body
        return [b["id"] for b in resp.body["backups"]]

    def healthy(self, timeout: float = 30) -> bool:
        """True if /healthz answers 200 within ``timeout`` (a hang guard, not a speed assertion)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.daemon.socket_path))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            return read_response(sock).startswith(b"HTTP/1.1 200")
        except OSError:
            return False
        finally:
            sock.close()

    def stop(self) -> None:
        assert self.daemon.stop() == 0, self.daemon.log()


def write_config(
    tmp_path: Path,
    pg: Cluster,
    key_file: Path,
    *,
    databases: list[str],
    tcp: bool = False,
    extra_backup: str = "",
) -> tuple[Path, Path, int | None, dict[str, str]]:
    """A minimal agent config: file repository, no schedules, short shutdown grace; TCP with one token
    per role when asked."""
    socket_path = tmp_path / "control.sock"
    port = free_port() if tcp else None
    tokens: dict[str, str] = {}
    token_entries = ""
    if tcp:
        for role in ("viewer", "operator", "admin"):
            tokens[role] = secrets.token_urlsafe(24)
            token_file = tmp_path / f"{role}.token"
            token_file.write_text(tokens[role] + "\n")
            token_file.chmod(0o600)
            token_entries += f'\n[[control.tokens]]\nrole = "{role}"\ntoken_file = "{token_file}"\n'
    listen = f'tcp_listen = "127.0.0.1:{port}"\n' if tcp else ""
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[backup]\nbackup_dir = "{tmp_path / "state"}"\n{extra_backup}\n'
        f'[database]\ndsn = "host={pg.socket_dir} port={pg.port} user=postgres"\n'
        f"databases = {json.dumps(databases)}\n\n"
        f'[encryption]\nkey_file = "{key_file}"\n\n[repository]\nurl = "file://{tmp_path / "repo"}"\n\n'
        f'[control]\nsocket = "{socket_path}"\n{listen}\n[drill]\nschedule = ""\n\n'
        f"[daemon]\nshutdown_grace_seconds = 2\n{token_entries}"
    )
    return config, socket_path, port, tokens


def start_agent(
    tmp_path: Path, pg: Cluster, key_file: Path, *, databases: list[str], tcp: bool = False, extra_backup: str = ""
) -> Agent:
    config, socket_path, port, tokens = write_config(
        tmp_path, pg, key_file, databases=databases, tcp=tcp, extra_backup=extra_backup
    )
    return Agent(start_daemon(config, socket_path, tmp_path), tmp_path, port, tokens)


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (requests here say Connection: close)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def raw_request(agent: Agent, payload: bytes, timeout: float = 60) -> bytes:
    """Send bytes exactly as given over the unix socket; return the raw answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(agent.daemon.socket_path))
        sock.sendall(payload)
        return read_response(sock)
    finally:
        sock.close()


def status_of(raw: bytes) -> int:
    head = raw.split(b"\r\n", 1)[0].split()
    return int(head[1]) if len(head) >= 2 and head[1].isdigit() else 0


def body_of(raw: bytes) -> Any:
    _, _, body = raw.partition(b"\r\n\r\n")
    return json.loads(body) if body.strip() else None


def databases(pg: Cluster) -> set[str]:
    # One name a line: names may hold any other whitespace (NBSP, NEL), so never str.split() them.
    return set(pg.psql("postgres", "select datname from pg_database").rstrip("\n").split("\n"))


def rss_kib(pid: int) -> int:
    """The process's resident set size (VmRSS) in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def wait_until_idle(agent: Agent, timeout: float = 300) -> list[dict[str, Any]]:
    """Poll until no job is queued or running (a hang guard); returns the job list."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = agent.jobs()
        if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs):
            return jobs
        assert time.monotonic() < deadline, (jobs, agent.daemon.log()[-4000:])
        time.sleep(0.2)
