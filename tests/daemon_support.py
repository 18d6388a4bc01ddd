"""The agent as a real process: started with a temp config, reached over its real unix socket (or TCP),
watched through a notify socket the test binds, stopped with real signals."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import KYBDR


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60) -> None:
        super().__init__("kybdr-agent", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        deadline = time.monotonic() + 10
        while True:  # a full listen queue refuses a unix connect with EAGAIN instead of queueing it
            try:
                sock.connect(self._path)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock = sock


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: Any


def http_request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, path, body=payload, headers=all_headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    parsed: Any = json.loads(data) if data else None
    return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed)


@dataclass
class Daemon:
    config: Path
    socket_path: Path
    process: subprocess.Popen[bytes]
    notify: socket.socket
    log_path: Path
    messages: list[str] = field(default_factory=list)

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Response:
        return http_request(UnixHTTPConnection(str(self.socket_path)), method, path, body, **kwargs)

    def tcp_request(self, port: int, method: str, path: str, body: Any = None, token: str | None = None) -> Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return http_request(
            http.client.HTTPConnection("127.0.0.1", port, timeout=60), method, path, body, headers=headers
        )

    def wait_job(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        resp = self.request("GET", f"/v1/jobs/{job_id}?wait=true&timeout={timeout}")
        assert resp.status == 200, resp.body
        job: dict[str, Any] = resp.body
        assert job["status"] in ("succeeded", "failed", "cancelled"), job
        return job

    def read_notify(self, timeout: float = 30) -> list[str]:
        """Collect notify datagrams received so far (waiting up to ``timeout`` for the first)."""
        self.notify.settimeout(timeout)
        got: list[str] = []
        try:
            while True:
                got.append(self.notify.recv(4096).decode())
                self.notify.settimeout(0.05)
        except (TimeoutError, BlockingIOError):
            pass
        self.messages += got
        return got

    def wait_notify(self, line: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(line in m.split("\n") for m in self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {line} from the agent; got {self.messages}\n{self.log()}")
            self.read_notify(timeout=max(0.05, deadline - time.monotonic()))

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return int(self.process.returncode)


def start_daemon(config: Path, socket_path: Path, workdir: Path, env: dict[str, str] | None = None) -> Daemon:
    notify_path = workdir / f"notify-{uuid.uuid4().hex[:8]}.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    log_path = workdir / "agent.log"
    process = subprocess.Popen(
        [*KYBDR, "--config", str(config), "run"],
        stdout=subprocess.DEVNULL,
        stderr=open(log_path, "ab"),  # noqa: SIM115 - the child owns it
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path), **(env or {})},
    )
    daemon = Daemon(config, socket_path, process, notify, log_path)
    try:
        daemon.wait_notify("READY=1", timeout=60)
    except AssertionError:
        daemon.stop()
        raise
    return daemon
