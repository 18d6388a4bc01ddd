"""Selective restore and contents (issue 11 item 5), on the session cluster with real pg_dump/pg_restore: a
source database with two schemas — a serial key, an identity key, a unique constraint, an index, foreign keys
inside and across the schemas, a trigger calling a function of the other schema, a grant, comments, a large
object — backed up through the in-process service (encrypted, small frames, so the TOC and the data span
several), then listed, restored table by table and schema by schema into new databases, and one table added
under a new name to a live database.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from kybdr_agent.backup.contents import backup_contents
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.selection import Selection, SelectionError
from kybdr_agent.backup.selective import SelectiveResult, SelectiveRun, restore_selection
from kybdr_agent.backup.selective_existing import restore_into_existing
from kybdr_agent.backup.service import BackupService
from kybdr_agent.config import load_settings
from kybdr_agent.errors import IntegrityError, KybdrError
from kybdr_agent.postgres.cluster import PG_BIN, Cluster
from kybdr_agent.storage.local import LocalStore
from tests.support import agent_config, folder_service, run_cli, unique_db

SUFFIX = secrets.token_hex(3)
OWNER, READER, GONE = f"s{SUFFIX}_owner", f"s{SUFFIX}_reader", f"s{SUFFIX}_gone"

SOURCE_SQL = f"""
create schema sales authorization {OWNER};
create table public.customers (id serial primary key, name text not null unique, created date default '2025-01-01');
create index customers_created_idx on public.customers (created);
comment on table public.customers is 'people who buy';
comment on column public.customers.name is 'full name';
grant select on public.customers to {READER};
create function public.touch() returns trigger language plpgsql as $$begin new.updated := now(); return new; end$$;
create table sales.orders (
    id bigint generated always as identity primary key,
    customer int not null references public.customers (id),
    amount numeric(10, 2),
    updated timestamptz
);
create index orders_customer_idx on sales.orders (customer);
create trigger orders_touch before update on sales.orders for each row execute function public.touch();
alter table sales.orders owner to {OWNER};
grant select on sales.orders to {READER};
create table sales.items (order_id bigint references sales.orders (id), sku text, qty int check (qty > 0));
alter table sales.items owner to {OWNER};
insert into public.customers (name) select 'customer ' || g from generate_series(1, 300) g;
insert into sales.orders (customer, amount) select 1 + g % 300, g / 7.0 from generate_series(1, 1200) g;
insert into sales.items select 1 + g % 1200, 'sku-' || g % 40, 1 + g % 5 from generate_series(1, 2000) g;
select lo_from_bytea(0, 'a large object');
-- After the selected tables' data in the archive: pg_restore is done long before the stream ends.
create table public.zz_filler (line text);
insert into public.zz_filler select repeat(md5(g::text), 8) from generate_series(1, 12000) g;
grant select on public.zz_filler to {GONE};
"""
TABLES = {("public", "customers"), ("sales", "orders"), ("sales", "items"), ("public", "zz_filler")}


@dataclass
class Source:
    db: str
    manifest: Manifest
    service: BackupService
    repo: Path
    config: Path

    @property
    def keyring(self) -> KeyRing:
        assert self.service.keyring is not None
        return self.service.keyring


def _dump(cluster: Cluster, database: str, *args: str) -> str:
    """pg_dump's plain output (no restrict key line, which is random), for comparing objects."""
    proc = subprocess.run(
        [str(PG_BIN / "pg_dump"), "-Fp", "--restrict-key=kybdrtest", *args, "-d", database],
        env={**os.environ, **cluster.env()},
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def _databases(pg: Cluster) -> set[str]:
    return set(pg.psql("postgres", "select datname from pg_database").split())


@pytest.fixture(scope="module")
def source(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Source:
    tmp = tmp_path_factory.mktemp("selective")
    key = tmp / "master.key"
    key.write_text(secrets.token_hex(32) + "\n")
    key.chmod(0o600)
    db = unique_db("sel")
    pg.psql("postgres", f'create role {OWNER}; create role {READER}; create role {GONE}; create database "{db}"')
    pg.psql(db, SOURCE_SQL)
    config = agent_config(
        tmp, pg, repository=f'url = "file://{tmp / "repo"}"', key_file=key, frame_size_kib=16, compression=None
    )
    service = folder_service(load_settings(config))
    manifest = anyio.run(service.backup, db)
    assert manifest.frames > 3
    # A role the backup names (in zz_filler's grants only) that this server no longer has.
    pg.psql(db, f"revoke select on public.zz_filler from {GONE}; drop role {GONE}")
    return Source(db, manifest, service, tmp / "repo", config)


def _run(source: Source, no_owner: bool = False) -> SelectiveRun:
    service = source.service
    return SelectiveRun(
        source.manifest,
        service.store,
        service.keyring,
        service.connection,
        service.config.maintenance_database,
        no_owner=no_owner,
    )


async def _restore(source: Source, target: str, selection: Selection, no_owner: bool = False) -> SelectiveResult:
    return await restore_selection(_run(source, no_owner), selection, target)


def test_contents_lists_the_tables_with_their_exact_sizes(pg: Cluster, source: Source) -> None:
    contents = anyio.run(backup_contents, source.manifest, source.service.store, source.keyring).as_dict()
    found = {(s["name"], t["name"]): t for s in contents["schemas"] for t in s["tables"]}
    assert set(found) == TABLES
    for (schema, table), listed in found.items():
        copy = pg.psql(source.db, f"copy {schema}.{table} to stdout")  # exactly what pg_dump puts in the archive
        assert listed["data_bytes"] == len(copy.encode())
        assert listed["rows"] == int(pg.psql(source.db, f"select count(*) from {schema}.{table}"))
    assert found[("sales", "orders")]["owner"] == OWNER
    sales = next(s for s in contents["schemas"] if s["name"] == "sales")
    assert sales["owner"] == OWNER
    assert sales["objects"] == {"constraint": 1, "fk_constraint": 2, "index": 1, "sequence": 1, "trigger": 1}
    assert contents["large_objects"]["count"] == 1
    assert contents["totals"]["tables"] == 4
    assert contents["size_unit"] == "bytes"


def test_one_table_comes_back_whole(pg: Cluster, source: Source) -> None:
    target = unique_db("sel_t")
    result = anyio.run(_restore, source, target, Selection(tables=("Customers",)))  # unquoted: folded, as in SQL
    assert result.tables == ("public.customers",)
    assert not any("not restored" in n for n in result.notices)
    # Table, sequence, default, constraints, index, comments and grant: pg_dump says the same of both.
    one = ("--table=public.customers",)
    assert _dump(pg, target, "--schema-only", *one) == _dump(pg, source.db, "--schema-only", *one)
    assert _dump(pg, target, "--data-only", *one) == _dump(pg, source.db, "--data-only", *one)
    assert (
        pg.psql(
            target, "select count(*) from pg_tables where schemaname not in ('pg_catalog', 'information_schema')"
        ).strip()
        == "1"
    )
    # The serial default goes on from the restored sequence value, and the unique constraint holds.
    assert pg.psql(target, "insert into customers (name) values ('new') returning id").strip() == "301"
    with pytest.raises(RuntimeError, match="duplicate key"):
        pg.psql(target, "insert into customers (name) values ('customer 1')")


def test_a_schema_comes_back_with_what_it_needs_and_without_what_points_outside(pg: Cluster, source: Source) -> None:
    target = unique_db("sel_s")
    result = anyio.run(_restore, source, target, Selection(schemas=("sales",)))
    notices = " ".join(result.notices)
    assert "FK CONSTRAINT sales.orders orders_customer_fkey, which needs TABLE public.customers" in notices
    assert "FUNCTION public.touch()" in notices
    for table in ("sales.orders", "sales.items"):
        assert _dump(pg, target, "--data-only", f"--table={table}") == _dump(
            pg, source.db, "--data-only", f"--table={table}"
        )
    facts = (
        "select conname, contype from pg_constraint where connamespace = 'sales'::regnamespace order by 1;"
        "select indexrelid::regclass from pg_index where indrelid = 'sales.orders'::regclass order by 1;"
        "select relacl from pg_class where oid = 'sales.orders'::regclass;"
        "select nspowner::regrole from pg_namespace where nspname = 'sales'"
    )
    expected = pg.psql(source.db, facts).replace("orders_customer_fkey|f\n", "")
    assert pg.psql(target, facts) == expected
    # The trigger calls the function brought along from public; the identity key goes on.
    assert (
        pg.psql(target, "update sales.orders set amount = 1 where id = 5 returning updated is not null").strip() == "t"
    )
    assert pg.psql(target, "insert into sales.orders (customer) values (1) returning id").strip() == "1201"
    with pytest.raises(RuntimeError, match="foreign key"):
        pg.psql(target, "insert into sales.items values (99999, 'x', 1)")


def test_an_unknown_table_is_refused_before_anything_is_created(pg: Cluster, source: Source) -> None:
    before = _databases(pg)
    target = unique_db("sel_x")
    with pytest.raises(SelectionError, match=r"no table sales\.nope.*nothing was restored"):
        anyio.run(_restore, source, target, Selection(tables=("sales.nope", "customers")))
    with pytest.raises(SelectionError, match="no schema"):
        anyio.run(_restore, source, target, Selection(schemas=("nope",)))
    # The roles checked are the selection's own: customers restored above needs none missing; zz_filler does.
    with pytest.raises(KybdrError, match=rf"1 role\(s\) this server does not have: {GONE}.*nothing was changed"):
        anyio.run(_restore, source, target, Selection(tables=("zz_filler",)))
    # The service checks the switches for any caller: --into-existing without a table is no whole restore.
    restore = functools.partial(source.service.restore, into_existing=True, rename_to="x")
    with pytest.raises(SelectionError, match="go with one --table"):
        anyio.run(restore, source.manifest.id, target)
    assert _databases(pg) == before
    result = anyio.run(_restore, source, target, Selection(tables=("zz_filler",)), True)  # --no-owner
    assert result.tables == ("public.zz_filler",)
    assert pg.psql(target, "select count(*) from zz_filler").strip() == "12000"


def test_contents_of_a_corrupt_backup_is_an_error(source: Source, tmp_path: Path) -> None:
    shutil.copytree(source.repo, tmp_path / "repo")
    stored = tmp_path / "repo" / source.manifest.object_key
    data = bytearray(stored.read_bytes())
    data[-100] ^= 0x01  # in the last frame: everything before it parses
    stored.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not verify"):
        anyio.run(backup_contents, source.manifest, LocalStore(tmp_path / "repo"), source.keyring)


def test_into_existing_adds_the_table_under_a_new_name_and_never_overwrites(pg: Cluster, source: Source) -> None:
    # A name pg_restore would read as a connection string, were it not quoted: the table must land in this
    # database, not in the decoy it names.
    decoy = unique_db("sel_decoy")
    live = f"dbname={decoy}"
    here = f"dbname='{live}'"  # how psql and pg_dump reach it in this test
    pg.psql("postgres", f'create database "{live}"; create database "{decoy}"')
    # The live database has its own customers: the restored table's index and sequence names would collide.
    pg.psql(
        here,
        "create table customers (id serial primary key, name text unique); "
        "insert into customers (name) values ('live')",
    )

    async def add(name: str) -> SelectiveResult:
        return await restore_into_existing(_run(source), Selection(tables=("public.customers",)), live, name)

    before = _dump(pg, here, "--table=public.customers")
    databases = _databases(pg)
    result = anyio.run(add, "customers_restored")
    assert result.renamed["public.customers_pkey"] == "public.customers_restored_pkey"
    assert _dump(pg, here, "--table=public.customers") == before  # the live table is untouched
    restored = pg.psql(here, "select count(*), min(name), max(id) from customers_restored")
    assert restored == pg.psql(source.db, "select count(*), min(name), max(id) from customers")
    indexes = pg.psql(
        here, "select indexrelid::regclass from pg_index where indrelid = 'customers_restored'::regclass order by 1"
    )
    assert sorted(indexes.split()) == [
        "customers_restored_created_idx",
        "customers_restored_name_key",
        "customers_restored_pkey",
    ]
    assert (
        pg.psql(here, "select pg_get_serial_sequence('customers_restored', 'id')").strip()
        == "public.customers_restored_id_seq"
    )
    assert pg.psql(here, "insert into customers_restored (name) values ('x') returning id").strip() == "301"
    assert READER in pg.psql(here, "select relacl from pg_class where relname = 'customers_restored'")

    whole = _dump(pg, here)
    with pytest.raises(SelectionError, match=r"already has public\.customers_restored .*nothing was changed"):
        anyio.run(add, "customers_restored")
    with pytest.raises(SelectionError, match="longer than"):
        anyio.run(add, "x" * 64)
    assert _dump(pg, here) == whole
    assert _databases(pg) == databases  # no scratch database left behind
    assert pg.psql(decoy, "select count(*) from pg_class where relname like 'customers%'").strip() == "0"


def test_the_cli_names(pg: Cluster, source: Source) -> None:
    """The operator's contract: ``contents ID``, ``restore ID --table/--schema``, ``--into-existing --rename-to``."""
    backup_id = source.manifest.id
    listed = run_cli(source.config, "contents", backup_id)
    assert listed.returncode == 0, listed.stderr
    assert "customers: " in listed.stdout
    assert "300 rows" in listed.stdout
    one = unique_db("cli_one")
    proc = run_cli(source.config, "restore", backup_id, "--table", "public.customers", "--target-database", one)
    assert proc.returncode == 0, proc.stderr
    assert "tables: public.customers" in proc.stdout
    assert pg.psql(one, "select count(*) from customers").strip() == "300"
    refused = run_cli(
        source.config, "restore", backup_id, "--into-existing", "--table", "customers", "--target-database", one
    )
    assert refused.returncode == 2
    assert "--rename-to" in refused.stderr
    # Dropped by mistake, brought back under its own name: its index and sequence names come back as they were.
    facts = (
        "select indexrelid::regclass from pg_index where indrelid = 'customers'::regclass order by 1;"
        "select pg_get_serial_sequence('customers', 'id')"
    )
    names = pg.psql(one, facts)
    pg.psql(one, "drop table customers")
    added = run_cli(
        source.config,
        "restore",
        backup_id,
        "--into-existing",
        "--table",
        "customers",
        "--rename-to",
        "customers",
        "--target-database",
        one,
    )
    assert added.returncode == 0, added.stderr
    assert "public.customers as public.customers" in added.stdout
    assert pg.psql(one, "select count(*) from customers").strip() == "300"
    assert pg.psql(one, facts) == names
    pg.psql("postgres", f'drop database "{one}"')
