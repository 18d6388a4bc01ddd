"""Point-in-time restore with real parts: a PostgreSQL 15 cluster (1 MiB segments) streaming its WAL through
``pg_receivewal`` into the agent's archive (``WalArchive.push``, as the stream-mode shipper does), a physical base
backup made by the agent (``physical_backup_and_record``), and ``kybdr-agent restore --physical`` as a process —
as the ``postgres`` OS user with ``--start``, and as root without it, the directory then started with a plain
``pg_ctl``.

What it proves:

* a restore to a time between two commits brings back exactly the rows committed up to that time;
* ``--latest`` after an immediate shutdown of the source has everything up to the last shipped partial segment
  (what the shipper sends every ``max_partial_age``) and nothing after it;
* a segment whose object is missing, or corrupted, stops the restore with a message naming it, and the server
  never opens a database: without ``--start`` nothing is left behind; with it, PostgreSQL aborts recovery
  (the spool's copy exits above 125) instead of promoting, and the control file never says "in production";
* a timeline switch: the restored copy is promoted (timeline 2) and its WAL archived; a restore to latest then
  follows timeline 2 — its rows, none of what the source wrote on timeline 1 after the branch;
* the recoverable window ``list --json`` shows, and a gap in the archive as its end.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import pytest

from kybdr_agent import app
from kybdr_agent.backup.catalog import read_catalog
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.physical import physical_backup_and_record
from kybdr_agent.backup.pipeline import BackupOptions
from kybdr_agent.backup.streamfmt import Compression
from kybdr_agent.config import AgentSettings, load_settings
from kybdr_agent.postgres.cluster import PG_BIN, Cluster, free_port, start_cluster
from kybdr_agent.storage.local import LocalStore
from kybdr_agent.wal.archive import WalArchive
from kybdr_agent.wal.names import Segment, parse_lsn
from kybdr_agent.wal.records import wal_object_key, wal_record_key
from kybdr_agent.wal.window_report import cluster_windows
from tests.support import MotoServer, s3_repository

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON: Final = Path("/usr/bin/python3")
SEGMENT_SIZE: Final = 1 << 20
SOCKETS: Final = "/var/run/postgresql"  # the copied postgresql.conf names no socket directory: the default


def _postgres() -> tuple[int, int]:
    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


def _as_postgres() -> dict[str, Any]:
    uid, gid = _postgres()
    return {"user": uid, "group": gid, "extra_groups": []}


def _chown_tree(path: Path) -> None:
    uid, gid = _postgres()
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _shared_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    os.chown(path, *_postgres())
    return path


def kybdr(config: Path, *args: str, as_postgres: bool) -> subprocess.CompletedProcess[str]:
    """``kybdr-agent --config CONFIG ARGS`` as a process; as ``postgres`` through runuser (the venv's
    interpreter lives under /root: the system Python of the same minor runs this checkout)."""
    if as_postgres:
        site = sysconfig.get_paths()["purelib"]
        argv = ["runuser", "-u", "postgres", "--", "env", f"PYTHONPATH={REPO_ROOT}:{site}", str(SYSTEM_PYTHON)]
    else:
        argv = [sys.executable]
    argv += ["-m", "kybdr_agent", "--config", str(config), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False, cwd="/")


def psql(port: int, sql: str, *, host: str = SOCKETS) -> str:
    proc = subprocess.run(
        [str(PG_BIN / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", str(port), "-U", "postgres",
         "-d", "postgres", "-c", sql],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def control_state(pgdata: Path) -> str:
    out = subprocess.run(
        [str(PG_BIN / "pg_controldata"), "-D", str(pgdata)],
        capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"},
    ).stdout  # fmt: skip
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Database cluster state"))


def pg_ctl(pgdata: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PG_BIN / "pg_ctl"), "-D", str(pgdata), *args], capture_output=True, text=True, check=False,
        timeout=120, cwd="/", **_as_postgres(),
    )  # fmt: skip


def wait_promoted(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psql(port, "select pg_is_in_recovery()") == "f":
                return
        except AssertionError:
            pass
        time.sleep(0.2)
    raise AssertionError("the restored server did not leave recovery")


def ids(port: int) -> list[int]:
    return [int(x) for x in psql(port, "select id from t order by id").split()]


# --- WAL from a server into the archive, as the stream-mode shipper does ---------------------------------------


@dataclass
class WalFeed:
    """pg_receivewal on one server into a folder, and a push of what it completed (and, when asked, the
    segment being written: the shipper's ``max_partial_age`` shipment)."""

    cluster_port: int
    host: str
    directory: Path
    archive: WalArchive
    pushed: dict[str, bytes] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(PG_BIN / "pg_receivewal"), "-D", str(self.directory), "-h", self.host, "-p", str(self.cluster_port),
             "-U", "postgres", "--synchronous", "-n", "--no-password"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **_as_postgres(),
        )  # fmt: skip

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    async def ship(self, *, partial: bool = False) -> list[str]:
        shipped = []
        for path in sorted(self.directory.iterdir()):
            if (path.name.endswith(".partial") and not partial) or path.name.endswith(".tmp"):
                continue  # pg_receivewal writes a history file as .tmp, then renames it
            data = path.read_bytes()
            if self.pushed.get(path.name) == data:
                continue
            await self.archive.push(path.name, data, source="stream")
            self.pushed[path.name] = data
            shipped.append(path.name)
        return shipped

    async def ship_until(self, name: str, timeout: float = 30) -> None:
        with anyio.fail_after(timeout):
            while name not in self.pushed:
                await self.ship()
                await anyio.sleep(0.05)

    async def ship_forever(self) -> None:
        while True:
            await self.ship()
            await anyio.sleep(0.1)


def _flushed_to(cluster_port: int, host: str, lsn: str, timeout: float = 30) -> None:
    """Until pg_receivewal has flushed WAL up to ``lsn`` (what a --synchronous receiver confirms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flushed = psql(cluster_port, "select coalesce(max(flush_lsn)::text, '0/0') from pg_stat_replication", host=host)
        if parse_lsn(flushed) >= parse_lsn(lsn):
            return
        time.sleep(0.05)
    raise AssertionError("pg_receivewal did not catch up")


def archive_for(store: LocalStore, settings: AgentSettings) -> Any:
    ring = app.keyring(settings)

    def make(system_identifier: str, segment_size: int) -> WalArchive:
        return WalArchive(
            store, system_identifier=system_identifier, segment_size=segment_size, keyring=ring,
            compression=Compression.ZSTD, compression_level=None, frame_size=1 << 20,
        )  # fmt: skip

    return make


# --- the source, its backup, its history -------------------------------------------------------------------------


@dataclass
class Source:
    base: Path
    repo: Path
    config: Path
    settings: AgentSettings
    manifest: Manifest
    target_time: str  # between the 10th and the 11th row's commits
    target_lsn: str  # the WAL insert position just after the 10th row's commit
    system_identifier: str


def _config(base: Path, repo: Path | str, key: Path, name: str = "agent.toml", dsn: str = "") -> Path:
    """The agent's configuration; ``repo`` a folder, or the body of an S3 ``[repository]``."""
    path = base / name
    repository = f'url = "file://{repo}"\n' if isinstance(repo, Path) else repo
    path.write_text(
        "[backup]\nencryption = true\n\n"
        f'[database]\ndsn = "{dsn or f"host={SOCKETS} user=postgres"}"\n\n'
        f"[repository]\n{repository}\n"
        f'[encryption]\nkey_file = "{key}"\n\n'
        '[daemon]\nservice_user = "postgres"\n\n'
        "[wal]\nenabled = true\n"
    )
    path.chmod(0o644)
    return path


def start_archiving(cluster: Cluster, base: Path, repo: Path, key: Path) -> tuple[Path, AgentSettings, WalFeed]:
    """The agent's configuration for ``cluster`` and a running pg_receivewal feed into its archive."""
    config = _config(base, repo, key, dsn=f"host={cluster.socket_dir} port={cluster.port} user=postgres")
    settings = load_settings(config)
    system_identifier = cluster.psql("postgres", "select system_identifier from pg_control_system()").strip()
    recv = base / "recv"
    recv.mkdir()
    os.chown(recv, *_postgres())
    archive = archive_for(LocalStore(repo), settings)(system_identifier, SEGMENT_SIZE)
    feed = WalFeed(cluster.port, cluster.socket_dir, recv, archive)
    feed.start()
    return config, settings, feed


def physical_backup(feed: WalFeed, repo: Path, settings: AgentSettings) -> Manifest:
    """A base backup made by the agent while the feed ships the WAL the backup waits for."""
    store = LocalStore(repo)

    async def backup() -> Manifest:
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed.ship_forever)
            made = await physical_backup_and_record(
                connection=app.connection(settings),
                maintenance_database="postgres", store=store,
                options=BackupOptions(keyring=app.keyring(settings), compression=Compression.ZSTD),
                archive_for=archive_for(store, settings), wal_enabled=True,
            )  # fmt: skip
            tg.cancel_scope.cancel()
        return made

    return anyio.run(backup)


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    base = _shared_dir("kybdr-pitr-")
    repo = base / "repo"
    repo.mkdir()
    key = base / "master.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    os.chown(key, *_postgres())
    cluster: Cluster | None = None
    feed: WalFeed | None = None
    try:
        cluster = start_cluster(wal_segsize_mb=1)
        config, settings, feed = start_archiving(cluster, base, repo, key)
        cluster.psql("postgres", "create table t (id int primary key)")
        manifest = physical_backup(feed, repo, settings)
        cluster.psql("postgres", "insert into t select g from generate_series(1, 10) g")
        cluster.psql("postgres", "select pg_create_restore_point('after-ten')")
        target_lsn = cluster.psql("postgres", "select pg_current_wal_insert_lsn()").strip()
        target_time = cluster.psql(
            "postgres",
            """select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')""",
        ).strip()
        time.sleep(0.05)
        cluster.psql("postgres", "insert into t select g from generate_series(11, 20) g")
        switched = cluster.psql("postgres", "select pg_walfile_name(pg_switch_wal())").strip()
        anyio.run(lambda: feed.ship_until(switched))
        # Rows 21-30 reach the archive only in the partial segment the shipper sends every max_partial_age;
        # rows 31-40 are written after that shipment, and the source then stops dead.
        cluster.psql("postgres", "insert into t select g from generate_series(21, 30) g")
        _flushed_to(
            cluster.port, cluster.socket_dir, cluster.psql("postgres", "select pg_current_wal_insert_lsn()").strip()
        )
        assert any(name.endswith(".partial") for name in anyio.run(lambda: feed.ship(partial=True)))
        cluster.psql("postgres", "insert into t select g from generate_series(31, 40) g")
        cluster.process.send_signal(signal.SIGQUIT)  # immediate shutdown
        cluster.process.wait(timeout=30)
        feed.stop()
        _chown_tree(repo)  # the repository as an agent running as postgres keeps it
        assert manifest.physical is not None
        system_identifier = manifest.physical.system_identifier
        yield Source(base, repo, config, settings, manifest, target_time, target_lsn, system_identifier)
    finally:
        if feed is not None:
            feed.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _copy_repository(source: Source, name: str) -> tuple[Path, Path]:
    """A copy of the repository (and a config reading it) a test may damage or extend."""
    repo = source.base / name
    shutil.copytree(source.repo, repo)
    _chown_tree(repo)
    key = Path(source.settings.encryption.key_file or "")
    return repo, _config(source.base, repo, key, f"{name}.toml")


def _segment_after_backup(source: Source) -> Segment:
    """The first segment after the backup's consistency range: every restore past the backup needs it."""
    assert source.manifest.physical is not None
    return Segment.ending_at(parse_lsn(source.manifest.physical.stop_lsn), 1, SEGMENT_SIZE).next()


def _new_dir(source: Source, name: str) -> Path:
    return source.base / name  # absent: the restore creates it


def _stop_quietly(pgdata: Path) -> None:
    if (pgdata / "postmaster.pid").exists():
        pg_ctl(pgdata, "-m", "immediate", "-w", "stop")


# --- the tests ---------------------------------------------------------------------------------------------------


def test_a_time_between_two_commits_brings_back_exactly_the_rows_committed_by_then(source: Source) -> None:
    pgdata, port = _new_dir(source, "at-time"), free_port()
    try:
        done = kybdr(
            source.config, "restore", "--physical", "--pgdata", str(pgdata), "--target-time", source.target_time,
            "--start", "--port", str(port), "--json", as_postgres=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["backup_id"] == source.manifest.id
        assert result["server"]["stopped"].startswith("recovery stopping before commit")
        assert result["server"]["timeline"] == 2
        assert result["spool"] is None
        assert not Path(f"{pgdata}.wal-spool").exists()  # recovery is over: the spool is gone
        assert ids(port) == list(range(1, 11))
        assert psql(port, "select pg_is_in_recovery()") == "f"
        info = pgdata.stat()
        assert (info.st_uid, oct(info.st_mode & 0o777)) == (_postgres()[0], "0o700")
    finally:
        _stop_quietly(pgdata)


@pytest.mark.parametrize("kind", ["name", "lsn"])
def test_a_restore_point_or_an_lsn_stops_at_the_same_place(source: Source, kind: str) -> None:
    pgdata, port = _new_dir(source, f"at-{kind}"), free_port()
    target = ["--target-name", "after-ten"] if kind == "name" else ["--target-lsn", source.target_lsn]
    try:
        done = kybdr(
            source.config, "restore", "--physical", source.manifest.id, "--pgdata", str(pgdata), *target, "--start",
            "--port", str(port), as_postgres=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert ids(port) == list(range(1, 11))
        assert f"recovery target: {'restore point' if kind == 'name' else 'LSN'}" in done.stdout
    finally:
        _stop_quietly(pgdata)


def test_latest_after_an_immediate_shutdown_loses_only_what_was_not_shipped(source: Source) -> None:
    pgdata, port = _new_dir(source, "latest"), free_port()
    try:
        done = kybdr(source.config, "restore", "--physical", "--pgdata", str(pgdata), "--latest", as_postgres=False)
        assert done.returncode == 0, done.stderr
        assert "next: chown -R postgres:" in done.stdout
        info = pgdata.stat()
        assert (info.st_uid, oct(info.st_mode & 0o777)) == (0, "0o700")  # whoever ran it: root here
        spool = Path(f"{pgdata}.wal-spool")
        assert not list(spool.glob("*.pending"))  # complete before the command returned
        _chown_tree(pgdata)
        _chown_tree(spool)
        started = pg_ctl(pgdata, "-o", f"-p {port}", "-l", str(source.base / "latest.log"), "-w", "start")
        assert started.returncode == 0, started.stderr + (source.base / "latest.log").read_text()
        wait_promoted(port)
        assert ids(port) == list(range(1, 31))  # 31-40 were committed after the last partial shipment
    finally:
        _stop_quietly(pgdata)


def test_a_missing_segment_stops_the_restore_and_leaves_nothing(source: Source) -> None:
    repo, config = _copy_repository(source, "repo-missing")
    segment = _segment_after_backup(source)
    (repo / wal_object_key(source.system_identifier, segment)).unlink()  # the record stays
    pgdata = _new_dir(source, "missing")
    done = kybdr(config, "restore", "--physical", "--pgdata", str(pgdata), as_postgres=False)
    assert done.returncode == 1
    assert segment.name in done.stderr, done.stderr
    assert "its object does not" in done.stderr
    assert not pgdata.exists()
    assert not Path(f"{pgdata}.wal-spool").exists()


def test_a_corrupted_segment_makes_postgresql_abort_instead_of_promoting(source: Source) -> None:
    repo, config = _copy_repository(source, "repo-corrupt")
    segment = _segment_after_backup(source)
    stored = repo / wal_object_key(source.system_identifier, segment)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x40
    stored.write_bytes(bytes(data))
    pgdata = _new_dir(source, "corrupt")
    try:
        done = kybdr(
            config, "restore", "--physical", "--pgdata", str(pgdata), "--start", "--port", str(free_port()),
            as_postgres=True,
        )  # fmt: skip
        assert done.returncode == 1, done.stdout
        assert "never opened the database" in done.stderr
        assert segment.name in done.stderr
        assert control_state(pgdata) != "in production"
        # Started again by hand, it stops again at the same place: the spool marks the file failed.
        spool = Path(f"{pgdata}.wal-spool")
        assert (spool / f"{segment.name}.failed").exists()
        assert not list(spool.glob("*.pending"))
    finally:
        _stop_quietly(pgdata)


def test_a_promoted_copy_archives_on_timeline_2_and_latest_follows_it(source: Source) -> None:
    repo, config = _copy_repository(source, "repo-timeline")
    first, second = _new_dir(source, "branch"), _new_dir(source, "after-branch")
    port, port2 = free_port(), free_port()
    recv = source.base / "recv-tl2"
    recv.mkdir()
    os.chown(recv, *_postgres())
    try:
        done = kybdr(
            config, "restore", "--physical", "--pgdata", str(first), "--target-time", source.target_time, "--start",
            "--port", str(port), "--json", as_postgres=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["server"]["timeline"] == 2
        store = LocalStore(repo)
        archive = archive_for(store, source.settings)(source.system_identifier, SEGMENT_SIZE)
        feed = WalFeed(port, SOCKETS, recv, archive)
        feed.start()
        try:
            psql(port, "insert into t select g from generate_series(1001, 1010) g")
            switched = psql(port, "select pg_walfile_name(pg_switch_wal())")
            assert switched.startswith("00000002")
            anyio.run(lambda: feed.ship_until(switched))
        finally:
            feed.stop()
        assert "00000002.history" in feed.pushed
        _stop_quietly(first)
        _chown_tree(repo)
        done = kybdr(config, "restore", "--physical", "--pgdata", str(second), "--json", as_postgres=True)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["timeline"] == 2
        started = pg_ctl(second, "-o", f"-p {port2}", "-l", str(source.base / "tl.log"), "-w", "start")
        assert started.returncode == 0, started.stderr
        wait_promoted(port2)
        assert ids(port2) == [*range(1, 11), *range(1001, 1011)]
        assert psql(port2, "select timeline_id from pg_control_checkpoint()") == "3"
    finally:
        _stop_quietly(first)
        _stop_quietly(second)


def test_the_recoverable_window_and_a_gap_as_its_end(source: Source) -> None:
    async def windows(repo: Path) -> list[dict[str, Any]]:
        store = LocalStore(repo)
        catalog = await read_catalog(store)
        return await cluster_windows(catalog.backups, archive_for(store, source.settings))

    (window,) = anyio.run(windows, source.repo)
    assert window["system_identifier"] == source.system_identifier
    assert window["error"] is None
    assert window["gaps"] == []
    assert source.manifest.physical is not None
    assert window["earliest_recovery_time"] == source.manifest.physical.stop_time.isoformat()
    assert window["intervals"][0]["backups"] == [source.manifest.id]

    repo, _ = _copy_repository(source, "repo-gap")
    segment = _segment_after_backup(source)
    (repo / wal_record_key(source.system_identifier, segment)).unlink()  # no record: not in the archive
    (gapped,) = anyio.run(windows, repo)
    assert gapped["gaps"] == [segment.name]
    assert gapped["error"] is None


def test_the_same_restore_from_s3(source: Source, moto_server: MotoServer, bucket: str) -> None:
    """The repository copied into a moto bucket, read over HTTP: base backup, records, WAL objects."""
    client = moto_server.client()
    for path in sorted(source.repo.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"kybdr/{path.relative_to(source.repo)}", Body=path.read_bytes())
    key = Path(source.settings.encryption.key_file or "")
    config = _config(source.base, s3_repository(moto_server, bucket), key, f"{bucket}.toml")
    pgdata, port = _new_dir(source, "from-s3"), free_port()
    try:
        done = kybdr(
            config, "restore", "--physical", "--pgdata", str(pgdata), "--target-time", source.target_time, "--json",
            as_postgres=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["wal_files"] >= 2
        _chown_tree(pgdata)
        _chown_tree(Path(f"{pgdata}.wal-spool"))
        started = pg_ctl(pgdata, "-o", f"-p {port}", "-l", str(source.base / "s3.log"), "-w", "start")
        assert started.returncode == 0, started.stderr
        wait_promoted(port)
        assert ids(port) == list(range(1, 11))
    finally:
        _stop_quietly(pgdata)
