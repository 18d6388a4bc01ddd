"""Throwaway PostgreSQL clusters: initdb in a temp dir, a random loopback port, torn down completely.

Used by ``kybdr-agent demo`` (the embedded default, when no database is configured) and by the test suite.
As root, initdb and postgres refuse to run, so the children drop to the ``postgres`` user; the cluster then
lives under /tmp (pytest's temp dirs are 0700 root, which that user cannot traverse).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

PG_BIN: Final = Path(os.environ.get("KYBDR_PG_BIN", "/usr/lib/postgresql/15/bin"))
START_TIMEOUT: Final = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _demote() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@dataclass
class Cluster:
    """A running cluster; superuser ``postgres`` over the unix socket (trust) or TCP (password)."""

    base: Path
    port: int
    process: subprocess.Popen[bytes]
    superuser_password: str
    _stopped: bool = field(default=False, repr=False)

    @property
    def socket_dir(self) -> str:
        return str(self.base / "sock")

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    def env(self, *, tcp: bool = False) -> dict[str, str]:
        """libpq environment reaching this cluster as its superuser."""
        env = {"PGHOST": "127.0.0.1" if tcp else self.socket_dir, "PGPORT": str(self.port), "PGUSER": "postgres"}
        if tcp:
            env["PGPASSWORD"] = self.superuser_password
        return env

    def psql(self, database: str, sql: str, *, check: bool = True) -> str:
        """Run SQL through psql (used to build test and demo data; not part of the agent's data path)."""
        proc = subprocess.run(
            [str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", database],
            input=sql.encode(),
            capture_output=True,
            env={**os.environ, **self.env()},
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"psql failed: {proc.stderr.decode().strip()}")
        return proc.stdout.decode()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(
    *, password: str | None = None, log_to: Path | None = None, wal_segsize_mb: int | None = None, extra_conf: str = ""
) -> Cluster:
    """initdb + start; local (socket) connections trust, TCP connections need a SCRAM password.

    ``wal_segsize_mb`` (a power of two, 1–1024) makes segments small, so WAL tests switch and ship 1 MiB
    files instead of 16 MiB; ``extra_conf`` is appended to postgresql.conf (archive settings and the like)."""
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError(f"PostgreSQL server binaries not found in {PG_BIN} (install postgresql-15)")
    password = password or secrets.token_urlsafe(16)
    demote = _demote()
    base = Path(tempfile.mkdtemp(prefix="kybdr-pg-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)  # noqa: S103 - the postgres user must traverse it; nothing secret lives here
        (base / "sock").mkdir()
        pwfile = base / "pw"
        pwfile.write_text(password + "\n")
        if demote:
            for path in (base, base / "sock", pwfile):
                os.chown(path, demote["user"], demote["group"])
        subprocess.run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(base / "data"),
                "-U",
                "postgres",
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--no-instructions",
                "-E",
                "UTF8",
                "--locale=C",
                *([f"--wal-segsize={wal_segsize_mb}"] if wal_segsize_mb else []),
            ],
            check=True,
            capture_output=True,
            **demote,
        )
        pwfile.unlink()
        with open(base / "data" / "postgresql.conf", "a") as conf:
            conf.write(
                "\nfsync = off\nfull_page_writes = off\nsynchronous_commit = off\n"
                "wal_level = replica\nmax_wal_senders = 5\nwal_keep_size = 64MB\nhot_standby = on\n"
                "max_connections = 50\nshared_buffers = 128MB\n" + extra_conf + "\n"
            )
        port = free_port()
        logfile = open(log_to or base / "postgres.log", "ab")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(base / "data"),
                "-p",
                str(port),
                "-k",
                str(base / "sock"),
                "-c",
                "listen_addresses=127.0.0.1",
            ],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            **demote,
        )
        logfile.close()
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    cluster = Cluster(base=base, port=port, process=process, superuser_password=password)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            cluster.stop()
            raise RuntimeError(f"postgres exited with status {process.returncode} during start-up")
        ready = subprocess.run(
            [str(PG_BIN / "pg_isready"), "-q", "-h", cluster.socket_dir, "-p", str(port)], check=False
        )
        if ready.returncode == 0:
            return cluster
        time.sleep(0.05)
    with contextlib.suppress(Exception):
        cluster.stop()
    raise RuntimeError("postgres did not become ready in time")
