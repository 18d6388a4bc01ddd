"""The sweep judges leftovers by their lease, not by their age, in a real S3 (moto) and a real folder.

moto reports every open multipart upload as initiated in 2010, so an age-based sweep tested only against
moto would abort fresh uploads at once and prove nothing: here the uploads carry leases whose owners are
alive or dead, and what moto says about their age cannot change the verdict. The leaseless grace is tested
with an injected clock.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from kybdr_agent.backup.lease import Lease, Owner, this_process
from kybdr_agent.backup.service import BackupService
from kybdr_agent.config import load_settings
from kybdr_agent.postgres.cluster import Cluster
from tests.faults.report import FaultTally
from tests.support import MotoServer, agent_config, folder_service, run_cli, s3_repository

ID_LIVE = "20261201T100000Z-11111111"
ID_DEAD = "20261201T100000Z-22222222"
ID_REMOTE_FRESH = "20261201T100000Z-33333333"
ID_REMOTE_STALE = "20261201T100000Z-44444444"
ID_LEASELESS = "20261201T100000Z-55555555"


def _lease(backup_id: str, owner: Owner, renewed: datetime) -> bytes:
    return Lease(backup_id, "app", owner, renewed - timedelta(minutes=1), renewed, 300.0).to_json()


def test_s3_sweep_aborts_dead_backups_uploads_at_once_and_never_a_live_ones(
    pg: Cluster, tmp_path: Path, key_file: Path, moto_server: MotoServer, bucket: str
) -> None:
    config = agent_config(
        tmp_path,
        pg,
        repository=s3_repository(moto_server, bucket),
        key_file=key_file,
        extra='[daemon]\nsweep_older_than = "0s"\n',
    )
    s3 = moto_server.client()
    me = this_process()
    now = datetime.now(UTC)
    owners = {
        ID_LIVE: (me, now - timedelta(days=1)),  # alive: this test's own process, however old the renewal
        ID_DEAD: (Owner(me.host, me.boot_id, me.pid, me.pid_start + 1), now),  # a recycled pid: dead
        ID_REMOTE_FRESH: (Owner("elsewhere:host", "boot", 1, 1), now),  # another host, within its ttl
        ID_REMOTE_STALE: (Owner("elsewhere:host", "boot", 1, 1), now - timedelta(hours=1)),
    }
    for backup_id, (owner, renewed) in owners.items():
        prefix = f"kybdr/backups/app/{backup_id}"
        s3.put_object(Bucket=bucket, Key=f"{prefix}/lease.json", Body=_lease(backup_id, owner, renewed))
        s3.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/data")
    s3.put_object(Bucket=bucket, Key=f"kybdr/backups/app/{ID_LEASELESS}/data", Body=b"half")

    listed = run_cli(config, "list", "--json")  # every one-shot command sweeps first
    assert listed.returncode == 0, listed.stderr

    open_uploads = {u["Key"].split("/")[3] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    tally = FaultTally(fault="sweep: dead/live leases on open S3 uploads", injected=5, attempted=0)
    tally.left_behind = len(open_uploads & {ID_DEAD, ID_REMOTE_STALE}) + sum(
        1 for k in keys if ID_DEAD in k or ID_REMOTE_STALE in k or ID_LEASELESS in k
    )
    tally.assert_clean()
    assert open_uploads == {ID_LIVE, ID_REMOTE_FRESH}  # the live ones are untouched
    assert f"kybdr/backups/app/{ID_LIVE}/lease.json" in keys
    for backup_id in (ID_LIVE, ID_REMOTE_FRESH):
        s3.abort_multipart_upload(
            Bucket=bucket,
            Key=f"kybdr/backups/app/{backup_id}/data",
            UploadId=next(
                u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket)["Uploads"] if backup_id in u["Key"]
            ),
        )


def test_folder_sweep_leaves_no_temp_file_lease_or_empty_folder(pg: Cluster, tmp_path: Path, key_file: Path) -> None:
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=key_file)
    me = this_process()
    dead = Owner(me.host, me.boot_id, me.pid, me.pid_start + 1)
    folder = repo / "backups" / "app" / ID_DEAD
    folder.mkdir(parents=True)
    (folder / ".kybdr-tmp-data.abcdef").write_bytes(b"x" * 1000)
    (folder / "lease.json").write_bytes(_lease(ID_DEAD, dead, datetime.now(UTC)))
    listed = run_cli(config, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    tally = FaultTally(fault="sweep: killed backup's temp file in a folder", injected=1, attempted=0)
    tally.left_behind = sum(1 for _ in (repo / "backups").rglob("*")) if (repo / "backups").exists() else 0
    tally.assert_clean()


@pytest.mark.anyio
async def test_leaseless_leftovers_wait_the_grace_by_an_injected_clock(
    pg: Cluster, tmp_path: Path, key_file: Path
) -> None:
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=key_file)
    orphan = repo / "backups" / "app" / ID_LEASELESS / "data"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a backup")
    written = datetime.fromtimestamp(orphan.stat().st_mtime, UTC)
    settings = load_settings(config)

    def service_at(moment: datetime) -> BackupService:
        return folder_service(settings, clock=lambda: moment)

    early = await service_at(written + timedelta(minutes=59)).sweep(timedelta(hours=1))
    assert early["waiting_for_grace"] == [f"backups/app/{ID_LEASELESS}"]
    assert orphan.exists()
    late = await service_at(written + timedelta(hours=1, seconds=1)).sweep(timedelta(hours=1))
    assert late["removed_orphans"] == [f"backups/app/{ID_LEASELESS}/data"]
    assert not (repo / "backups").exists() or not any((repo / "backups").rglob("*"))
    await anyio.sleep(0)
    assert os.path.isdir(repo) or not repo.exists()
