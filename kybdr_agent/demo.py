"""The embedded default: the whole data path in one command, on a throwaway cluster and a local folder.

With a configured database (``database.databases`` or a DSN naming one), the same path runs on it and on
the configured repository instead, restoring into a scratch database that is compared and dropped.

Otherwise ``kybdr-agent demo`` starts a PostgreSQL 15 cluster with sample data (mixed column types, a large object),
makes a key, backs the database up into ``<workdir>/repo`` (zstd + AES-256-GCM), validates the backup fully,
restores it into a new database and compares the two table by table. It uses exactly the code paths of
``backup``, ``validate`` and ``restore``; only the cluster and the settings are made up on the spot.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

import anyio

from kybdr_agent import app
from kybdr_agent.backup.keys import generate_master_key_file
from kybdr_agent.backup.service import BackupOverrides, BackupService
from kybdr_agent.config import AgentSettings, BackupSettings, DatabaseSettings, EncryptionSettings, RepositorySettings
from kybdr_agent.errors import KybdrError
from kybdr_agent.postgres.cluster import Cluster, start_cluster
from kybdr_agent.postgres.conninfo import parse_dsn

SAMPLE_DATABASE: Final = "kyb_platform"
RESTORED_DATABASE: Final = "kyb_platform_restored"

SAMPLE_SQL: Final = """
create table customers (
    id bigint primary key, name text not null, email text, created_at timestamptz not null,
    risk_score numeric(6,3), profile jsonb
);
insert into customers
select g, 'customer ' || g, md5(g::text) || '@example.com',
       timestamptz '2024-01-01' + g * interval '37 seconds', (g % 1000) / 7.0,
       jsonb_build_object('tier', g % 5, 'tags', jsonb_build_array(md5((g * 3)::text)), 'active', g % 3 = 0)
from generate_series(1, 50000) g;
create table documents (id serial primary key, customer_id bigint references customers, body text, sha bytea);
insert into documents (customer_id, body, sha)
select 1 + g % 50000, repeat(md5(g::text), 1 + g % 20), sha256(g::text::bytea) from generate_series(1, 20000) g;
create index on documents (customer_id);
create view active_customers as select * from customers where (profile->>'active')::boolean;
select lo_from_bytea(0, convert_to(repeat('scanned passport page ', 5000), 'UTF8'));
"""

FINGERPRINT_SQL: Final = """
select string_agg(format('%s=%s', c.relname, c.n), ' ' order by c.relname) from (
  select 'customers' relname, md5(string_agg(t::text, ',' order by id)) n from customers t
  union all select 'documents', md5(string_agg(t::text, ',' order by id)) from documents t
  union all select 'large_objects', md5(string_agg(encode(lo_get(oid), 'hex'), ',' order by oid))
            from pg_largeobject_metadata
) c
"""


def _say(message: str) -> None:
    print(message, flush=True)


def configured_databases(settings: AgentSettings | None) -> list[str]:
    """The databases a configuration names (``database.databases``, else the DSN's dbname), if any."""
    if settings is None:
        return []
    if settings.database.databases:
        return list(settings.database.databases)
    dbname = parse_dsn(settings.database.dsn or "").get("dbname")
    return [dbname] if dbname else []


async def run_demo(workdir: Path, settings: AgentSettings | None = None) -> int:
    """``workdir`` must be absolute (the CLI resolves it). With a configured database, run on it instead."""
    if configured_databases(settings):
        assert settings is not None
        return await _drill_configured(settings)
    repo = workdir / "repo"
    key_file = workdir / "master.key"
    await anyio.Path(workdir).mkdir(parents=True, exist_ok=True)
    if not await anyio.Path(key_file).exists():
        generate_master_key_file(key_file)
        _say(f"made a master key: {key_file} (mode 0600)")
    _say("starting a throwaway PostgreSQL 15 cluster …")
    cluster = await anyio.to_thread.run_sync(start_cluster)
    try:
        return await _demo_on(cluster, repo, key_file)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(cluster.stop)
        _say("stopped and removed the throwaway cluster")


async def _drill_configured(settings: AgentSettings) -> int:
    """The same path on the configured database and repository, through the service the agent uses:
    backup, full validation, and a restore drill into a scratch database compared and dropped."""
    async with app.in_process(settings) as local:
        return await _drill_with(local.service, settings)


async def _drill_with(service: BackupService, settings: AgentSettings) -> int:
    for database in configured_databases(settings):
        made = await service.backup(database, BackupOverrides(labels=("demo",)))
        _say(f"backup {made.id} of {database}: {made.dump_bytes:,} bytes dumped, {made.stored_bytes:,} stored")
        check = await service.validate(made.id, "full")
        if not check.ok:
            raise KybdrError(f"validation failed: {check.error}")
        _say(f"validated (full): {'; '.join(check.checks)}")
        for drill in await service.drill(database):
            if not drill["passed"]:
                raise KybdrError(f"restore drill of {database} failed: {drill['error']}")
            _say(
                f"restored into scratch database {drill['scratch_database']} in {drill['restore_seconds']:.1f} s; "
                f"row counts of {drill['tables_compared']} table(s) match the dump's snapshot; scratch dropped"
            )
    return 0


async def _demo_on(cluster: Cluster, repo: Path, key_file: Path) -> int:
    _say(f"cluster up on port {cluster.port}; loading sample data into {SAMPLE_DATABASE} …")
    await anyio.to_thread.run_sync(cluster.psql, "postgres", f"create database {SAMPLE_DATABASE}")
    await anyio.to_thread.run_sync(cluster.psql, SAMPLE_DATABASE, SAMPLE_SQL)
    settings = AgentSettings(
        backup=BackupSettings(backup_dir=repo.parent),
        encryption=EncryptionSettings(key_file=key_file),
        repository=RepositorySettings(url=f"file://{repo}"),
        database=DatabaseSettings(dsn=f"host={cluster.socket_dir} port={cluster.port} user=postgres"),
    )
    async with app.in_process(settings) as local:
        service = local.service
        started = time.monotonic()
        made = await service.backup(SAMPLE_DATABASE, BackupOverrides(labels=("demo",)))
        _say(
            f"backup {made.id}: {made.dump_bytes:,} bytes of pg_dump output stored as {made.stored_bytes:,} "
            f"bytes ({made.compression}, {made.encryption.cipher}) in {time.monotonic() - started:.1f} s"
        )
        _say(f"  repository: {service.store.describe()}/{made.object_key}")
        listed = await service.catalog()
        _say(f"repository lists {len(listed.backups)} backup(s)")
        check = await service.validate(made.id, "full")
        if not check.ok:
            raise KybdrError(f"validation failed: {check.error}")
        _say(f"validated (full): {'; '.join(check.checks)}")
        await anyio.to_thread.run_sync(cluster.psql, "postgres", f"drop database if exists {RESTORED_DATABASE}")
        restored = await service.restore(made.id, RESTORED_DATABASE)
        _say(f"restored into {restored.target_database} in {restored.seconds:.1f} s")
    source = await anyio.to_thread.run_sync(cluster.psql, SAMPLE_DATABASE, FINGERPRINT_SQL)
    copy = await anyio.to_thread.run_sync(cluster.psql, RESTORED_DATABASE, FINGERPRINT_SQL)
    if source != copy:
        raise KybdrError(f"restored data differs from the source:\n  source:   {source}\n  restored: {copy}")
    _say(f"source and restored databases match table by table: {source.strip()}")
    _say("demo complete: backup → validate → restore → compare all passed")
    return 0
