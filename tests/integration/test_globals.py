"""Globals (issue 11 item 1): every backup carries the server's roles and tablespaces, and a restore onto a fresh,
empty server either refuses before touching anything or, with --with-globals, brings the roles first — after
which owners, privileges, default privileges, role settings, memberships, the tablespace and the data equal the
source. Real parts: the session cluster as the source, a second throwaway cluster as the target, the CLI as a
subprocess, a folder repository.

The tablespace is tested too, cheaply: both clusters run on this host, so the target's tablespace must live at
the source's path, which PostgreSQL refuses while the source still uses it (the directory holds its
``PG_15_*`` subdirectory). So the source's facts are taken, its tablespace dropped, and only then restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from kybdr_agent.backup.globals import check_globals_object, read_globals, verify_globals
from kybdr_agent.backup.keys import KeyRing, load_master_key
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.errors import IntegrityError
from kybdr_agent.postgres.cluster import PG_BIN, Cluster, start_cluster
from kybdr_agent.storage.local import LocalStore
from tests.support import agent_config, cli_json, database_fingerprint, run_cli, unique_db

SUFFIX = secrets.token_hex(3)
OWNER, GROUP, READER, WRITER = (f"g{SUFFIX}_{n}" for n in ("owner", "group", "reader", "writer"))
ROLES = (OWNER, GROUP, READER, WRITER)
OWNER_PASSWORD = secrets.token_urlsafe(12)

# Facts about roles and privileges, the same query on both sides (grantors differ by design and are left out).
FACTS = {
    "tables": "select n.nspname, c.relname, c.relkind, pg_get_userbyid(c.relowner), coalesce(c.relacl::text, '-'), "
    "coalesce(t.spcname, '-') from pg_class c join pg_namespace n on n.oid = c.relnamespace "
    "left join pg_tablespace t on t.oid = c.reltablespace "
    "where n.nspname in ('app', 'public') and c.relkind in ('r', 'S', 'v') order by 1, 2",
    "schemas": "select nspname, pg_get_userbyid(nspowner), coalesce(nspacl::text, '-') from pg_namespace "
    "where nspname in ('app', 'public') order by 1",
    # aclitems in order of their text: a restored default ACL may list the same items in another order.
    "default_acl": "select pg_get_userbyid(d.defaclrole), coalesce(n.nspname, '-'), d.defaclobjtype, "
    "(select string_agg(a::text, ',' order by a::text) from unnest(d.defaclacl) a) "
    "from pg_default_acl d left join pg_namespace n on n.oid = d.defaclnamespace order by 1, 2, 3",
}
ROLE_FACTS = {
    "roles": "select rolname, rolcanlogin, rolinherit, rolconnlimit, rolcreatedb from pg_roles "
    "where rolname in ({roles}) order by 1",
    "settings": "select r.rolname, s.setconfig::text from pg_db_role_setting s join pg_roles r on r.oid = s.setrole "
    "where s.setdatabase = 0 and r.rolname in ({roles}) order by 1",
    "memberships": "select g.rolname, m.rolname, am.admin_option from pg_auth_members am "
    "join pg_roles g on g.oid = am.roleid join pg_roles m on m.oid = am.member "
    "where m.rolname in ({roles}) order by 1, 2",
    "tablespaces": "select spcname, pg_get_userbyid(spcowner), coalesce(spcacl::text, '-'), "
    f"coalesce(spcoptions::text, '-') from pg_tablespace where spcname = 'g{SUFFIX}_ts'",
}


def _facts(cluster: Cluster, database: str) -> dict[str, str]:
    """All the queries above in one psql run (shared catalogs read the same from any database)."""
    roles = ", ".join(f"'{r}'" for r in ROLES)
    queries = {**FACTS, **{name: sql.format(roles=roles) for name, sql in ROLE_FACTS.items()}}
    out = cluster.psql(database, "".join(f"\\echo ==={name}\n{sql};\n" for name, sql in queries.items()))
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in out.split("===")[1:]}


def _postgres_owned_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="kybdr-ts-", dir="/tmp"))  # the postgres user must reach it
    path.chmod(0o700)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


@dataclass
class Scenario:
    source_db: str
    made: dict[str, object]
    facts: dict[str, str]
    fingerprint: dict[str, str]
    source_config: Path
    target_config: Path
    repo: Path
    key_file: Path
    tablespace: str


@pytest.fixture(scope="module")
def target() -> Iterator[Cluster]:
    with start_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def scenario(pg: Cluster, target: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    base = tmp_path_factory.mktemp("globals")
    key_file = base / "master.key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    key_file.chmod(0o600)
    repo = base / "repo"
    (base / "src").mkdir()
    (base / "tgt").mkdir()
    source_config = agent_config(base / "src", pg, repository=f'url = "file://{repo}"', key_file=key_file)
    target_config = agent_config(base / "tgt", target, repository=f'url = "file://{repo}"', key_file=key_file)
    db = unique_db("globals")
    ts_dir = _postgres_owned_dir()
    tablespace = f"g{SUFFIX}_ts"
    pg.psql(
        "postgres",
        f"create role {OWNER} login password '{OWNER_PASSWORD}' connection limit 5;\n"
        f"create role {GROUP} nologin;\n"
        f"create role {READER} login in role {GROUP};\n"
        f"create role {WRITER} login;\n"
        f"grant {GROUP} to {WRITER} with admin option;\n"
        f"alter role {OWNER} set search_path = app, public;\n"
        f"alter role {READER} set statement_timeout = '5s';\n"
        f"create tablespace {tablespace} location '{ts_dir}' with (random_page_cost = 1.5);\n"
        f"grant create on tablespace {tablespace} to {OWNER};\n"
        f'create database "{db}";\n',
    )
    pg.psql(
        db,
        f"create schema app authorization {OWNER};\n"
        f"set role {OWNER};\n"
        "create table app.accounts (id int primary key, name text);\n"
        "insert into app.accounts select g, 'account ' || g from generate_series(1, 500) g;\n"
        "create table app.events (id bigserial primary key, account int references app.accounts, at timestamptz);\n"
        "insert into app.events (account, at) select 1 + g % 500, '2025-01-01'::timestamptz + g * interval '1 min' "
        "from generate_series(1, 800) g;\n"
        f"create table app.archived (id int, note text) tablespace {tablespace};\n"
        "insert into app.archived select g, md5(g::text) from generate_series(1, 200) g;\n"
        f"grant select on app.accounts to {GROUP};\n"
        f"grant insert, update on app.events to {WRITER};\n"
        f"grant usage on schema app to {GROUP};\n"
        f"alter default privileges in schema app grant select on tables to {GROUP};\n"
        f"alter default privileges grant usage on sequences to {WRITER};\n"
        "reset role;\n"
        "create table public.plain (x int);\n"
        "insert into public.plain values (1), (2);\n"
        f"grant select on public.plain to {READER};\n",
    )
    made = cli_json(source_config, "backup", "--database", db)
    facts = _facts(pg, db)
    fingerprint = database_fingerprint(pg, db)
    # Free the tablespace's path for the target (see the module docstring): the facts above keep the source.
    pg.psql(db, "drop table app.archived")
    pg.psql("postgres", f"drop tablespace {tablespace}")
    try:
        yield Scenario(db, made, facts, fingerprint, source_config, target_config, repo, key_file, tablespace)
    finally:
        pg.psql("postgres", f'drop database if exists "{db}"')
        for role in ROLES:
            pg.psql("postgres", f"drop role if exists {role}")
        shutil.rmtree(ts_dir, ignore_errors=True)


def _databases(cluster: Cluster) -> set[str]:
    return set(cluster.psql("postgres", "select datname from pg_database").split())


def _check_stored_globals(scenario: Scenario) -> None:
    made = scenario.made
    g = made["globals"]
    assert isinstance(g, dict)
    assert g["object_key"] == f"backups/{scenario.source_db}/{made['id']}/globals"
    assert g["role_passwords"] is True  # a superuser agent, an encrypted backup
    stored = (scenario.repo / g["object_key"]).read_bytes()
    assert len(stored) == g["stored_bytes"]
    assert hashlib.sha256(stored).hexdigest() == g["sha256"]
    data_header = str(made["stream_header"])
    assert g["stream_header"][:64] == data_header[:64]  # same magic, version, codec, cipher, frame size, key id
    assert g["stream_header"][64:] != data_header[64:]  # its own nonce prefix
    assert OWNER.encode() not in stored  # encrypted like the data


def test_restore_onto_a_fresh_server(scenario: Scenario, target: Cluster) -> None:
    """One test, in order: the globals as stored; without the flag, refused before anything changes; with
    --no-owner, no role check; with --with-globals, everything equal to the source, an existing role kept."""
    _check_stored_globals(scenario)
    backup_id = str(scenario.made["id"])

    before = (_databases(target), target.psql("postgres", "select count(*) from pg_roles"))
    proc = run_cli(scenario.target_config, "restore", backup_id, "--target-database", "copy")
    assert proc.returncode == 1, proc.stderr
    message = " ".join(proc.stderr.split())
    for name in (*ROLES, scenario.tablespace):
        assert name in message
    assert "--with-globals" in message
    assert "--no-owner" in message
    assert "nothing was changed" in message
    assert (_databases(target), target.psql("postgres", "select count(*) from pg_roles")) == before

    # --no-owner skips the role check; the table in the tablespace this server lacks then fails pg_restore in
    # the scratch database, which goes: nothing is left either way.
    plain = run_cli(scenario.target_config, "restore", backup_id, "--target-database", "noowner", "--no-owner")
    assert plain.returncode == 1
    assert scenario.tablespace in plain.stderr
    assert {n for n in _databases(target) if n.startswith("kybdr_")} == set()
    assert "noowner" not in _databases(target)

    # An existing role is left exactly as it is, and reported.
    target.psql("postgres", f"create role {WRITER} login connection limit 7; comment on role {WRITER} is 'mine'")
    proc = run_cli(
        scenario.target_config, "restore", backup_id, "--target-database", "copy", "--with-globals", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    applied = result["globals"]
    # The source is the shared session cluster: other tests' roles come along too, which is what globals are.
    assert {OWNER, GROUP, READER} <= set(applied["roles_created"])
    assert WRITER not in applied["roles_created"]
    assert WRITER in applied["roles_existing"]
    assert applied["tablespaces_created"] == [scenario.tablespace]
    assert WRITER in " ".join(proc.stderr.split())  # the notice names the role left alone
    assert any("left as they are" in n for n in result["notices"])

    copy = _facts(target, "copy")
    expected = dict(scenario.facts)
    # The writer existed already: its attributes are the target's, and no membership was granted to it.
    roles = copy.pop("roles").splitlines()
    assert f"{WRITER}|t|t|7|f" in roles
    assert [r for r in roles if not r.startswith(WRITER)] == [
        r for r in expected.pop("roles").splitlines() if not r.startswith(WRITER)
    ]
    comment = target.psql(
        "postgres", f"select shobj_description(oid, 'pg_authid') from pg_roles where rolname = '{WRITER}'"
    )
    assert comment.strip() == "mine"
    assert copy.pop("memberships").splitlines() == [
        m for m in expected.pop("memberships").splitlines() if f"|{WRITER}|" not in m
    ]
    assert copy == expected
    assert database_fingerprint(target, "copy") == scenario.fingerprint
    # The password hash came along: the owner logs in to the target with the source's password.
    psql = [str(PG_BIN / "psql"), "-X", "-At", "-h", "127.0.0.1", "-p", str(target.port), "-U", OWNER, "-d", "copy"]
    login = subprocess.run(
        [*psql, "-c", "select current_user"],
        env={**os.environ, "PGPASSWORD": OWNER_PASSWORD},
        capture_output=True,
        text=True,
        check=False,
    )
    assert login.stdout.strip() == OWNER, login.stderr


def test_a_non_superuser_agent_stores_no_password_hashes_and_a_corrupt_object_is_caught(
    pg: Cluster, tmp_path: Path, key_file: Path
) -> None:
    agent = f"g{SUFFIX}_agent"
    db = unique_db("unpriv")
    pg.psql("postgres", f'create role {agent} login; create database "{db}" owner {agent}')
    pg.psql(db, f"set role {agent}; create table t (x int); insert into t values (1)")
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=key_file)
    config.write_text(config.read_text().replace("user=postgres", f"user={agent}"))
    try:
        made = cli_json(config, "backup", "--database", db)
        assert made["globals"]["role_passwords"] is False
        manifest = Manifest.from_json((repo / "backups" / db / made["id"] / "manifest.json").read_bytes())
        found = anyio.run(read_globals, manifest, LocalStore(repo), KeyRing(load_master_key(key_file)))
        assert agent in found.roles
        assert not any(role.has_password for role in found.roles.values())
        assert found.roles["postgres"].options  # attributes are there, only the hash is not
        # Validation's checks of the object (verify.py calls these): a flipped byte passes quick, fails full.
        store, keyring = LocalStore(repo), KeyRing(load_master_key(key_file))
        assert anyio.run(check_globals_object, manifest, store) is not None
        assert anyio.run(verify_globals, manifest, store, keyring) is not None
        stored = repo / made["globals"]["object_key"]
        data = bytearray(stored.read_bytes())
        data[-20] ^= 0x01
        stored.write_bytes(bytes(data))
        assert anyio.run(check_globals_object, manifest, store) is not None
        with pytest.raises(IntegrityError, match="does not verify"):
            anyio.run(verify_globals, manifest, store, keyring)
    finally:
        pg.psql("postgres", f'drop database if exists "{db}"; drop role if exists {agent}')


def test_a_backup_without_globals_still_lists_validates_and_restores(
    pg: Cluster, tmp_path: Path, key_file: Path
) -> None:
    """What an agent before globals wrote: no "globals" in the manifest and no object beside the data."""
    db = unique_db("nogl")
    pg.psql("postgres", f'create database "{db}"')
    pg.psql(db, "create table t (x int); insert into t select generate_series(1, 100)")
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=key_file)
    made = cli_json(config, "backup", "--database", db)
    folder = repo / "backups" / db / str(made["id"])
    doc = json.loads((folder / "manifest.json").read_text())
    del doc["globals"]
    (folder / "manifest.json").write_text(json.dumps(doc))
    (folder / "globals").unlink()
    assert [m["id"] for m in cli_json(config, "list", "--database", db)] == [made["id"]]
    check = run_cli(config, "validate", str(made["id"]), "--level", "full")
    assert check.returncode == 0, check.stderr
    refused = run_cli(config, "restore", str(made["id"]), "--target-database", f"{db}_x", "--with-globals")
    assert refused.returncode == 1
    assert "has no globals" in refused.stderr
    restored = run_cli(config, "restore", str(made["id"]), "--target-database", f"{db}_r")
    assert restored.returncode == 0, restored.stderr
    assert pg.psql(f"{db}_r", "select sum(x) from t").strip() == "5050"
    pg.psql("postgres", f'drop database "{db}_r"; drop database "{db}"')


def test_a_failed_globals_dump_leaves_nothing(pg: Cluster, tmp_path: Path, key_file: Path) -> None:
    """pg_dumpall missing from pg_bin_dir: the data was already stored, and goes again with the lease."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pg_dump", "pg_restore"):
        (bin_dir / tool).symlink_to(PG_BIN / tool)
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=key_file)
    config.write_text(config.read_text().replace("[database]\n", f'[database]\npg_bin_dir = "{bin_dir}"\n', 1))
    proc = run_cli(config, "backup", "--database", "postgres")
    assert proc.returncode == 1
    assert "pg_dumpall" in proc.stderr
    assert [p for p in repo.rglob("*") if p.is_file()] == []
