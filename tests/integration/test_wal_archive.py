"""Continuous WAL archiving by the daemon, end to end with real parts: a PostgreSQL 15 cluster, the agent as a
real process running pg_receivewal on a replication slot, a folder repository and (one test) moto over HTTP.

What is proven: segments the server completes arrive in the archive, sealed, and come back byte for byte
identical to the server's own ``pg_wal`` copy; the agent killed with ``kill -9`` while segments wait in its
spool (the repository refusing writes) loses none — its pg_receivewal dies with it, the slot keeps the WAL
written meanwhile, and the restarted agent archives every segment with no gap; a corrupted object is caught by
``fetch``; a different copy of an archived segment is refused; the spool past ``max_spool_bytes`` pages
(``wal_spool_full`` to a webhook) and resolves once drained; status, health and metrics say what happens.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from kybdr_agent.backup.keys import KeyRing, load_master_key
from kybdr_agent.backup.streamfmt import Compression
from kybdr_agent.postgres.cluster import Cluster, start_cluster
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.storage.local import LocalStore
from kybdr_agent.wal.archive import WalArchive, WalConflict, WalIntegrityError
from kybdr_agent.wal.names import Segment
from kybdr_agent.wal.records import WalRecord
from tests.daemon_support import Daemon, UnixHTTPConnection, start_daemon
from tests.support import MotoServer, s3_repository

T = TypeVar("T")
SLOT = "kybdr_test"
SPOOL_BOUND = 16 << 20  # the smallest wal.max_spool_bytes: 17 one-MiB segments go over it


class Webhook:
    """A webhook endpoint in the test process: every alert the agent posts, as JSON."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        bodies = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def statuses(self, alert: str) -> list[str]:
        return [body["status"] for body in self.bodies if body["alert"] == alert]

    def wait_for(self, alert: str, status: str, agent: Daemon, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while status not in self.statuses(alert):
            assert time.monotonic() < deadline, (self.bodies, agent.log()[-3000:])
            time.sleep(0.1)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A cluster of its own: its replication slots hold WAL, which the suite's shared cluster must not keep."""
    with start_cluster(wal_segsize_mb=1) as made:
        yield made


def facts(cluster: Cluster) -> tuple[str, int]:
    row = cluster.psql(
        "postgres", "select system_identifier, bytes_per_wal_segment from pg_control_system(), pg_control_init()"
    )
    system_identifier, size = row.strip().split("|")
    return system_identifier, int(size)


def config(
    tmp_path: Path, cluster: Cluster, key_file: Path, repository: str, slot: str = SLOT, extra: str = ""
) -> tuple[Path, Path]:
    socket_path = tmp_path / "control.sock"
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[backup]\nbackup_dir = "{tmp_path / "state"}"\n\n'
        f'[database]\ndsn = "host={cluster.socket_dir} port={cluster.port} user=postgres"\n\n'
        f'[encryption]\nkey_file = "{key_file}"\n\n[repository]\n{repository}\n\n'
        f'[control]\nsocket = "{socket_path}"\n\n[drill]\nschedule = ""\n\n[daemon]\nshutdown_grace_seconds = 2\n\n'
        f'[wal]\nenabled = true\nmode = "stream"\nslot_name = "{slot}"\nspool_dir = "{tmp_path / "spool"}"\n'
        f"max_partial_age = 1\nupload_concurrency = 2\n{extra}"
    )
    return path, socket_path


def switch(cluster: Cluster, times: int) -> str:
    """Writes, then ``pg_switch_wal()``, ``times`` times; the name of the segment being written after that."""
    for _ in range(times):
        cluster.psql(
            "postgres",
            "create table if not exists t (id bigserial, v text);"
            "insert into t (v) select repeat('x', 200) from generate_series(1, 500);"
            "select pg_switch_wal();",
        )
    cluster.psql("postgres", "insert into t (v) values ('after the switches')")
    return cluster.psql("postgres", "select pg_walfile_name(pg_current_wal_insert_lsn())").strip()


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn)


def archive(store: BlobStore, cluster: Cluster, key_file: Path) -> WalArchive:
    system_identifier, size = facts(cluster)
    return WalArchive(
        store,
        system_identifier=system_identifier,
        segment_size=size,
        keyring=KeyRing(load_master_key(key_file)),
        compression=Compression.ZSTD,
        compression_level=None,
        frame_size=1 << 20,
    )


def wait_for_segments(wal: WalArchive, names: list[str], agent: Daemon, timeout: float = 30) -> list[WalRecord]:
    deadline = time.monotonic() + timeout
    while True:
        records = run(wal.records)
        have = {r.file_name for r in records}
        if all(name in have for name in names):
            return records
        if time.monotonic() > deadline:
            status = agent.request("GET", "/v1/wal/status").body
            raise AssertionError(f"missing {sorted(set(names) - have)}; have {sorted(have)}\n{status}\n{agent.log()}")
        time.sleep(0.2)


def segment_names(last: str, size: int, count: int) -> list[str]:
    end = Segment.parse(last, size)
    return [Segment(end.timeline, segno, size).name for segno in range(end.segno - count, end.segno)]


def slot_active(cluster: Cluster, slot: str) -> bool:
    return (
        cluster.psql("postgres", f"select active from pg_replication_slots where slot_name = '{slot}'").strip() == "t"
    )


def test_stream_mode_survives_kill_9_with_a_full_spool(
    cluster: Cluster, tmp_path: Path, key_file: Path, webhook: Webhook
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "wal").write_text("a file where the archive's folder goes: every WAL upload fails\n")
    extra = f'max_spool_bytes = {SPOOL_BOUND}\n\n[notify]\nwebhook_url = "{webhook.url}"\n'
    path, socket_path = config(tmp_path, cluster, key_file, f'url = "file://{repo}"', extra=extra)
    agent = start_daemon(path, socket_path, tmp_path)
    _, size = facts(cluster)
    try:
        deadline = time.monotonic() + 20
        while not slot_active(cluster, SLOT):
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
        current = switch(cluster, 17)
        spool = tmp_path / "spool"
        waiting = segment_names(current, size, 17)
        deadline = time.monotonic() + 20
        while not all((spool / name).exists() for name in waiting):
            assert time.monotonic() < deadline, (current, waiting, sorted(os.listdir(spool)), agent.log()[-3000:])
            time.sleep(0.1)
        status = agent.request("GET", "/v1/wal/status")
        assert status.status == 200
        assert status.body["mode"] == "stream"
        assert status.body["receiver"]["running"]
        assert "wal" in (status.body["shipper"]["last_error"] or "")
        webhook.wait_for("wal_spool_full", "firing", agent)  # unarchived WAL past max_spool_bytes
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(timeout=10)
    except BaseException:
        agent.stop()
        raise
    deadline = time.monotonic() + 10
    while slot_active(cluster, SLOT):  # pg_receivewal died with the agent (parent-death signal)
        assert time.monotonic() < deadline, "pg_receivewal outlived the agent and still holds the slot"
        time.sleep(0.1)
    current = switch(cluster, 2)  # written while no agent runs: the slot keeps it on the server
    (repo / "wal").unlink()
    agent = start_daemon(path, socket_path, tmp_path)
    try:
        wal = archive(LocalStore(repo), cluster, key_file)
        expected = segment_names(current, size, 19)
        records = wait_for_segments(wal, expected, agent)
        segnos = sorted(r.archived_segment().segment.segno for r in records if not r.partial)
        assert segnos == list(range(segnos[0], segnos[-1] + 1)), "a gap in the archive"
        wait_for_segments(wal, [current + ".partial"], agent)

        # Byte for byte the server's own copy, every layer verified on the way.
        name = expected[-1]
        record = run(lambda: wal.stat(name, 1))
        assert record is not None
        assert record.source == "stream"
        assert record.encryption.cipher == "aes-256-gcm"
        assert record.commits is not None
        assert record.commits.count >= 1  # the inserts' commits, read with pg_waldump
        run(lambda: wal.fetch(record, tmp_path / "fetched"))
        server_copy = (cluster.data_dir / "pg_wal" / name).read_bytes()
        assert (tmp_path / "fetched").read_bytes() == server_copy

        # A different copy of an archived segment is refused; the archive keeps its own.
        tampered = bytearray(server_copy)
        tampered[4096] ^= 0xFF
        with pytest.raises(WalConflict):
            run(lambda: wal.push(name, bytes(tampered), source="archive_command"))

        # A corrupted object never reaches a destination.
        stored = repo / record.object_key
        raw = bytearray(stored.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        stored.write_bytes(bytes(raw))
        with pytest.raises(WalIntegrityError, match=name):
            run(lambda: wal.fetch(record, tmp_path / "corrupt"))
        assert not (tmp_path / "corrupt").exists()

        webhook.wait_for("wal_spool_full", "resolved", agent)  # the new agent found it over, then drained it
        assert webhook.statuses("wal_spool_full") == ["firing", "firing", "resolved"]
        health = agent.request("GET", "/healthz").body
        assert health["components"]["wal"] == "ok", health
        conn = UnixHTTPConnection(str(socket_path))
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        conn.close()
        assert "kybdr_wal_files_shipped_total" in metrics
        assert "kybdr_wal_slot_retained_bytes" in metrics
    finally:
        code = agent.stop()
    assert code == 0, agent.log()
    assert not slot_active(cluster, SLOT)


def test_stream_mode_to_s3(
    cluster: Cluster, tmp_path: Path, key_file: Path, moto_server: MotoServer, bucket: str
) -> None:
    path, socket_path = config(tmp_path, cluster, key_file, s3_repository(moto_server, bucket), slot="kybdr_s3")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    agent = start_daemon(path, socket_path, tmp_path, env=env)
    _, size = facts(cluster)
    try:
        deadline = time.monotonic() + 20
        while not slot_active(cluster, "kybdr_s3"):
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
        current = switch(cluster, 2)
        expected = segment_names(current, size, 2)

        async def check() -> bytes:
            from kybdr_agent.storage.s3 import S3Options, S3Store

            store = await S3Store.open(
                S3Options(
                    bucket=bucket,
                    prefix="kybdr",
                    region="us-east-1",
                    endpoint_url=moto_server.endpoint,
                    addressing_style="path",
                )
            )
            try:
                wal = archive(store, cluster, key_file)
                deadline = time.monotonic() + 30
                while True:
                    have = {r.file_name for r in await wal.records()}
                    if all(name in have for name in expected):
                        break
                    assert time.monotonic() < deadline, (have, agent.log())
                    await anyio.sleep(0.2)
                record = await wal.stat(expected[-1], 1)
                assert record is not None
                await wal.fetch(record, tmp_path / "from-s3")
                return (tmp_path / "from-s3").read_bytes()
            finally:
                await store.aclose()

        fetched = run(check)
        assert fetched == (cluster.data_dir / "pg_wal" / expected[-1]).read_bytes()
        status = agent.request("GET", "/v1/wal/status").body
        assert status["receiver"]["slot"] == "kybdr_s3"
    finally:
        code = agent.stop()
    assert code == 0, agent.log()
    cluster.psql("postgres", "select pg_drop_replication_slot('kybdr_s3')")


def test_archive_command_mode_ships_what_the_push_route_spools(
    cluster: Cluster, tmp_path: Path, key_file: Path
) -> None:
    """archive_command mode: no receiver; ``POST /v1/wal/push`` (what ``kybdr-agent wal-push %p`` sends) puts a
    file in the spool, the shipper archives it as ``archive_command`` and empties the spool."""
    repo = tmp_path / "repo"
    path, socket_path = config(tmp_path, cluster, key_file, f'url = "file://{repo}"')
    path.write_text(path.read_text().replace('mode = "stream"', 'mode = "archive_command"'))
    agent = start_daemon(path, socket_path, tmp_path)
    _, size = facts(cluster)
    try:
        name = segment_names(switch(cluster, 1), size, 1)[0]
        data = (cluster.data_dir / "pg_wal" / name).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        headers = {"Content-Type": "application/octet-stream", "X-Content-SHA256": digest}
        answer = agent.request("POST", f"/v1/wal/push?name={name}", raw=data, headers=headers)
        assert answer.status == 200, answer.body
        wal = archive(LocalStore(repo), cluster, key_file)
        (record,) = wait_for_segments(wal, [name], agent)
        assert record.source == "archive_command"
        run(lambda: wal.fetch(record, tmp_path / "fetched"))
        assert (tmp_path / "fetched").read_bytes() == data
        deadline = time.monotonic() + 10
        while (tmp_path / "spool" / name).exists():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
        status = agent.request("GET", "/v1/wal/status").body
        assert status["mode"] == "archive_command"
        assert status["receiver"] is None
        assert status["shipper"]["files_shipped"] == 1
    finally:
        code = agent.stop()
    assert code == 0, agent.log()
