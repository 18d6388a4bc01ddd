"""What happens when things go wrong: tampered objects, failing pg_dump, unreachable or failing stores,
Ctrl-C mid-backup, bad configuration and hostile ids. In every case: a clear error, a non-zero exit status,
and nothing left behind that looks like a backup (no manifest, no open multipart upload, no restored db)."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kybdr_agent.backup.streamfmt import HEADER_SIZE, TAG_SIZE
from kybdr_agent.postgres.cluster import Cluster
from tests.faultproxy import FaultProxy
from tests.support import (
    KYBDR,
    MotoServer,
    agent_config,
    cli_json,
    create_incompressible_database,
    create_mixed_database,
    run_cli,
    s3_repository,
    unique_db,
)


@pytest.fixture(scope="module")
def small_db(pg: Cluster) -> str:
    name = unique_db("fail")
    create_mixed_database(pg, name, rows=2000)
    return name


def _databases(pg: Cluster) -> set[str]:
    return set(pg.psql("postgres", "select datname from pg_database").split())


def _assert_no_restore_leftovers(pg: Cluster, target: str) -> None:
    names = _databases(pg)
    assert target not in names
    assert not [n for n in names if n.startswith("kybdr_restore_")]


# --- tampering -----------------------------------------------------------------------------------


def _flip_byte(data: bytearray, frame: int, sealed: int) -> None:
    data[HEADER_SIZE + frame * sealed + 10] ^= 0x01


def _truncate_tail(data: bytearray, frame: int, sealed: int) -> None:
    del data[-100:]


def _drop_last_frame(data: bytearray, frame: int, sealed: int) -> None:
    """Cut exactly at a frame boundary: every remaining frame is intact, only the last-flagged one is gone."""
    whole = (len(data) - HEADER_SIZE) // sealed
    del data[HEADER_SIZE + whole * sealed :]


def _swap_frames(data: bytearray, frame: int, sealed: int) -> None:
    a = HEADER_SIZE + frame * sealed
    b = a + sealed
    data[a:b], data[b : b + sealed] = data[b : b + sealed], data[a:b]


def _flip_header(data: bytearray, frame: int, sealed: int) -> None:
    data[HEADER_SIZE - 1] ^= 0x80  # last byte of the nonce prefix


TAMPERS = {
    "flip-byte": _flip_byte,
    "truncate": _truncate_tail,
    "drop-last-frame": _drop_last_frame,
    "swap-frames": _swap_frames,
    "flip-header": _flip_header,
}


@pytest.mark.parametrize("encrypted", [True, False], ids=["aes", "clear"])
@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampering_is_detected_by_validate_and_restore(
    pg: Cluster, tmp_path: Path, key_file: Path, small_db: str, tamper: str, encrypted: bool
) -> None:
    repo = tmp_path / "repo"
    config = agent_config(
        tmp_path,
        pg,
        repository=f'url = "file://{repo}"',
        key_file=key_file if encrypted else None,
        frame_size_kib=16,
    )
    made = cli_json(config, "backup", "--database", small_db)
    assert made["frames"] >= 4, "the test needs several frames"
    data_path = repo / made["object_key"]
    data = bytearray(data_path.read_bytes())
    TAMPERS[tamper](data, 1, made["frame_size"] + TAG_SIZE)
    data_path.write_bytes(bytes(data))

    check = run_cli(config, "validate", made["id"], "--level", "full")
    assert check.returncode == 1, check.stdout
    assert "Traceback" not in check.stderr
    assert made["id"] in check.stderr

    target = unique_db("tampered")
    restored = run_cli(config, "restore", made["id"], "--target-database", target)
    assert restored.returncode == 1
    assert "Traceback" not in restored.stderr
    _assert_no_restore_leftovers(pg, target)


def test_wrong_key_is_detected(pg: Cluster, tmp_path: Path, key_file: Path, small_db: str) -> None:
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=key_file)
    made = cli_json(config, "backup", "--database", small_db)
    other_key = tmp_path / "other.key"
    other_key.write_text(secrets.token_hex(32))
    other_key.chmod(0o600)
    config.write_text(config.read_text().replace(str(key_file), str(other_key)))

    check = run_cli(config, "validate", made["id"], "--level", "full")
    assert check.returncode == 1
    assert "key" in check.stderr.lower()

    target = unique_db("wrongkey")
    restored = run_cli(config, "restore", made["id"], "--target-database", target)
    assert restored.returncode == 1
    assert "key" in restored.stderr.lower()
    _assert_no_restore_leftovers(pg, target)

    # The old key in the ring opens it again: rotation never strands a backup.
    config.write_text(
        config.read_text().replace(
            f'key_file = "{other_key}"', f'key_file = "{other_key}"\nold_key_files = ["{key_file}"]'
        )
    )
    assert run_cli(config, "validate", made["id"], "--level", "full").returncode == 0


def test_restore_refuses_non_empty_target_unless_forced(
    pg: Cluster, tmp_path: Path, key_file: Path, small_db: str
) -> None:
    config = agent_config(tmp_path, pg, repository=f'url = "file://{tmp_path / "repo"}"', key_file=key_file)
    made = cli_json(config, "backup", "--database", small_db)
    target = unique_db("occupied")
    pg.psql("postgres", f'create database "{target}"')
    pg.psql(target, "create table precious (x int); insert into precious values (42);")

    refused = run_cli(config, "restore", made["id"], "--target-database", target)
    assert refused.returncode == 1
    assert "--force" in refused.stderr
    assert pg.psql(target, "select x from precious").strip() == "42"

    forced = run_cli(config, "restore", made["id"], "--target-database", target, "--force")
    assert forced.returncode == 0, forced.stderr
    assert pg.psql(target, "select to_regclass('precious') is null").strip() == "t"
    assert int(pg.psql(target, "select count(*) from accounts")) == 2000


# --- pg_dump and connection failures ------------------------------------------------------------


def _assert_nothing_stored(config: Path, moto: MotoServer | None = None, bucket: str | None = None) -> None:
    listed = run_cli(config, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    if moto is not None:
        s3 = moto.client()
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_missing_database_fails_cleanly(
    pg: Cluster, tmp_path: Path, key_file: Path, moto_server: MotoServer, bucket: str
) -> None:
    config = agent_config(tmp_path, pg, repository=s3_repository(moto_server, bucket), key_file=key_file)
    proc = run_cli(config, "backup", "--database", "no_such_database")
    assert proc.returncode == 1
    assert "no_such_database" in proc.stderr
    assert "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_nothing_stored(config, moto_server, bucket)


def test_bad_password_fails_without_leaking_it(pg: Cluster, tmp_path: Path, key_file: Path, small_db: str) -> None:
    password_file = tmp_path / "pgpass"
    password_file.write_text("definitely-wrong-password\n")
    password_file.chmod(0o600)  # a secret file others may read is refused before any connection
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=key_file)
    config.write_text(
        config.read_text().replace(
            f'dsn = "host={pg.socket_dir} port={pg.port} user=postgres"',
            f'dsn = "host=127.0.0.1 port={pg.port} user=postgres"\npassword_file = "{password_file}"',
        )
    )
    proc = run_cli(config, "backup", "--database", small_db)
    assert proc.returncode == 1
    assert "password authentication failed" in proc.stderr
    assert "definitely-wrong-password" not in proc.stderr + proc.stdout
    _assert_nothing_stored(config)

    # The right password through the same file works: the password reached libpq, not argv.
    password_file.write_text(pg.superuser_password + "\n")
    assert run_cli(config, "backup", "--database", small_db).returncode == 0


def test_pg_dump_failure_is_quoted_and_aborts_the_upload(
    pg: Cluster, tmp_path: Path, key_file: Path, moto_server: MotoServer, bucket: str
) -> None:
    """A user who may connect but not read one table: pg_dump starts, then exits 1 mid-dump."""
    name = unique_db("locked")
    role = f"limited_{secrets.token_hex(3)}"
    pg.psql("postgres", f'create database "{name}"; create role {role} login')
    pg.psql(
        name,
        "create table open_data as select g from generate_series(1, 1000) g; "
        f"create table secret (x int); grant select on open_data to {role};",
    )
    config = agent_config(tmp_path, pg, repository=s3_repository(moto_server, bucket), key_file=key_file)
    config.write_text(config.read_text().replace("user=postgres", f"user={role}"))
    proc = run_cli(config, "backup", "--database", name)
    assert proc.returncode == 1
    assert "pg_dump exited with status 1" in proc.stderr
    assert "permission denied" in proc.stderr
    _assert_nothing_stored(config, moto_server, bucket)


# --- store failures -----------------------------------------------------------------------------


def test_unreachable_store_fails_after_bounded_retries(
    pg: Cluster, tmp_path: Path, key_file: Path, small_db: str
) -> None:
    closed = f"http://127.0.0.1:{_closed_port()}"
    repo = f'url = "s3://bucket/p"\nendpoint_url = "{closed}"\nregion = "us-east-1"\nmax_attempts = 2\n'
    config = agent_config(tmp_path, pg, repository=repo, key_file=key_file)
    started = time.monotonic()
    proc = run_cli(config, "backup", "--database", small_db, timeout=120)
    assert proc.returncode == 1
    assert "after 2 attempts" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 110


def _closed_port() -> int:
    from kybdr_agent.postgres.cluster import free_port

    return free_port()


def _big_incompressible_db(pg: Cluster, megabytes: int) -> str:
    name = unique_db("big")
    create_incompressible_database(pg, name, megabytes)
    return name


def test_store_errors_mid_upload_abort_the_multipart_upload(
    pg: Cluster, tmp_path: Path, key_file: Path, moto_server: MotoServer, bucket: str
) -> None:
    name = _big_incompressible_db(pg, 12)
    with FaultProxy(moto_server.endpoint) as proxy:
        proxy.fail_upload_part = True
        repo = s3_repository(moto_server, bucket, extra="max_attempts = 3\npart_size_mib = 5\n").replace(
            moto_server.endpoint, proxy.endpoint
        )
        config = agent_config(tmp_path, pg, repository=repo, key_file=key_file)
        proc = run_cli(config, "backup", "--database", name)
        assert proc.returncode == 1
        assert "InternalError" in proc.stderr
        assert "after 3 attempts" in proc.stderr or "failed" in proc.stderr
        assert proxy.counts["upload_part"] >= 3
        assert proxy.counts["abort"] == 1
    s3 = moto_server.client()
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def _wait_for(predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_backup_leaves_nothing(
    pg: Cluster, tmp_path: Path, key_file: Path, moto_server: MotoServer, bucket: str, signum: int
) -> None:
    name = _big_incompressible_db(pg, 12)
    with FaultProxy(moto_server.endpoint) as proxy:
        proxy.delay_upload_part = 1.0
        repo = s3_repository(moto_server, bucket, extra="part_size_mib = 5\n").replace(
            moto_server.endpoint, proxy.endpoint
        )
        config = agent_config(tmp_path, pg, repository=repo, key_file=key_file)
        proc = subprocess.Popen(
            [*KYBDR, "--config", str(config), "backup", "--database", name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        s3 = moto_server.client()
        _wait_for(lambda: proxy.counts["upload_part"] >= 1)
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) != []
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert out == ""


def test_interrupt_mid_backup_to_folder_leaves_no_temp_file(pg: Cluster, tmp_path: Path, key_file: Path) -> None:
    name = _big_incompressible_db(pg, 40)
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=key_file)
    proc = subprocess.Popen(
        [*KYBDR, "--config", str(config), "backup", "--database", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: any(p.is_file() for p in repo.rglob("*")), timeout=60)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.fail("the backup finished before the signal arrived; make the database larger")
    assert proc.returncode == 130, err
    assert [p for p in repo.rglob("*") if p.is_file()] == []
    shutil.rmtree(repo, ignore_errors=True)


# --- bad input ----------------------------------------------------------------------------------


def test_config_errors_exit_78_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[repository]\nurl = "ftp://example/x"\nmax_parts = 2\n\n[backup]\nencryption = false\n')
    proc = run_cli(config, "config", "check")
    assert proc.returncode == 78
    assert "repository.url" in proc.stderr
    assert "repository.max_parts" in proc.stderr
    assert "Traceback" not in proc.stderr

    config.write_text("[repository\nurl = 1\n")
    proc = run_cli(config, "list")
    assert proc.returncode == 78
    assert "not valid TOML" in proc.stderr

    config.write_text("[backup]\nencryption = true\n")
    proc = run_cli(config, "backup", "--database", "x")
    assert proc.returncode == 78
    assert "encryption.key_file" in proc.stderr

    proc = run_cli(tmp_path / "missing.toml", "list")
    assert proc.returncode == 78
    assert "does not exist" in proc.stderr


def test_config_check_masks_secrets_and_env_overrides(tmp_path: Path, key_file: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[database]\ndsn = "postgresql://backup:s3cr3t-pw@db.internal:5432/app"\n\n'
        f'[encryption]\nkey_file = "{key_file}"\n\n[repository]\nurl = "file:///var/lib/kybdr/repo"\n'
    )
    proc = run_cli(config, "config", "check", "--json", env={"KYBDR_REPOSITORY__URL": "s3://override/prefix"})
    assert proc.returncode == 0, proc.stderr
    effective = json.loads(proc.stdout)
    assert effective["repository"]["url"] == "s3://override/prefix"
    assert "s3cr3t-pw" not in proc.stdout
    assert "********" in effective["database"]["dsn"]
    assert key_file.read_text().strip() not in proc.stdout


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "20261124T215226Z-3f9a1c2", "x" * 300, ""])
def test_hostile_backup_ids_are_rejected_before_any_io(tmp_path: Path, bad_id: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[backup]\nencryption = false\n[repository]\nurl = "file://{tmp_path / "nowhere"}"\n')
    for argv in (["show", bad_id], ["validate", bad_id], ["restore", bad_id, "--target-database", "x"]):
        proc = run_cli(config, *argv)
        assert proc.returncode == 2, argv
        assert "not a backup id" in proc.stderr
    assert not (tmp_path / "nowhere").exists()


def test_show_unknown_id_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[backup]\nencryption = false\n[repository]\nurl = "file://{tmp_path / "repo"}"\n')
    proc = run_cli(config, "show", "20261124T215226Z-3f9a1c2b")
    assert proc.returncode == 1
    assert "no backup with id 20261124T215226Z-3f9a1c2b" in proc.stderr


def test_a_manifest_pointing_at_another_backups_data_is_not_listed(
    pg: Cluster, tmp_path: Path, key_file: Path, small_db: str
) -> None:
    """A copied or edited manifest must never steer cleanup or restore at someone else's object."""
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=key_file)
    first = cli_json(config, "backup", "--database", small_db)
    second = cli_json(config, "backup", "--database", small_db)
    manifest_path = repo / "backups" / small_db / second["id"] / "manifest.json"
    doc = json.loads(manifest_path.read_text())
    doc["object_key"] = first["object_key"]
    manifest_path.write_text(json.dumps(doc))
    listed = run_cli(config, "list", "--json")
    assert [m["id"] for m in json.loads(listed.stdout)] == [first["id"]]
    assert "does not match its location" in listed.stderr
    shown = run_cli(config, "show", second["id"])
    assert shown.returncode == 1
