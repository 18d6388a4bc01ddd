"""Physical base backups end to end with real parts: a PostgreSQL 15 cluster (1 MiB WAL segments) archiving its
WAL through the agent as a real process (``[wal]`` stream mode: pg_receivewal on a slot), a folder repository,
the CLI as a subprocess.

What is proven: ``backup --physical`` through the daemon records the cluster's system identifier (as
``pg_control_system()`` says), timeline 1 and start/stop LSNs that parse and agree with the tar's own
``backup_label``; the stored object decrypts to a tar that ``tar`` extracts into a data directory; it is
recorded only once the WAL from start to stop is in the archive; ``validate --level full`` reads it all and the
WAL it needs, and fails — as corrupt — when one of those segments is damaged or gone; a pg_basebackup killed
during the backup, or one that fails (its replication connection refused), leaves no manifest, object or
lease; without WAL archiving, or with a role that may not replicate, the backup is refused before anything is
stored, saying what to change; a ``kind = "physical"`` policy's slot makes a base backup that retention judges
by that policy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from kybdr_agent.backup.decode import stream_backup
from kybdr_agent.backup.keys import KeyRing, load_master_key
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.config import load_settings
from kybdr_agent.jobs import JobStatus
from kybdr_agent.postgres.cluster import Cluster, start_cluster
from kybdr_agent.storage.local import LocalStore
from kybdr_agent.wal.names import parse_lsn
from tests.component.harness import ManualClock, running_agent
from tests.daemon_support import Daemon, start_daemon
from tests.faults.fault_support import tool_children
from tests.support import KYBDR, run_cli

SLOT = "kybdr_b1"
MIB = 1 << 20


@dataclass
class Setup:
    cluster: Cluster
    agent: Daemon
    config: Path
    repo: Path
    key_file: Path
    workdir: Path


def _config(workdir: Path, cluster: Cluster, repo: Path, key_file: Path, *, user: str = "postgres", wal: bool) -> Path:
    name = f"agent-{user}-{'wal' if wal else 'nowal'}.toml"
    text = (
        f'[backup]\nbackup_dir = "{workdir / ("state-" + name)}"\n\n'
        f'[database]\ndsn = "host={cluster.socket_dir} port={cluster.port} user={user}"\n\n'
        f'[encryption]\nkey_file = "{key_file}"\n\n[repository]\nurl = "file://{repo}"\n\n'
        f'[control]\nsocket = "{workdir / "control.sock"}"\n\n[drill]\nschedule = ""\n\n'
        "[daemon]\nshutdown_grace_seconds = 2\n"
    )
    if wal:
        text += (
            f'\n[wal]\nenabled = true\nmode = "stream"\nslot_name = "{SLOT}"\nspool_dir = "{workdir / "spool"}"\n'
            "max_partial_age = 1\nupload_concurrency = 2\n"
        )
    path = workdir / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A cluster of its own (its slot holds WAL) archiving through one agent for the whole module."""
    workdir = tmp_path_factory.mktemp("physical")
    key_file = workdir / "master.key"
    key_file.write_text("11" * 32 + "\n")
    key_file.chmod(0o600)
    repo = workdir / "repo"
    repo.mkdir()
    with start_cluster(wal_segsize_mb=1) as cluster:
        config = _config(workdir, cluster, repo, key_file, wal=True)
        agent = start_daemon(config, workdir / "control.sock", workdir)
        try:
            deadline = time.monotonic() + 20
            while cluster.psql("postgres", f"select active from pg_replication_slots where slot_name = '{SLOT}'") != (
                "t\n"
            ):
                assert time.monotonic() < deadline, agent.log()
                time.sleep(0.1)
            yield Setup(cluster, agent, config, repo, key_file, workdir)
        finally:
            agent.stop()


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc: subprocess.CompletedProcess[str] = run_cli(config, *args, timeout=120)
    return proc


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _stored(repo: Path) -> set[str]:
    """Every object under backups/ (manifests, data, leases)."""
    return {str(p.relative_to(repo)) for p in (repo / "backups").rglob("*") if p.is_file()}


def _basebackups(pid: int) -> list[int]:
    """The agent's pg_basebackup children taking a backup (not ``pg_basebackup --version``)."""
    return [
        child
        for child in tool_children(pid, "pg_basebackup")
        if b"-Ft" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
    ]


def _decrypt(setup: Setup, m: Manifest, dest: Path) -> None:
    keyring = KeyRing(load_master_key(setup.key_file))
    store = LocalStore(setup.repo)

    async def main() -> None:
        with dest.open("wb") as out:

            async def sink(chunk: bytes) -> None:
                out.write(chunk)

            await stream_backup(lambda: store.read(m.object_key), m, keyring, sink)

    anyio.run(main)


def test_physical_backup_through_the_daemon_validates_with_its_wal(setup: Setup, tmp_path: Path) -> None:
    cluster = setup.cluster
    cluster.psql(
        "postgres",
        "create table kyb (id int primary key, v text); insert into kyb select g, 'x' from generate_series(1, 1000) g",
    )
    made = _json(_cli(setup.config, "backup", "--physical", "--json"))
    assert made.pop("part_count") == 0
    m = Manifest.model_validate(made)
    info = m.physical
    assert info is not None
    assert m.kind == "physical"
    sysid = cluster.psql("postgres", "select system_identifier from pg_control_system()").strip()
    assert info.system_identifier == sysid
    assert m.database == f"@cluster-{sysid}"
    assert info.timeline == 1
    assert (
        parse_lsn(info.start_lsn)
        < parse_lsn(info.stop_lsn)
        <= parse_lsn(cluster.psql("postgres", "select pg_current_wal_lsn()").strip())
    )
    assert info.wal_segment_size == MIB
    assert info.server_version_num // 10000 == 15
    assert info.tar_bytes == m.dump_bytes > 10 * MIB
    assert m.started_at - timedelta(seconds=5) <= info.stop_time <= m.finished_at + timedelta(seconds=5)
    assert m.encryption.cipher == "aes-256-gcm"
    assert m.labels == ["manual"]

    listed = _json(_cli(setup.config, "list", "--json"))
    assert [(b["id"], b["kind"]) for b in listed] == [(m.id, "physical")]

    # The stored object opens to the tar pg_basebackup wrote: a data directory with its backup_label.
    tar_path = tmp_path / "base.tar"
    _decrypt(setup, m, tar_path)
    with tarfile.open(tar_path) as tar:
        tar.extractall(tmp_path / "pgdata", filter="data")
    label = (tmp_path / "pgdata" / "backup_label").read_text()
    assert f"START WAL LOCATION: {info.start_lsn} " in label
    assert f"LABEL: kybdr-agent {m.id}\n" in label
    assert "START TIMELINE: 1\n" in label
    assert (tmp_path / "pgdata" / "PG_VERSION").read_text() == "15\n"
    assert (tmp_path / "pgdata" / "global" / "pg_control").stat().st_size == 8192

    full = _json(_cli(setup.config, "validate", m.id, "--level", "full", "--json"))
    assert full["ok"], full
    wal = full["wal"]
    first = wal["consistency"][0]
    assert first.startswith("00000001")
    assert wal["timeline"] == 1
    assert parse_lsn(wal["end_lsn"]) >= parse_lsn(info.stop_lsn)
    assert wal["gap"] is None
    assert datetime.fromisoformat(wal["earliest_recovery_time"]) == info.stop_time
    assert any("the WAL needed for consistency" in check and "verified end to end" in check for check in full["checks"])

    # A damaged segment the backup needs: full validation finds it (quick only sees that its record is there).
    segment = setup.repo / "wal" / sysid / "00000001" / first
    good = segment.read_bytes()
    segment.write_bytes(good[:-100] + bytes(b ^ 0x5A for b in good[-100:]))
    try:
        damaged = _cli(setup.config, "validate", m.id, "--level", "full", "--json")
        assert damaged.returncode == 1
        result = json.loads(damaged.stdout)
        assert result["corrupt"], result
        assert first in result["error"]
        assert _json(_cli(setup.config, "validate", m.id, "--json"))["ok"]
    finally:
        segment.write_bytes(good)
    # A segment the backup needs that is gone: even quick validation says the backup cannot be restored.
    record = segment.with_name(first + ".json")
    record.rename(tmp_path / "record.json")
    try:
        missing = _cli(setup.config, "validate", m.id, "--json")
        assert missing.returncode == 1
        result = json.loads(missing.stdout)
        assert result["corrupt"], result
        assert f"WAL segment {first}" in result["error"]
        assert "cannot be restored" in result["error"]
    finally:
        (tmp_path / "record.json").rename(record)
    assert _json(_cli(setup.config, "validate", m.id, "--level", "full", "--json"))["ok"]


def test_a_failing_pg_basebackup_or_a_refused_backup_leaves_nothing(setup: Setup) -> None:
    cluster = setup.cluster
    before = _stored(setup.repo)
    # pg_basebackup killed during the backup, through the daemon: held at its checkpoint (the server's
    # checkpointer stopped for the moment), so the kill lands while it runs, whatever the machine's speed.
    checkpointer = int(cluster.psql("postgres", "select pid from pg_stat_activity where backend_type = 'checkpointer'"))
    os.kill(checkpointer, signal.SIGSTOP)
    try:
        running = subprocess.Popen(
            [*KYBDR, "--config", str(setup.config), "backup", "--physical"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while not (children := _basebackups(setup.agent.process.pid)):
            assert time.monotonic() < deadline, setup.agent.log()
            time.sleep(0.02)
        os.kill(children[0], signal.SIGKILL)
        _, killed = running.communicate(timeout=60)
    finally:
        os.kill(checkpointer, signal.SIGCONT)
    assert running.returncode == 1
    assert "pg_basebackup was killed by signal 9" in killed
    assert _stored(setup.repo) == before  # no manifest, no data object, no lease
    # A role whose replication connections pg_hba.conf refuses: the agent's checks pass (it may replicate, its
    # SQL session is allowed), pg_basebackup's own connection fails.
    cluster.psql("postgres", "create role refused login replication; create role plain login")
    hba = cluster.data_dir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("local replication refused reject\n" + original)
    cluster.psql("postgres", "select pg_reload_conf()")
    try:
        failed = _cli(
            _config(setup.workdir, cluster, setup.repo, setup.key_file, user="refused", wal=True),
            "--local",
            "backup",
            "--physical",
        )
    finally:
        hba.write_text(original)
        cluster.psql("postgres", "select pg_reload_conf()")
    assert failed.returncode == 1
    assert "pg_basebackup" in failed.stderr
    assert "refused" in failed.stderr  # pg_hba.conf's rejection, from pg_basebackup's own stderr
    assert _stored(setup.repo) == before

    # Refused before anything starts, saying what to change.
    nowal = _cli(
        _config(setup.workdir, cluster, setup.repo, setup.key_file, wal=False), "--local", "backup", "--physical"
    )
    assert nowal.returncode == 1
    assert "[wal] enabled = true" in nowal.stderr
    plain = _cli(
        _config(setup.workdir, cluster, setup.repo, setup.key_file, user="plain", wal=True),
        "--local",
        "backup",
        "--physical",
    )
    assert plain.returncode == 1
    assert "lacks the REPLICATION attribute" in plain.stderr
    usage = _cli(setup.config, "backup", "--physical", "--database", "postgres")
    assert usage.returncode == 2
    assert _stored(setup.repo) == before


def test_a_physical_policy_fires_a_base_backup_on_its_schedule_and_keeps_it(setup: Setup) -> None:
    """The scheduler over the composition root's own service (tests/component/harness.py), its clock moved by
    hand: a ``kind = "physical"`` policy's slot submits a base backup of the cluster, labelled with the policy,
    and retention judges the cluster's physical backups by that policy."""
    text = setup.config.read_text().replace("state-agent-postgres-wal.toml", "state-scheduled")
    text = text.replace(
        "[database]",
        '[[backup.policies]]\nname = "base"\nkind = "physical"\nschedule = "0 1 * * *"\nkeep_daily = 3\n\n[database]',
    )
    path = setup.workdir / "scheduled.toml"
    path.write_text(text)
    settings = load_settings(path)
    clock = ManualClock(datetime.now(UTC))

    async def main() -> None:
        async with running_agent(settings, clock) as agent:
            scheduler = agent.component(clock).scheduler
            await scheduler.tick()  # records the slot
            assert agent.jobs.all() == []
            clock.advance(timedelta(days=1))
            await scheduler.tick()
            [job] = agent.jobs.all()
            assert (job.kind, job.database) == ("backup", "@cluster")
            assert job.params["policy"] == "base"
            assert job.params["physical"] is True
            assert await agent.jobs.wait_idle(60)
            assert job.status is JobStatus.SUCCEEDED, job.error
            assert job.result["kind"] == "physical"
            assert job.result["labels"] == ["base"]
            plan = await agent.service.cleanup(dry_run=True)
            assert job.result["id"] in plan["kept"]
            assert plan["reasons"][job.result["id"]].startswith("base: ")

    anyio.run(main)
