"""The restore drill of a physical backup (``wal/pitr_drill.py``) with real parts: a PostgreSQL 15 cluster with
1 MiB segments streaming its WAL through ``pg_receivewal`` into the agent's archive (``WalArchive.push``, as the
stream-mode shipper does; the helpers are ``test_pitr_restore``'s), a physical base backup made by the agent
(``physical_backup_and_record``), writes after it, and the drill run as root (the server then runs as
``postgres``), the way the daemon's scheduler would call it.

What it proves:

* the drill restores to the end of the archive, the server leaves recovery on a new timeline and answers; the
  RTO is reported (and is no longer than the whole drill); nothing is left behind — no directory, no process —
  and the drilled copy archived nothing into the source's repository;
* a corrupted segment the restore needs: the drill fails with a message naming it, and leaves nothing behind;
* a drill cancelled while its server runs stops that server and removes its directory;
* run as the ``postgres`` OS user (as the daemon may be), it passes the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from kybdr_agent import app
from kybdr_agent.backup.catalog import read_catalog
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.config import AgentSettings, load_settings
from kybdr_agent.postgres.cluster import Cluster, start_cluster
from kybdr_agent.storage.local import LocalStore
from kybdr_agent.wal.names import Segment, parse_lsn
from kybdr_agent.wal.pitr_drill import DrillOptions, pitr_drill
from kybdr_agent.wal.records import wal_object_key
from tests.integration.test_pitr_restore import (
    REPO_ROOT,
    SEGMENT_SIZE,
    SYSTEM_PYTHON,
    WalFeed,
    _chown_tree,
    _config,
    _postgres,
    _shared_dir,
    archive_for,
    physical_backup,
    start_archiving,
)


@dataclass
class Source:
    base: Path
    repo: Path
    config: Path
    settings: AgentSettings
    manifest: Manifest


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    base = _shared_dir("kybdr-drill-")
    repo = base / "repo"
    repo.mkdir()
    key = base / "master.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    cluster: Cluster | None = None
    feed: WalFeed | None = None
    try:
        cluster = start_cluster(wal_segsize_mb=1)
        config, settings, feed = start_archiving(cluster, base, repo, key)
        cluster.psql("postgres", "create table t (id int primary key); insert into t select generate_series(1, 10)")
        manifest = physical_backup(feed, repo, settings)
        cluster.psql("postgres", "insert into t select generate_series(11, 20)")
        switched = cluster.psql("postgres", "select pg_walfile_name(pg_switch_wal())").strip()
        anyio.run(lambda: feed.ship_until(switched))
        feed.stop()
        cluster.stop()
        yield Source(base, repo, config, settings, manifest)
    finally:
        if feed is not None:
            feed.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _processes_under(path: Path) -> list[str]:
    """Command lines of running processes naming ``path`` (a drill's server would)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if str(path) in cmdline:
                found.append(cmdline)
    return found


def _drill(source: Source, repo: Path, scratch_root: Path) -> dict[str, Any]:
    store = LocalStore(repo)

    async def main() -> dict[str, Any]:
        manifests = (await read_catalog(store)).backups
        return await pitr_drill(
            store, manifests, app.keyring(source.settings), archive_for(store, source.settings), source.manifest,
            DrillOptions(scratch_root=scratch_root, timeout=60),
        )  # fmt: skip

    return anyio.run(main)


def _wal_objects(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in (repo / "wal").rglob("*") if p.is_file()}


def test_the_drill_restores_answers_reports_rto_and_leaves_nothing(source: Source) -> None:
    scratch_root = source.base / "drills"
    before = _wal_objects(source.repo)
    result = _drill(source, source.repo, scratch_root)
    assert result["passed"], result
    assert result.get("error") is None
    assert "cleanup_error" not in result
    assert 0 < result["rto_seconds"] <= result["seconds"]
    assert result["pg_class_count"] > 100
    assert result["timeline"] == 2  # promoted at the end of the archive
    assert result["last_transaction_time"]
    assert result["wal_files"] >= 1
    assert not Path(result["scratch_dir"]).exists()
    assert list(scratch_root.iterdir()) == []
    assert _processes_under(scratch_root) == []
    assert _wal_objects(source.repo) == before  # archive_mode off: the drilled copy archived nothing
    assert scratch_root.stat().st_uid == _postgres()[0]  # created for the server's user, who must enter it


def test_a_corrupted_segment_fails_the_drill_clearly_and_leaves_nothing(source: Source) -> None:
    repo = source.base / "repo-corrupt"
    shutil.copytree(source.repo, repo)
    _chown_tree(repo)
    info = source.manifest.physical
    assert info is not None
    needed = Segment.ending_at(parse_lsn(info.stop_lsn), 1, SEGMENT_SIZE).next()
    stored = repo / wal_object_key(info.system_identifier, needed)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x40
    stored.write_bytes(bytes(data))
    scratch_root = source.base / "drills-corrupt"
    result = _drill(source, repo, scratch_root)
    assert not result["passed"]
    assert needed.name in result["error"], result["error"]
    assert result["rto_seconds"] is None
    assert "cleanup_error" not in result
    assert list(scratch_root.iterdir()) == []
    assert _processes_under(scratch_root) == []


def test_a_drill_cancelled_while_its_server_runs_stops_it_and_removes_everything(source: Source) -> None:
    scratch_root = source.base / "drills-cancel"
    store = LocalStore(source.repo)
    seen: list[Path] = []

    async def main() -> None:
        manifests = (await read_catalog(store)).backups
        async with anyio.create_task_group() as tg:

            async def drill() -> None:
                await pitr_drill(
                    store, manifests, app.keyring(source.settings), archive_for(store, source.settings),
                    source.manifest, DrillOptions(scratch_root=scratch_root, timeout=60),
                )  # fmt: skip

            tg.start_soon(drill)
            with anyio.fail_after(60):
                while not seen:
                    seen.extend(scratch_root.glob("*/data/postmaster.pid"))
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert seen
    assert list(scratch_root.iterdir()) == []
    assert _processes_under(scratch_root) == []


def test_a_backup_without_postgresql_conf_gets_one_and_the_drill_its_own_hba(tmp_path: Path) -> None:
    """Debian keeps postgresql.conf and pg_hba.conf in /etc: the base backup has neither, the drill writes both."""
    from kybdr_agent.wal.pitr_drill import _prepare_server, _Scratch

    scratch = _Scratch(tmp_path / "pitr-x")
    scratch.pgdata.mkdir(parents=True)
    scratch.spool.mkdir()
    _prepare_server(scratch, _postgres() if os.geteuid() == 0 else None)
    assert (scratch.pgdata / "postgresql.conf").read_text().startswith("# written by the kybdr-agent drill")
    assert scratch.hba.read_text().splitlines()[-1] == "local all all trust"
    if os.geteuid() == 0:
        assert (scratch.pgdata / "postgresql.conf").stat().st_uid == _postgres()[0]


_AS_POSTGRES = """
import json, sys
from pathlib import Path
import anyio
from kybdr_agent import app
from kybdr_agent.backup.catalog import read_catalog
from kybdr_agent.config import load_settings
from kybdr_agent.storage.local import LocalStore
from kybdr_agent.wal.pitr_drill import DrillOptions, pitr_drill
from tests.integration.test_pitr_restore import archive_for

config, backup_id, scratch = sys.argv[1:4]
settings = load_settings(Path(config))
store = LocalStore(settings.repository.local_path)

async def main():
    manifests = (await read_catalog(store)).backups
    m = next(m for m in manifests if m.id == backup_id)
    return await pitr_drill(store, manifests, app.keyring(settings), archive_for(store, settings), m,
                            DrillOptions(scratch_root=Path(scratch), timeout=60))

print(json.dumps(anyio.run(main)))
"""


def test_the_drill_runs_as_the_postgres_user_too(source: Source) -> None:
    """The daemon may run as ``postgres``: the drill then starts the server as itself."""
    repo = source.base / "repo-as-postgres"
    shutil.copytree(source.repo, repo)
    _chown_tree(repo)
    key = Path(source.settings.encryption.key_file or "")
    os.chown(key, *_postgres())
    config = _config(source.base, repo, key, "as-postgres.toml")
    scratch_root = source.base / "drills-as-postgres"
    site = sysconfig.get_paths()["purelib"]
    proc = subprocess.run(
        ["runuser", "-u", "postgres", "--", "env", f"PYTHONPATH={REPO_ROOT}:{site}", str(SYSTEM_PYTHON), "-c",
         _AS_POSTGRES, str(config), source.manifest.id, str(scratch_root)],
        capture_output=True, text=True, timeout=120, check=False, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["passed"], result
    assert result["rto_seconds"] > 0
    assert list(scratch_root.iterdir()) == []
    assert _processes_under(scratch_root) == []


def test_wired_the_service_drill_of_a_physical_backup_is_a_pitr_drill(source: Source) -> None:
    """WIRED: ``BackupService.drill`` picks the newest physical backup of each cluster and drills it here."""
    from tests.support import folder_service

    backup_dir = source.base / "agent"
    backup_dir.mkdir(exist_ok=True)
    text = source.config.read_text().replace("[backup]\n", f'[backup]\nbackup_dir = "{backup_dir}"\n', 1)
    config = source.base / "wired.toml"
    config.write_text(text)
    service = folder_service(load_settings(config))
    results = anyio.run(lambda: service.drill(source.manifest.database))
    assert [r["backup_id"] for r in results] == [source.manifest.id]
    assert results[0]["kind"] == "physical"
    assert results[0]["passed"], results[0]
    assert results[0]["rto_seconds"] > 0
    assert list((backup_dir / "drills").iterdir()) == []
