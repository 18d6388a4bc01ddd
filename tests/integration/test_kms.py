"""KMS envelope encryption end to end: moto's KMS over HTTP, real PostgreSQL, the CLI as a subprocess.

The agent reaches moto through botocore's standard ``AWS_ENDPOINT_URL_KMS``, exactly as it would reach a VPC
endpoint. What moto cannot show: the multi-Region replica (moto 5.2.5 keeps 36 bytes of key id in its
ciphertext blobs, so a ``mrk-`` key's blob never decrypts, and ``ReplicateKey`` needs such a key); the key
ids that make a replica open the primary's backups are tested in tests/unit/test_keys.py.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

from kybdr_agent.backup.streamfmt import StreamHeader
from kybdr_agent.postgres.cluster import Cluster
from tests.support import MotoServer, run_cli, unique_db, write_config


def _key(path: Path) -> Path:
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


def _config(path: Path, pg: Cluster, repo: Path, encryption: str) -> Path:
    return write_config(
        path,
        f"""[database]
dsn = "host={pg.socket_dir} port={pg.port} user=postgres"

[repository]
url = "file://{repo}"

[encryption]
{encryption}
""",
    )


def _env(moto: MotoServer) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL_KMS": moto.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }


def _ok(config: Path, env: dict[str, str], *args: str) -> Any:
    proc = run_cli(config, *args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _checksum(pg: Cluster, database: str) -> str:
    return pg.psql(database, "select count(*) || ':' || md5(string_agg(t::text, ',' order by id)) from t").strip()


def _manifest_path(repo: Path, made: dict[str, Any]) -> Path:
    return repo / made["object_key"].removesuffix("/data") / "manifest.json"


def test_file_and_kms_backups_side_by_side_then_rotated_to_kms(
    pg: Cluster, tmp_path: Path, moto_server: MotoServer
) -> None:
    kms = moto_server.client("kms")
    arn = kms.create_key(Description="kybdr test")["KeyMetadata"]["Arn"]
    key_uuid = arn.rsplit("/", 1)[1]
    env = _env(moto_server)
    source, other = unique_db("kms_src"), unique_db("kms_other")
    for name, rows in ((source, 2000), (other, 100)):
        pg.psql("postgres", f'create database "{name}"')
        pg.psql(name, f"create table t as select g as id, md5(g::text) as v from generate_series(1, {rows}) g")
    expected = _checksum(pg, source)
    repo, key_file = tmp_path / "repo", _key(tmp_path / "file.key")

    # A backup under the key file, then KMS as the provider with the key file kept as an older key.
    with_file = _config(tmp_path / "file.toml", pg, repo, f'key_file = "{key_file}"')
    by_file = _ok(with_file, env, "backup", "--database", source)
    with_kms = _config(
        tmp_path / "kms.toml", pg, repo, f'key_provider = "kms"\nkms_key_id = "{arn}"\nold_key_files = ["{key_file}"]'
    )
    proc = run_cli(with_kms, "-v", "backup", "--database", source, "--database", other, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    by_kms, other_kms = sorted(json.loads(proc.stdout), key=lambda m: m["database"] != source)

    enc = by_kms["encryption"]
    assert (enc["cipher"], enc["wrap"]) == ("aes-256-gcm", "aws-kms")
    assert enc["key_id"] == key_uuid.replace("-", "")  # the KMS key's own id, 16 bytes
    assert StreamHeader.decode(bytes.fromhex(by_kms["stream_header"])).key_id.hex() == enc["key_id"]
    assert by_file["encryption"]["wrap"] == "aes-256-gcm"
    # The wrapped key is KMS's blob, bound to the backup id; its plaintext is nowhere we wrote.
    blob = base64.b64decode(enc["wrapped_data_key"])
    plaintext = kms.decrypt(CiphertextBlob=blob, EncryptionContext={"kybdr:backup_id": by_kms["id"]})["Plaintext"]
    manifest_text = _manifest_path(repo, by_kms).read_text()
    for shown in (plaintext.hex(), base64.b64encode(plaintext).decode()):
        assert shown not in manifest_text
        assert shown not in proc.stdout + proc.stderr

    # Both restore with the KMS configuration, side by side, equal to the source.
    for made in (by_file, by_kms):
        target = unique_db("kms_restored")
        _ok(with_kms, env, "restore", made["id"], "--target-database", target)
        assert _checksum(pg, target) == expected

    # A wrapped key moved to another backup's manifest does not decrypt there: KMS binds it to its backup id.
    first, second = _manifest_path(repo, by_kms), _manifest_path(repo, other_kms)
    originals = first.read_text(), second.read_text()
    a, b = json.loads(originals[0]), json.loads(originals[1])
    a["encryption"]["wrapped_data_key"], b["encryption"]["wrapped_data_key"] = (
        b["encryption"]["wrapped_data_key"],
        a["encryption"]["wrapped_data_key"],
    )
    first.write_text(json.dumps(a))
    second.write_text(json.dumps(b))
    refused = run_cli(with_kms, "validate", by_kms["id"], "--level", "full", env=env)
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert "Decrypt refused the wrapped data key" in refused.stderr
    first.write_text(originals[0])
    second.write_text(originals[1])

    # Rotation to KMS: the file-wrapped data key is re-wrapped with KMS Encrypt; then the key file retires and
    # every data key still unwraps (the data and its stream header never changed: test_key_rotate restores).
    status = _ok(with_kms, env, "key", "status")["locations"][0]
    assert {use["key"]["wrap"]: use["backups"] for use in status["keys"]} == {"aws-kms": 2, "aes-256-gcm": 1}
    rotated = _ok(with_kms, env, "key", "rotate")["locations"][0]
    assert (rotated["rewrapped"], rotated["already_current"]) == ([by_file["id"]], 2)
    kms_only = _config(tmp_path / "kms_only.toml", pg, repo, f'key_provider = "kms"\nkms_key_id = "{arn}"')
    status = _ok(kms_only, env, "key", "status", "--verify")["locations"][0]
    assert [(use["key"]["key_id"], use["backups"]) for use in status["keys"]] == [(enc["key_id"], 3)]
    assert status["unopened"] == []


def test_kms_refusing_fails_the_backup_and_leaves_nothing(pg: Cluster, tmp_path: Path, moto_server: MotoServer) -> None:
    source = unique_db("kms_refused")
    pg.psql("postgres", f'create database "{source}"')
    repo = tmp_path / "repo"
    arn = "arn:aws:kms:us-east-1:123456789012:key/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"  # no such key
    config = _config(tmp_path / "kms.toml", pg, repo, f'key_provider = "kms"\nkms_key_id = "{arn}"')
    proc = run_cli(config, "backup", "--database", source, env=_env(moto_server))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"AWS KMS key {arn} (us-east-1): GenerateDataKey failed: NotFoundException" in proc.stderr
    assert not list(repo.rglob("manifest.json"))
    assert not list(repo.rglob("data"))
