"""``archive_mode = on`` with ``archive_command = 'kybdr-agent wal-push %p'`` against the agent as a real
process: a real PostgreSQL 15 cluster (running as ``postgres``) pushes its WAL over the control socket to a
daemon running as root, and nothing is counted archived that the agent does not hold.

What it proves, in one flow: switched segments arrive (in the spool, or already shipped to the archive), byte
for byte; with the agent stopped the archiver fails and retries (``pg_stat_archiver.failed_count`` grows) and
loses nothing (the ``.ready`` files stay); with the agent back every file arrives with no gap; a transfer whose
bytes do not match their SHA-256 and a name that is not a WAL file are refused with nothing written.

How PostgreSQL's user reaches a root agent without a world-accessible socket: the socket's directory is
``root:postgres`` mode 2750 (setgid), so the socket (0660) is created in the ``postgres`` group — the same
arrangement the README describes for ``/run/kybdr-agent``. The command runs the same entry point as the
console script; PostgreSQL's user cannot execute this checkout's virtualenv interpreter (it lives under
/root), so unless it can, the command runs the system ``python3`` on this checkout — which has no pydantic or
aiohttp installed, so a push that works there is also proof that the path is standard-library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from kybdr_agent.postgres.cluster import Cluster, start_cluster
from tests.daemon_support import Daemon, start_daemon

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
VENV_SCRIPT: Final = REPO_ROOT / ".venv" / "bin" / "kybdr-agent"
SYSTEM_PYTHON: Final = Path("/usr/bin/python3")
SEGMENT_SIZE: Final = 1 << 20  # initdb --wal-segsize=1: the same code path, 16 times fewer bytes


def _postgres_ids() -> tuple[int, int]:
    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


def _runs_as_postgres(argv: list[str]) -> bool:
    uid, gid = _postgres_ids()
    try:
        done = subprocess.run(argv, user=uid, group=gid, extra_groups=[], capture_output=True, check=False, timeout=30)
    except PermissionError:
        return False
    return done.returncode == 0


def _wal_push_command(config: Path) -> str:
    """The archive_command: the console script when PostgreSQL's user can run it and it routes through
    ``kybdr_agent.entry``, else the same entry module on the system interpreter."""
    usable = VENV_SCRIPT.exists() and "kybdr_agent.entry" in VENV_SCRIPT.read_text()
    if usable and _runs_as_postgres([str(VENV_SCRIPT), "--version"]):
        return f"{VENV_SCRIPT} --config {config} wal-push %p"
    # -P: not the data directory (the command's working directory) on the module path.
    return f"PYTHONPATH={REPO_ROOT} {SYSTEM_PYTHON} -P -m kybdr_agent.entry --config {config} wal-push %p"


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory the postgres user may enter and read (config, socket) but not write: root:postgres 2750."""
    if os.geteuid() != 0:
        pytest.skip("the cluster runs as postgres and the agent as root: needs root")
    path = Path(tempfile.mkdtemp(prefix="kybdr-walpush-", dir="/tmp"))
    os.chown(path, 0, _postgres_ids()[1])
    os.chmod(path, 0o2750)  # noqa: S103 - group postgres may read and enter, never write
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _archiver(cluster: Cluster) -> dict[str, Any]:
    row = cluster.psql(
        "postgres",
        "select json_build_object('archived', archived_count, 'failed', failed_count, "
        "'last', last_archived_wal, 'last_failed', last_failed_wal) from pg_stat_archiver",
    )
    result: dict[str, Any] = json.loads(row)
    return result


def _switch(cluster: Cluster) -> str:
    """Write something and switch: the name of the segment just completed."""
    return cluster.psql("postgres", "insert into t values (default); select pg_walfile_name(pg_switch_wal());").strip()


def _ready(cluster: Cluster) -> list[str]:
    status = cluster.data_dir / "pg_wal" / "archive_status"
    return sorted(p.name.removesuffix(".ready") for p in status.glob("*.ready"))


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Arrivals:
    """Where a pushed file may be: still in the spool, or already shipped (its record is in the archive)."""

    def __init__(self, spool: Path, repo: Path, cluster: Cluster) -> None:
        self.spool, self.repo, self.cluster = spool, repo, cluster
        self.seen: dict[str, str] = {}  # name -> sha256 of the spooled bytes, once checked

    def arrived(self, name: str) -> bool:
        spooled = self.spool / name
        if spooled.exists():
            try:
                self.seen[name] = hashlib.sha256(spooled.read_bytes()).hexdigest()
            except FileNotFoundError:  # shipped just now
                pass
            else:
                return True
        return name in self.seen or any(self.repo.glob(f"**/wal/*/*/{name}.json"))

    def matches_pg_wal(self, name: str) -> bool:
        if name not in self.seen:
            return True  # shipped before we looked: the archive's own checks cover it
        original = self.cluster.data_dir / "pg_wal" / name
        return not original.exists() or hashlib.sha256(original.read_bytes()).hexdigest() == self.seen[name]


def test_archive_command_pushes_through_the_agent_and_loses_nothing_while_it_is_down(
    place: Path, key_file: Path
) -> None:
    config = place / "agent.toml"
    socket_path = place / "control.sock"
    spool, repo = place / "spool", place / "repo"
    command = _wal_push_command(config)
    archiving = f"archive_mode = on\narchive_command = '{command}'\n"
    with start_cluster(wal_segsize_mb=1, extra_conf=archiving) as cluster:
        cluster.psql("postgres", "create table t (id serial primary key)")
        config.write_text(
            f'[backup]\nbackup_dir = "{place / "state"}"\n'
            f'[database]\ndsn = "host={cluster.socket_dir} port={cluster.port} user=postgres"\n'
            f'[encryption]\nkey_file = "{key_file}"\n[repository]\nurl = "file://{repo}"\n'
            f'[control]\nsocket = "{socket_path}"\n[drill]\nschedule = ""\n'
            f"[daemon]\nshutdown_grace_seconds = 2\n"
            f'[wal]\nenabled = true\nmode = "archive_command"\nspool_dir = "{spool}"\n'
        )
        os.chown(config, 0, _postgres_ids()[1])
        config.chmod(0o640)
        arrivals = Arrivals(spool, repo, cluster)
        agent: Daemon | None = start_daemon(config, socket_path, place)
        try:
            assert agent is not None
            # The agent up: every switched segment arrives, byte for byte.
            first = [_switch(cluster) for _ in range(3)]
            _wait(lambda: all(arrivals.arrived(n) for n in first), f"{first} in the spool or archive")
            _wait(lambda: _archiver(cluster)["last"] == first[-1], "PostgreSQL to count them archived")
            assert all(arrivals.matches_pg_wal(n) for n in first)

            # A transfer that does not match its digest, and a name that is not a WAL file: refused, nothing written.
            data = os.urandom(SEGMENT_SIZE)
            name = "0000000100000000000000F0"
            bad = agent.request(
                "POST",
                f"/v1/wal/push?name={name}",
                raw=data,
                headers={"Content-Type": "application/octet-stream", "X-Content-SHA256": "0" * 64},
            )
            assert (bad.status, bad.body["type"].rsplit("/", 1)[1]) == (400, "digest-mismatch"), bad.body
            for wrong in ("..%2F..%2Fetc%2Fpasswd", "000000010000000000000003.tmp"):
                refused = agent.request(
                    "POST",
                    f"/v1/wal/push?name={wrong}",
                    raw=data,
                    headers={"X-Content-SHA256": hashlib.sha256(data).hexdigest()},
                )
                assert refused.status == 400, refused.body
            assert not (spool / name).exists()
            assert not list((spool / ".incoming").glob("*"))
            assert not list(place.rglob("passwd"))

            # PostgreSQL's user reaches the socket through its group to push WAL, and for nothing else: it is
            # not the agent's admin (an ordinary read and a backup request are 403, over the same socket).
            probe = (
                "import http.client, socket, sys\n"
                "class C(http.client.HTTPConnection):\n"
                "    def connect(self):\n"
                "        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])\n"
                "for method, path in (('GET', '/v1/backup'), ('POST', '/v1/backup')):\n"
                "    c = C('localhost'); c.request(method, path, body=b'{}' if method == 'POST' else None,\n"
                "        headers={'Content-Type': 'application/json'}); print(c.getresponse().status)\n"
            )
            uid, gid = _postgres_ids()
            answered = subprocess.run(
                ["/usr/bin/python3", "-c", probe, str(socket_path)],
                user=uid,
                group=gid,
                extra_groups=[gid],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
            assert answered.stdout.split() == ["403", "403"], answered

            # The agent stopped: the archiver fails and retries, and keeps every file it could not hand over.
            assert agent.stop() == 0, agent.log()
            agent = None
            before = _archiver(cluster)
            down = [_switch(cluster) for _ in range(2)]
            _wait(lambda: _archiver(cluster)["failed"] > before["failed"], "the archiver to fail")
            assert down[0] in _ready(cluster)
            assert not any(arrivals.arrived(n) for n in down)
            log = (cluster.base / "postgres.log").read_text()
            assert "kybdr-agent wal-push: " + down[0] + ": the agent is not running" in log

            # The agent back: the next switch wakes the archiver, and everything arrives in order, no gap.
            agent = start_daemon(config, socket_path, place)
            last = _switch(cluster)
            _wait(lambda: _archiver(cluster)["last"] == last and not _ready(cluster), "the backlog", timeout=60)
            every = [*first, *down, last]
            assert all(arrivals.arrived(n) for n in every), [n for n in every if not arrivals.arrived(n)]
            segnos = [int(n[8:], 16) for n in every]
            assert segnos == list(range(segnos[0], segnos[0] + len(segnos))), every
            assert all(arrivals.matches_pg_wal(n) for n in every)
            assert agent.stop() == 0, agent.log()
            agent = None
            assert "Traceback" not in (place / "agent.log").read_text()
        finally:
            if agent is not None:
                agent.stop()
