"""Backup → list/show → validate → restore round trips through the real CLI, to a folder and to S3 (moto),
compared table by table with the source.

Every combination of compression and encryption goes through a folder. The codec path (compress, seal,
hash; open, decompress) does not depend on the store, so S3 runs two of them — the default (zstd, AES) and
neither — plus a multipart upload of many parts. Listing, showing and a quick validation read manifests and
object headers, not the data, so they run for one combination per store rather than for every codec.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kybdr_agent.postgres.cluster import Cluster
from tests.support import (
    MotoServer,
    agent_config,
    cli_json,
    create_incompressible_database,
    create_mixed_database,
    database_fingerprint,
    run_cli,
    s3_repository,
    unique_db,
)

COMBINATIONS = [
    pytest.param(compression, encrypted, id=f"{compression or 'plain'}-{'aes' if encrypted else 'clear'}")
    for compression in ("zstd", "gzip", None)
    for encrypted in (True, False)
]
# The codec is store-independent (covered above through a folder): S3 needs the default and the bare path.
S3_COMBINATIONS = [param for param in COMBINATIONS if param.id in ("zstd-aes", "plain-clear")]


@pytest.fixture(scope="module")
def source_db(pg: Cluster) -> str:
    name = unique_db("src")
    create_mixed_database(pg, name, rows=3000)
    return name


@pytest.fixture(scope="module")
def source_fingerprint(pg: Cluster, source_db: str) -> dict[str, str]:
    return database_fingerprint(pg, source_db)


def _round_trip(
    pg: Cluster, config: Path, source_db: str, expected: dict[str, str], *, catalogue: bool
) -> dict[str, object]:
    """Back up, validate in full, restore and compare; with ``catalogue``, also list, show and validate quick."""
    made = cli_json(config, "backup", "--database", source_db)
    assert made["database"] == source_db
    assert made["status"] == "completed"
    assert made["stored_bytes"] > 0

    if catalogue:
        listed = cli_json(config, "list", "--database", source_db)
        assert [m["id"] for m in listed] == [made["id"]]
        assert {"id", "database", "status", "finished_at"} <= set(listed[0])

        shown = cli_json(config, "show", made["id"])
        assert shown["sha256"] == made["sha256"]

    for level in ("quick", "full") if catalogue else ("full",):
        check = run_cli(config, "validate", made["id"], "--level", level)
        assert check.returncode == 0, check.stdout + check.stderr

    target = unique_db("restored")
    restored = run_cli(config, "restore", made["id"], "--target-database", target)
    assert restored.returncode == 0, restored.stderr
    assert database_fingerprint(pg, target) == expected
    pg.psql("postgres", f'drop database "{target}"')
    return made


@pytest.mark.parametrize(("compression", "encrypted"), COMBINATIONS)
def test_round_trip_folder(
    pg: Cluster,
    tmp_path: Path,
    key_file: Path,
    source_db: str,
    source_fingerprint: dict[str, str],
    compression: str | None,
    encrypted: bool,
) -> None:
    repo = tmp_path / "repo"
    config = agent_config(
        tmp_path,
        pg,
        repository=f'url = "file://{repo}"',
        key_file=key_file if encrypted else None,
        compression=compression,
    )
    made = _round_trip(pg, config, source_db, source_fingerprint, catalogue=(compression, encrypted) == ("zstd", True))
    assert made["compression"] == (compression or "none")
    assert made["encryption"]["cipher"] == ("aes-256-gcm" if encrypted else "none")
    stored = repo / made["object_key"]  # type: ignore[operator]
    assert stored.stat().st_size == made["stored_bytes"]
    # Nothing but the data object, the globals object and the manifest; no temp files left behind.
    assert sorted(p.name for p in stored.parent.iterdir()) == ["data", "globals", "manifest.json"]


@pytest.mark.parametrize(("compression", "encrypted"), S3_COMBINATIONS)
def test_round_trip_s3(
    pg: Cluster,
    tmp_path: Path,
    key_file: Path,
    moto_server: MotoServer,
    bucket: str,
    source_db: str,
    source_fingerprint: dict[str, str],
    compression: str | None,
    encrypted: bool,
) -> None:
    config = agent_config(
        tmp_path,
        pg,
        repository=s3_repository(moto_server, bucket),
        key_file=key_file if encrypted else None,
        compression=compression,
    )
    made = _round_trip(pg, config, source_db, source_fingerprint, catalogue=encrypted)
    assert made["compression"] == (compression or "none")
    s3 = moto_server.client()
    head = s3.head_object(Bucket=bucket, Key=f"kybdr/{made['object_key']}")
    assert head["ContentLength"] == made["stored_bytes"]
    assert made["checksum_algorithm"] == "SHA256"
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_s3_multipart_with_many_parts_and_when_required_checksums(
    pg: Cluster, tmp_path: Path, key_file: Path, moto_server: MotoServer, bucket: str
) -> None:
    """Incompressible data over several 5 MiB parts, uploaded 3 at a time, without additional checksums."""
    name = unique_db("parts")
    create_incompressible_database(pg, name, megabytes=16)  # stored ~16.2 MiB: four parts
    repo = s3_repository(
        moto_server, bucket, extra='checksums = "when_required"\nupload_concurrency = 3\npart_size_mib = 5\n'
    )
    config = agent_config(tmp_path, pg, repository=repo, key_file=key_file)
    made = cli_json(config, "backup", "--database", name)
    assert made["stored_bytes"] > 15 * 2**20
    assert made["part_count"] >= 4
    assert made["checksum_algorithm"] is None
    assert sum(run["size"] * run["count"] for run in made["parts"]) == made["stored_bytes"]
    check = run_cli(config, "validate", made["id"], "--level", "full")
    assert check.returncode == 0, check.stderr
    target = unique_db("parts_restored")
    assert run_cli(config, "restore", made["id"], "--target-database", target).returncode == 0
    assert database_fingerprint(pg, target) == database_fingerprint(pg, name)
