"""Restore and validate from either region: moto over HTTP behind a fault proxy, real PostgreSQL, the CLI.

The proxy lets one bucket fail while the other answers: a region's outage is its S3 endpoint answering 503
to everything (what the SDK sees of a regional outage), so the agent must read the DR region's copy, and say
so; a DR outage leaves backups uncopied, which the backfill pass copies once the region is back.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kybdr_agent.postgres.cluster import Cluster
from tests.faultproxy import FaultProxy, fault
from tests.support import MotoServer, create_mixed_database, database_fingerprint, run_cli, unique_db, write_config


@dataclass
class World:
    config: Path
    primary: str
    dr: str
    proxy: FaultProxy
    moto: MotoServer
    database: str


@pytest.fixture
def world(pg: Cluster, moto_server: MotoServer, tmp_path: Path) -> Iterator[World]:
    primary, dr = f"kyb-prim-{secrets.token_hex(4)}", f"kyb-dr-{secrets.token_hex(4)}"
    s3 = moto_server.client("s3")
    s3.create_bucket(Bucket=primary)
    s3.create_bucket(Bucket=dr)
    key_file = tmp_path / "master.key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    key_file.chmod(0o600)
    database = unique_db("regions")
    create_mixed_database(pg, database, rows=800)
    with FaultProxy(moto_server.endpoint) as proxy:
        config = write_config(
            tmp_path / "agent.toml",
            f"""[backup]
backup_dir = "{tmp_path / "state"}"
cross_region = true
cross_region_bucket = "{dr}"
cross_region_region = "us-west-2"

[[backup.policies]]
name = "daily"
schedule = "0 2 * * *"
databases = ["{database}"]
keep_daily = 1
keep_weekly = 0
keep_monthly = 0
keep_yearly = 0
min_age = "0s"

[database]
dsn = "host={pg.socket_dir} port={pg.port} user=postgres"

[repository]
url = "s3://{primary}/kybdr"
endpoint_url = "{proxy.endpoint}"
region = "us-east-1"
addressing_style = "path"
max_attempts = 2

[encryption]
key_file = "{key_file}"
""",
        )
        yield World(config, primary, dr, proxy, moto_server, database)


def _cli(world: World, *args: str, expect: int = 0) -> tuple[Any, str]:
    proc = run_cli(world.config, "--local", *args, "--json")
    assert proc.returncode == expect, proc.stderr
    return (json.loads(proc.stdout) if proc.stdout.strip() else None), proc.stderr


def _manifest_keys(world: World, bucket: str) -> set[str]:
    listed = world.moto.client("s3").list_objects_v2(Bucket=bucket, Prefix="kybdr/backups/")
    return {o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith("/manifest.json")}


def _outage(bucket: str) -> Any:
    return fault("*", "error", every=1, where=f"/{bucket}", status=503, code="ServiceUnavailable")


def test_a_region_down_then_back_and_retention_in_both(world: World, pg: Cluster) -> None:
    first = _cli(world, "backup", "--database", world.database)[0]
    assert first["replication"]["cross_region"]["bucket"] == world.dr

    # The DR region is down: the backup is stored in the primary only, said as a failure of the copy.
    dr_down = world.proxy.add(_outage(world.dr))
    proc = run_cli(world.config, "--local", "backup", "--database", world.database)
    world.proxy.remove(dr_down)
    assert proc.returncode == 1
    assert "stored in the primary repository, but its cross-region copy failed" in proc.stderr
    listed = _cli(world, "list")[0]
    where = {m["id"]: m["locations"] for m in listed}
    assert len(where) == 2
    assert where[first["id"]] == ["primary", "dr"]
    (uncopied,) = [backup_id for backup_id, regions in where.items() if regions == ["primary"]]

    # The backfill pass copies what the outage left (the choice itself: tests/unit/test_regions.py).
    done = _cli(world, "backfill")[0]
    assert done == {"copied": [uncopied], "failed": {}, "still_missing": 0}
    assert len(_manifest_keys(world, world.dr)) == 2

    # The primary region is down: restore and validate read the DR copy, and say so.
    primary_down = world.proxy.add(_outage(world.primary))
    target = unique_db("from_dr")
    restored, stderr = _cli(world, "restore", uncopied, "--target-database", target)
    assert restored["region"] == "dr"
    assert "the primary repository could not be read" in stderr
    assert database_fingerprint(pg, target) == database_fingerprint(pg, world.database)
    checked, stderr = _cli(world, "validate", uncopied, "--level", "full")
    assert checked["ok"]
    assert checked["region"] == "dr"
    assert "using the DR region's copy" in stderr
    listed_dr, stderr = _cli(world, "list")
    assert {m["id"]: m["locations"] for m in listed_dr} == {backup_id: ["dr"] for backup_id in where}
    assert "listing the DR region's copies" in stderr
    # Asked for the primary by name, there is no fall-back: the outage is the answer.
    proc = run_cli(world.config, "--local", "validate", uncopied, "--region", "primary")
    assert proc.returncode == 1
    assert "ServiceUnavailable" in proc.stderr
    world.proxy.remove(primary_down)

    shown, _ = _cli(world, "show", first["id"], "--region", "dr")
    assert shown["locations"] == ["primary", "dr"]
    # keep_daily = 1, no minimum age: the older backup goes from both regions, manifest first, data with it.
    cleaned, _ = _cli(world, "cleanup")
    assert cleaned["deleted"] == [first["id"]]
    assert cleaned["dr"]["deleted"] == [first["id"]]
    assert cleaned["dr"]["error"] is None
    for bucket in (world.primary, world.dr):
        keys = {
            o["Key"]
            for o in world.moto.client("s3").list_objects_v2(Bucket=bucket, Prefix="kybdr/").get("Contents", [])
        }
        assert not any(first["id"] in key for key in keys), bucket
        assert any(uncopied in key for key in keys), bucket


def test_region_dr_without_a_dr_bucket_is_a_configuration_error(pg: Cluster, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "agent.toml",
        f"""[backup]
encryption = false

[database]
dsn = "host={pg.socket_dir} port={pg.port} user=postgres"

[repository]
url = "file://{tmp_path / "repo"}"
""",
    )
    proc = run_cli(config, "--local", "list", "--region", "dr")
    assert proc.returncode == 78
    assert "backup.cross_region" in proc.stderr
