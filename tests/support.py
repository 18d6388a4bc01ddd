"""Helpers for the integration tests: sample databases, fingerprints, configs and the CLI as a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from kybdr_agent import app
from kybdr_agent.backup.service import BackupService
from kybdr_agent.backup.settings import BackupConfig
from kybdr_agent.clock import Clock, utc_now
from kybdr_agent.config import AgentSettings
from kybdr_agent.journal import Journal
from kybdr_agent.postgres.cluster import PG_BIN, Cluster, free_port
from kybdr_agent.storage.local import LocalStore

REPO_ROOT = Path(__file__).resolve().parent.parent
KYBDR = [sys.executable, "-m", "kybdr_agent"]


@dataclass
class MotoServer:
    endpoint: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def client(self, service: str = "s3") -> Any:
        # moto reports a multipart object's composite checksum as if it were a full-object one (its quirk,
        # ../shared/research/ecosystem.md), so the tests' own reads must not validate response checksums.
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=BotoConfig(response_checksum_validation="when_required"),
        )


def start_moto_server() -> MotoServer:
    """moto in server mode as its own process on a free loopback port, reached over real HTTP."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return MotoServer(endpoint, proc)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)


def create_incompressible_database(cluster: Cluster, name: str, megabytes: int) -> None:
    """One table of random-looking bytes (md5 output): compression cannot shrink it, so sizes are real."""
    cluster.psql("postgres", f'create database "{name}"')
    cluster.psql(
        name,
        "create table blobs (id int, data bytea); "
        "insert into blobs select g, decode(string_agg(md5((g*1000+i)::text), ''), 'hex') "
        f"from generate_series(1, {megabytes * 64}) g, generate_series(1, 1000) i group by g;",
    )


def unique_db(prefix: str = "db") -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


MIXED_SQL = """
create table accounts (
    id bigint primary key, name text not null, email text, created_at timestamptz not null,
    balance numeric(14,2), profile jsonb, note text
);
insert into accounts
select g, 'account ' || g, md5(g::text) || '@example.com',
       timestamptz '2024-01-01 00:00:00+00' + g * interval '17 seconds', (g * 37 % 100000) / 100.0,
       jsonb_build_object('tier', g % 5, 'tags', jsonb_build_array(md5((g * 7)::text)), 'vip', g % 11 = 0),
       case when g % 4 = 0 then null else repeat(md5((g * 13)::text), 1 + g % 3) end
from generate_series(1, {rows}) g;
create table events (id bigserial primary key, account_id bigint references accounts, at timestamp, payload bytea);
insert into events (account_id, at, payload)
select 1 + g % {rows}, timestamp '2025-06-01' + g * interval '1 minute', sha256(g::text::bytea)
from generate_series(1, {rows}) g;
create index on events (account_id);
create schema audit;
create table audit.log (id int generated always as identity, entry text, unique (entry));
insert into audit.log (entry) select 'entry ' || g from generate_series(1, 100) g;
create view vip_accounts as select * from accounts where (profile->>'vip')::boolean;
create function balance_of(bigint) returns numeric language sql as 'select balance from accounts where id = $1';
select lo_from_bytea(0, convert_to(repeat('large object payload ', 3000), 'UTF8'));
select lo_from_bytea(0, decode(repeat('00ff', 5000), 'hex'));
"""


def create_mixed_database(cluster: Cluster, name: str, rows: int = 5000) -> None:
    cluster.psql("postgres", f'create database "{name}"')
    cluster.psql(name, MIXED_SQL.format(rows=rows))


def _pg_dump_digest(cluster: Cluster, database: str, *args: str) -> str:
    proc = subprocess.Popen(
        [str(PG_BIN / "pg_dump"), "-Fp", "--no-owner", "--restrict-key=kybdrtest", *args, "-d", database],
        stdout=subprocess.PIPE,
        env={**os.environ, **cluster.env()},
    )
    assert proc.stdout is not None
    digest = hashlib.sha256()
    while chunk := proc.stdout.read(1 << 20):
        digest.update(chunk)
    assert proc.wait() == 0
    return digest.hexdigest()


def database_fingerprint(cluster: Cluster, database: str) -> dict[str, str]:
    """Schema and each table's data (and the large objects), each as a digest of pg_dump's plain output."""
    tables = cluster.psql(
        database,
        "select quote_ident(schemaname) || '.' || quote_ident(tablename) from pg_tables "
        "where schemaname not in ('pg_catalog', 'information_schema') order by 1",
    ).split()
    fingerprint = {"schema": _pg_dump_digest(cluster, database, "--schema-only")}
    for table in tables:
        fingerprint[table] = _pg_dump_digest(cluster, database, "--data-only", f"--table={table}")
    fingerprint["large_objects"] = cluster.psql(
        database,
        "select md5(coalesce(string_agg(encode(lo_get(oid), 'hex'), ',' order by oid), '')) "
        "from pg_largeobject_metadata",
    ).strip()
    return fingerprint


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def agent_config(
    tmp_path: Path,
    cluster: Cluster,
    *,
    repository: str,
    key_file: Path | None,
    compression: str | None = "zstd",
    frame_size_kib: int | None = None,
    extra: str = "",
) -> Path:
    lines = [
        "[backup]",
        f"compression = {'true' if compression else 'false'}",
        f"encryption = {'true' if key_file else 'false'}",
        "",
        "[database]",
        f'dsn = "host={cluster.socket_dir} port={cluster.port} user=postgres"',
        "",
        "[repository]",
        repository,
    ]
    if compression:
        lines += ["", "[compression]", f'algorithm = "{compression}"']
    if key_file or frame_size_kib:
        lines += ["", "[encryption]"]
    if key_file:
        lines.append(f'key_file = "{key_file}"')
    if frame_size_kib:
        lines.append(f"frame_size_kib = {frame_size_kib}")
    return write_config(tmp_path / "agent.toml", "\n".join(lines) + "\n" + extra)


def s3_repository(moto: MotoServer, bucket: str, prefix: str = "kybdr", extra: str = "") -> str:
    return (
        f'url = "s3://{bucket}/{prefix}"\nendpoint_url = "{moto.endpoint}"\nregion = "us-east-1"\n'
        f'addressing_style = "path"\nmin_part_size_mib = 5\n{extra}'
    )


def run_cli(config: Path | None, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Any:
    argv = [*KYBDR, *(["--config", str(config)] if config else []), *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False
    )


def cli_json(config: Path, *args: str) -> Any:
    proc = run_cli(config, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def folder_service(settings: AgentSettings, *, journal: Journal | None = None, clock: Clock = utc_now) -> BackupService:
    """A backup service on the configured folder repository, its parts built by the composition root's own
    functions (no S3, so no store to open or close)."""
    return BackupService(
        BackupConfig.from_settings(settings),
        store=LocalStore(settings.repository.local_path),
        connection=app.connection(settings),
        drill_connection=app.drill_connection(settings),
        keyring=app.keyring(settings),
        journal=journal,
        clock=clock,
    )


class SteppedClock:
    """The agent's clock (``kybdr_agent.clock.Clock``) for a test that moves time by hand, in seconds."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
