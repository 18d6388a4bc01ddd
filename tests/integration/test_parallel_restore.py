"""``restore --jobs N``: the data streamed, then post-data by pg_restore -j N from the spooled table of
contents, equal to the source (indexes, constraints, views, large objects), and the spool never outlives the
restore — nor does a refused or failed one leave a scratch database, a target or anything on disk."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from kybdr_agent.postgres.cluster import Cluster
from tests.support import agent_config, cli_json, create_mixed_database, database_fingerprint, run_cli, unique_db


def _config(tmp: Path, pg: Cluster, repo: Path, key: Path, spool: Path, frame_size_kib: int | None = None) -> Path:
    return agent_config(
        tmp,
        pg,
        repository=f'url = "file://{repo}"',
        key_file=key,
        frame_size_kib=frame_size_kib,
        extra=f'\n[restore]\nspool_dir = "{spool}"\n',
    )


@pytest.fixture(scope="module")
def setup(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, Path]:
    """One backup of a small mixed database: (its config, the backup id, the source database, the key)."""
    tmp = tmp_path_factory.mktemp("parallel-restore")
    key = tmp / "master.key"
    key.write_text("cd" * 32 + "\n")
    key.chmod(0o600)
    source = unique_db("par")
    create_mixed_database(pg, source, rows=800)
    # Small frames, so the archive spans several and a corrupt last one is met after some were spooled.
    config = _config(tmp, pg, tmp / "repo", key, tmp / "spool", frame_size_kib=16)
    made = cli_json(config, "backup", "--database", source)
    return config, str(made["id"]), source, key


def _databases(pg: Cluster) -> set[str]:
    return set(pg.psql("postgres", "select datname from pg_database").split())


def test_parallel_restore_equals_the_source_and_leaves_no_spool(
    pg: Cluster, setup: tuple[Path, str, str, Path]
) -> None:
    config, backup_id, source, _key = setup
    target = unique_db("par_to")
    result = cli_json(config, "restore", backup_id, "--target-database", target, "--jobs", "2")
    assert result["target_database"] == target
    assert database_fingerprint(pg, target) == database_fingerprint(pg, source)
    spool = config.parent / "spool"
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    assert list(spool.iterdir()) == []


def test_jobs_out_of_range_is_refused(setup: tuple[Path, str, str, Path]) -> None:
    config, backup_id, _source, _key = setup
    for bad in ("0", "17", "two"):
        proc = run_cli(config, "restore", backup_id, "--target-database", unique_db("nope"), "--jobs", bad)
        assert proc.returncode == 2, proc.stderr
        assert "--jobs" in proc.stderr


def test_unusable_spool_dir_is_refused_before_anything_is_created(
    pg: Cluster, setup: tuple[Path, str, str, Path], tmp_path: Path
) -> None:
    config, backup_id, _source, key = setup
    missing = tmp_path / "no" / "such" / "spool"
    bad = _config(tmp_path, pg, config.parent / "repo", key, missing)
    before = _databases(pg)
    target = unique_db("par_bad")
    proc = run_cli(bad, "restore", backup_id, "--target-database", target, "--jobs", "2")
    assert proc.returncode != 0
    assert "restore.spool_dir" in proc.stderr, proc.stderr
    assert "is not an existing directory" in proc.stderr
    assert _databases(pg) == before  # no scratch database, no target
    assert not (tmp_path / "no").exists()


def test_corrupt_object_fails_removes_the_spool_and_leaves_no_target(
    pg: Cluster, setup: tuple[Path, str, str, Path], tmp_path: Path
) -> None:
    config, backup_id, _source, key = setup
    repo = tmp_path / "repo"
    shutil.copytree(config.parent / "repo", repo)
    made = cli_json(config, "show", backup_id)
    stored = repo / made["object_key"]
    data = bytearray(stored.read_bytes())
    assert made["frames"] > 3
    data[-40] ^= 0x01  # in the last frame: the data has streamed into the scratch database when it is found
    stored.write_bytes(bytes(data))
    spool = tmp_path / "spool"
    corrupt = _config(tmp_path, pg, repo, key, spool)
    before = _databases(pg)
    target = unique_db("par_bad")
    # --no-owner skips the role pre-check, which would read the (small) stream first and find the damage
    # before the restore does: here the streaming step meets it, with the table of contents already kept.
    proc = run_cli(corrupt, "restore", backup_id, "--target-database", target, "--jobs", "2", "--no-owner")
    assert proc.returncode != 0
    assert "does not verify" in proc.stderr, proc.stderr
    assert _databases(pg) == before  # the scratch database, with its data, was dropped
    assert not spool.exists() or list(spool.iterdir()) == []  # no post-data step ran: nothing was spooled
