"""Multi-host DSNs and libpq's other parameters (issue 8), against the real PostgreSQL 15 cluster.

The DSN names a dead loopback port first and the test cluster second, as libpq allows. The agent's own
asyncpg session, pg_dump and pg_restore must all get through to the second, and ``config check`` must take
the libpq parameters the agent itself has no use for instead of refusing them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import pytest

from kybdr_agent.postgres.cluster import Cluster, free_port
from kybdr_agent.postgres.connection import Connection
from tests.support import agent_config, cli_json, create_mixed_database, database_fingerprint, run_cli, unique_db

# Parameters only pg_dump and pg_restore use, or that change nothing here; refused before issue 8.
LIBPQ_ONLY = {
    "channel_binding": "prefer",
    "load_balance_hosts": "disable",
    "sslnegotiation": "postgres",
    "require_auth": "scram-sha-256",
}


def _password_file(tmp_path: Path, pg: Cluster) -> Path:
    path = tmp_path / "pgpass"
    path.write_text(pg.superuser_password + "\n")
    path.chmod(0o600)
    return path


def _uri(pg: Cluster, dead: int, **query: str) -> str:
    qs = "&".join(f"{key}={quote(value, safe='')}" for key, value in query.items())
    return f"postgresql://postgres@127.0.0.1:{dead},127.0.0.1:{pg.port}/postgres?{qs}"


def _keyvalue(pg: Cluster, dead: int, **more: str) -> str:
    extra = " ".join(f"{key}='{value}'" for key, value in more.items())
    return f"host=127.0.0.1,127.0.0.1 port={dead},{pg.port} user=postgres {extra}"


@pytest.mark.parametrize("form", [_uri, _keyvalue], ids=["uri", "keyvalue"])
def test_the_agents_session_skips_a_dead_first_host(pg: Cluster, tmp_path: Path, form: Any) -> None:
    dead = free_port()
    dsn = form(
        pg,
        dead,
        target_session_attrs="read-write",
        application_name="kybdr-multihost",
        options="-c work_mem=5MB",
    )
    connection = Connection.from_settings(dsn, _password_file(tmp_path, pg), None, 10.0)
    assert connection.child_env("postgres")["PGPORT"] == f"{dead},{pg.port}"  # libpq gets the whole list

    async def probe() -> tuple[Any, ...]:
        async with connection.connect("postgres") as conn:
            port = await conn.fetchval("select inet_server_port()")
            settings = await conn.fetchrow("select current_setting('application_name'), current_setting('work_mem')")
            return port, tuple(settings), connection.child_env("postgres", conn)

    port, settings, pinned = anyio.run(probe)
    assert port == pg.port
    assert settings == ("kybdr-multihost", "5MB")  # application_name and options reached the server
    # Children sent after this session go to the server it reached, not wherever libpq would choose.
    assert (pinned["PGHOST"], pinned["PGPORT"]) == ("127.0.0.1", str(pg.port))


def test_backup_and_restore_through_a_multi_host_dsn(pg: Cluster, tmp_path: Path) -> None:
    name = unique_db("multihost")
    create_mixed_database(pg, name, rows=300)
    dsn = _uri(pg, free_port(), target_session_attrs="read-write", application_name="kybdr-multihost", **LIBPQ_ONLY)
    config = agent_config(tmp_path, pg, repository=f'url = "file://{tmp_path / "repo"}"', key_file=None)
    config.write_text(
        config.read_text().replace(
            f'dsn = "host={pg.socket_dir} port={pg.port} user=postgres"',
            f'dsn = "{dsn}"\npassword_file = "{_password_file(tmp_path, pg)}"',
        )
    )
    made = cli_json(config, "backup", "--database", name)
    assert made["status"] == "completed"
    target = unique_db("multihost_restored")
    restored = run_cli(config, "restore", made["id"], "--target-database", target)
    assert restored.returncode == 0, restored.stderr
    assert database_fingerprint(pg, target) == database_fingerprint(pg, name)
    pg.psql("postgres", f'drop database "{target}"; drop database "{name}"')


def test_config_check_accepts_libpq_parameters_the_agent_does_not_use(pg: Cluster, tmp_path: Path) -> None:
    config = agent_config(
        tmp_path,
        pg,
        repository=f'url = "file://{tmp_path / "repo"}"',
        key_file=None,
        extra=f'\n[control]\nsocket = "{tmp_path / "control.sock"}"\n',
    )
    dsn = _keyvalue(
        pg, free_port(), target_session_attrs="any", keepalives_idle="30", sslpassword="pass phrase", **LIBPQ_ONLY
    )
    config.write_text(config.read_text().replace(f"host={pg.socket_dir} port={pg.port} user=postgres", dsn))
    proc = run_cli(config, "config", "check", "--json")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)["database"]["dsn"]
    assert all(f"{key}={value}" in shown for key, value in LIBPQ_ONLY.items())
    assert "pass phrase" not in proc.stdout + proc.stderr  # the client key's passphrase is masked
