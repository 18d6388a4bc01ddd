"""``kybdr-agent key rotate`` and ``key status`` end to end: a file key replaced by a new one without rewriting data.

Real parts: PostgreSQL, moto S3 over HTTP in two buckets (the repository and the cross-region copy), the CLI as
a subprocess, killed with SIGKILL part-way through a rotation. A fault proxy slows each manifest write to about
a second, so the kill lands between two manifests by construction, not by luck.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

from kybdr_agent.backup.keys import MasterKey, parse_key_material
from kybdr_agent.postgres.cluster import Cluster
from tests.faultproxy import FaultProxy, fault
from tests.support import KYBDR, MotoServer, run_cli, unique_db, write_config

PREFIX = "kybdr"


def _key(path: Path) -> Path:
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


def _key_id(path: Path) -> str:
    return MasterKey(parse_key_material(path.read_bytes())).key_id.hex()


def _config(
    path: Path, pg: Cluster, *, endpoint: str, bucket: str, dr_bucket: str, key_file: Path, old: list[Path]
) -> Path:
    old_files = ", ".join(f'"{p}"' for p in old)
    return write_config(
        path,
        f"""[backup]
cross_region = true
cross_region_bucket = "{dr_bucket}"

[database]
dsn = "host={pg.socket_dir} port={pg.port} user=postgres"

[repository]
url = "s3://{bucket}/{PREFIX}"
endpoint_url = "{endpoint}"
region = "us-east-1"
addressing_style = "path"

[encryption]
key_file = "{key_file}"
old_key_files = [{old_files}]
""",
    )


def _manifests(s3: Any, bucket: str) -> dict[str, dict[str, Any]]:
    found = {}
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/backups/")
    for item in listing.get("Contents", []):
        if item["Key"].endswith("/manifest.json"):
            found[item["Key"]] = json.loads(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
    return found


def _data_etags(s3: Any, bucket: str) -> dict[str, str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/backups/")
    return {o["Key"]: o["ETag"] for o in listing.get("Contents", []) if o["Key"].endswith("/data")}


def _key_ids(s3: Any, *buckets: str) -> list[str]:
    return [m["encryption"]["key_id"] for b in buckets for m in _manifests(s3, b).values()]


def _cli_json(config: Path, *args: str) -> tuple[int, Any]:
    proc = run_cli(config, *args, "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _uses(report: dict[str, Any]) -> dict[str, int]:
    return {use["key"]["key_id"]: use["backups"] for use in report["keys"]}


def test_rotation_killed_midway_resumes_and_the_old_key_retires(
    pg: Cluster, tmp_path: Path, moto_server: MotoServer, bucket: str
) -> None:
    s3 = moto_server.client()
    dr_bucket = f"{bucket}-dr"
    s3.create_bucket(Bucket=dr_bucket)
    databases = [unique_db("rot") for _ in range(3)]
    for name in databases:
        pg.psql("postgres", f'create database "{name}"')
        pg.psql(name, "create table t as select g as id, md5(g::text) as v from generate_series(1, 500) g")
    old_key, new_key = _key(tmp_path / "old.key"), _key(tmp_path / "new.key")
    old_id, new_id = _key_id(old_key), _key_id(new_key)
    direct = dict(endpoint=moto_server.endpoint, bucket=bucket, dr_bucket=dr_bucket)

    # Three backups under the old key, each copied to the DR bucket.
    made_with_old = _config(tmp_path / "old.toml", pg, **direct, key_file=old_key, old=[])
    args = [arg for name in databases for arg in ("--database", name)]
    made = run_cli(made_with_old, "backup", *args)
    assert made.returncode == 0, made.stderr
    assert _key_ids(s3, bucket, dr_bucket) == [old_id] * 6
    data_before = {b: _data_etags(s3, b) for b in (bucket, dr_bucket)}
    headers_before = {k: m["stream_header"] for b in (bucket, dr_bucket) for k, m in _manifests(s3, b).items()}

    # The new key current, the old one kept; each manifest write slowed to ~1 s, killed after the first.
    with FaultProxy(moto_server.endpoint) as proxy:
        proxy.add(fault("PutObject", "throttle", every=1, where=f"/{PREFIX}/backups/", rate=2500))
        via_proxy = dict(endpoint=proxy.endpoint, bucket=bucket, dr_bucket=dr_bucket)
        rotating = _config(tmp_path / "rotating.toml", pg, **via_proxy, key_file=new_key, old=[old_key])
        proc = subprocess.Popen(
            [*KYBDR, "--config", str(rotating), "key", "rotate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while new_id not in _key_ids(s3, bucket, dr_bucket):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no manifest was re-wrapped within 60 s"
            time.sleep(0.05)
        proc.kill()
        proc.communicate()
    assert proc.returncode == -9
    after_kill = _key_ids(s3, bucket, dr_bucket)
    assert 1 <= after_kill.count(new_id) < 6
    assert set(after_kill) == {old_id, new_id}  # every manifest is whole: one key or the other

    # Run again: it finishes what the kill left, skipping what was done (idempotence: tests/unit/test_keys.py).
    resumed = _config(tmp_path / "resumed.toml", pg, **direct, key_file=new_key, old=[old_key])
    code, second = _cli_json(resumed, "key", "rotate")
    assert code == 0, second
    assert sum(len(r["rewrapped"]) for r in second["locations"]) == after_kill.count(old_id)
    assert sum(r["already_current"] for r in second["locations"]) == after_kill.count(new_id)

    # Only manifests changed: the data objects and the stream headers (which still name the old key) did not.
    assert {b: _data_etags(s3, b) for b in (bucket, dr_bucket)} == data_before
    assert {k: m["stream_header"] for b in (bucket, dr_bucket) for k, m in _manifests(s3, b).items()} == headers_before
    assert all(old_id in header for header in headers_before.values())

    # The old key retired: every backup opens with the new key alone, in both buckets, and restores.
    retired = _config(tmp_path / "retired.toml", pg, **direct, key_file=new_key, old=[])
    code, status = _cli_json(retired, "key", "status")
    assert code == 0, status
    assert [_uses(r) for r in status["locations"]] == [{new_id: 3}, {new_id: 3}]
    assert all(not r["unopened"] for r in status["locations"])
    drill = run_cli(retired, "test", "--json")
    assert drill.returncode == 0, drill.stderr
    assert sorted(d["database"] for d in json.loads(drill.stdout)["drills"]) == sorted(databases)
    new_master = MasterKey(parse_key_material(new_key.read_bytes()))
    for m in _manifests(s3, dr_bucket).values():  # the DR copies open with the new key too
        assert len(new_master.unwrap(m["encryption"]["wrapped_data_key"], m["id"])) == 32

    # And with only the retired key configured, status names every backup it can no longer open.
    only_old = _config(tmp_path / "only_old.toml", pg, **direct, key_file=old_key, old=[])
    text = run_cli(only_old, "key", "status")
    assert text.returncode == 1
    assert text.stdout.count("no configured key opens 3 backups") == 2  # in each bucket
    assert all(name in text.stdout for name in databases)
