"""A table of a few hundred MB through the whole path, with the agent's memory bounded throughout."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from kybdr_agent.postgres.cluster import Cluster
from tests.support import KYBDR, agent_config, database_fingerprint, run_cli, unique_db

LARGE_SQL = """
create table wide (
    id bigint primary key, ref text, amount numeric(14, 2), at timestamptz, attrs jsonb, body text
);
insert into wide
select g, md5(g::text), (g * 7919 % 1000000) / 100.0, timestamptz '2024-01-01' + g * interval '1 second',
       jsonb_build_object('k', g % 97, 'h', md5((g * 3)::text)),
       md5((g * 5)::text) || ' ' || md5((g * 11)::text) || ' ' || (g % 1000)::text
from generate_series(1::bigint, {rows}) g;
select lo_from_bytea(0, decode(repeat(md5('x'), 20000), 'hex'));
"""

# Peak RSS the agent may reach on this dump: Python and its libraries (~60 MiB) plus the bounded buffers:
# ~95-105 MiB measured, the same for a 110 MiB dump as for a 225 MiB one. The point is that it does not grow
# with the dump: the dump here is half as large again as this bound, so an agent that held it would exceed
# the bound by far, and one that held the whole compressed object (~45 % of the dump) would exceed it too.
RSS_BOUND_MIB = 160
DUMP_OVER_BOUND = 1.5
ROWS = 1_350_000  # ~197 bytes of dump and ~222 bytes of table each: a ~255 MiB dump


def _high_water_kib(pid: int) -> int:
    """The process's own peak RSS (VmHWM), 0 once it is gone.

    Not ``wait4``'s ``ru_maxrss``: Linux carries the high-water mark of the memory image a child replaces
    at exec into it, and a child forked (or vforked) from a long pytest session starts with that
    session's peak — hundreds of MiB that are not the agent's.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow
def test_several_hundred_mb_table_round_trip_with_bounded_memory(pg: Cluster, tmp_path: Path, key_file: Path) -> None:
    name = unique_db("large")
    pg.psql("postgres", f'create database "{name}"')
    pg.psql(name, LARGE_SQL.format(rows=ROWS))
    table_bytes = int(pg.psql(name, "select pg_table_size('wide')"))
    assert table_bytes > DUMP_OVER_BOUND * RSS_BOUND_MIB * 2**20

    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=key_file)
    proc = subprocess.Popen(
        [*KYBDR, "--config", str(config), "backup", "--database", name, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    peak_kib = 0
    while proc.poll() is None:
        peak_kib = max(peak_kib, _high_water_kib(proc.pid))
        time.sleep(0.05)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert proc.stdout is not None
    made = json.loads(proc.stdout.read())
    assert made["dump_bytes"] > DUMP_OVER_BOUND * RSS_BOUND_MIB * 2**20
    peak_mib = peak_kib / 1024
    assert peak_mib < RSS_BOUND_MIB, f"agent peaked at {peak_mib:.0f} MiB on a {made['dump_bytes'] >> 20} MiB dump"

    assert run_cli(config, "validate", made["id"], "--level", "full").returncode == 0
    target = unique_db("large_restored")
    restored = run_cli(config, "restore", made["id"], "--target-database", target)
    assert restored.returncode == 0, restored.stderr
    assert database_fingerprint(pg, target) == database_fingerprint(pg, name)
    pg.psql("postgres", f'drop database "{target}"; drop database "{name}"')
