"""What backup_bench.py measures with: the databases, the moto S3 server, and per-process wall time, CPU time
and peak RSS for one-shot processes (wait4 plus a VmHWM poller) and for the long-running daemon (/proc).

Peak RSS is never taken from wait4's ``ru_maxrss``: a forked child inherits its parent's high-water mark
(the benchmark's own Python would show up as the agent's), and ``ru_maxrss`` folds in the largest waited-for
descendant (pg_dump) as well. ``VmHWM`` in /proc/PID/status is the process's own, per exec'd image.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kybdr_agent.postgres.cluster import PG_BIN, Cluster  # noqa: E402
from tests.daemon_support import Daemon, UnixHTTPConnection, http_request, start_daemon  # noqa: E402
from tests.support import MotoServer, start_moto_server  # noqa: E402

DATASET_B = ROOT.parent / "shared" / "bench" / "dataset-b.sh"
HWM_POLL_SECONDS = 0.02
CLK_TCK = os.sysconf("SC_CLK_TCK")
REQUEST_TIMEOUT_SECONDS = 6 * 3600.0
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}

MIXED_SQL = """
update pgbench_accounts set filler = md5(aid::text) || md5((aid * 7)::text) where aid % 3 = 0;
create table ledger (
    id bigint primary key, account bigint, booked_at timestamptz, amount numeric(14, 2),
    memo text, attributes jsonb
);
insert into ledger
select g, 1 + g % 100000, timestamptz '2024-01-01' + g * interval '13 seconds', (g * 7919 % 1000000) / 100.0,
       md5(g::text) || ' transfer ' || (g % 977),
       jsonb_build_object('channel', (array['web', 'api', 'branch', 'atm'])[1 + g % 4], 'risk', g % 101,
                          'ref', md5((g * 31)::text))
from generate_series(1::bigint, {ledger_rows}) g;
vacuum analyze;
"""


@dataclass(frozen=True)
class Measurement:
    """One timed run: wall seconds, CPU seconds (user+sys of the whole process tree), the agent's peak RSS."""

    seconds: float
    cpu_seconds: float
    peak_rss_kib: int | None = None
    stored_bytes: int | None = None  # what the run left in its target (file, folder or bucket)
    idle_rss_kib: int | None = None  # the daemon's RSS when the request was sent


# --- databases --------------------------------------------------------------------------------------------


def pg_env(cluster: Cluster, database: str | None = None) -> dict[str, str]:
    """The environment of psql/pgbench/pg_dump run against ``cluster`` (server binaries first on PATH)."""
    env = {**os.environ, **cluster.env(), "PATH": f"{PG_BIN}:{os.environ.get('PATH', '')}"}
    if database:
        env["PGDATABASE"] = database
    return env


def build_dataset_b(cluster: Cluster, name: str, scale: int) -> None:
    """The shared dataset B script (pgbench at ``scale`` with a filler that compresses ~3×)."""
    if not DATASET_B.exists():
        raise RuntimeError(f"{DATASET_B} not found (dataset B's builder lives in the shared bench folder)")
    proc = subprocess.run(
        ["bash", str(DATASET_B), name, str(scale)], env=pg_env(cluster), capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dataset-b.sh failed ({proc.returncode}): {proc.stderr.strip()}")


def build_database(cluster: Cluster, name: str, scale: int) -> int:
    """The older mixed data set (pgbench plus a ledger with timestamps, numerics and jsonb); control_bench.py
    uses it. Returns the database's size in bytes."""
    cluster.psql("postgres", f"create database {name}")
    subprocess.run(
        [str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale), "--unlogged-tables", name],
        env=pg_env(cluster),
        check=True,
        capture_output=True,
    )
    cluster.psql(name, MIXED_SQL.format(ledger_rows=15_000 * scale))
    return int(cluster.psql(name, "select pg_database_size(current_database())"))


def dump_size(cluster: Cluster, name: str) -> int:
    """Bytes of ``pg_dump -Fc -Z0`` (this also warms the page cache before the timed rounds)."""
    out = subprocess.run(
        f"{PG_BIN}/pg_dump -Fc -Z0 | wc -c", shell=True, env=pg_env(cluster, name), check=True, capture_output=True
    )
    return int(out.stdout.strip())


# --- one-shot processes -----------------------------------------------------------------------------------


def install_bytecode(package: Path = ROOT / "kybdr_agent") -> None:
    """Byte-compile the agent's package once, as pip does when it installs it, so a one-shot command is timed
    as an installed agent runs. From a checkout under ``PYTHONDONTWRITEBYTECODE=1`` (set on the machines
    these figures come from) every start compiled ~100 modules again: ~0.12 CPU-s of each CLI backup."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True, stdout=subprocess.DEVNULL)


def read_hwm_kib(pid: int) -> int | None:
    """``VmHWM`` of a live process; None once it has exited (a zombie has no memory lines)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class HwmPoller(threading.Thread):
    """Reads a child's VmHWM every ~20 ms until it exits and keeps the last value read: VmHWM only grows
    within one exec'd image, and the last reading is the exec'd program's, not the fork's copy of ours."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.last_kib: int | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            value = read_hwm_kib(self.pid)
            if value is None:
                return
            self.last_kib = value
            if self.done.wait(HWM_POLL_SECONDS):
                return


def run_process(argv: list[str] | str, env: dict[str, str], *, shell: bool = False, rss: bool = False) -> Measurement:
    """Run to completion; CPU from wait4 (the child plus every descendant it waited for, pg_dump included)."""
    if shell:  # bash, so a failing pg_dump fails the pipeline
        argv = ["bash", "-o", "pipefail", "-c", str(argv)]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    poller = HwmPoller(proc.pid) if rss else None
    if poller:
        poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if poller:
        poller.done.set()
        poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv!r} failed ({proc.returncode}): {stderr.strip()}")
    return Measurement(elapsed, usage.ru_utime + usage.ru_stime, poller.last_kib if poller else None)


# --- the daemon -------------------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of the process (all its threads) plus cutime+cstime of the children it has reaped."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17.
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


def reset_hwm(pid: int) -> None:
    """Linux ≥ 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


class AgentDaemon:
    """``kybdr-agent run`` started once; each timed backup is one ``POST /v1/backup?wait=true``."""

    def __init__(self, config: Path, socket_path: Path, workdir: Path, env: dict[str, str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.daemon: Daemon = start_daemon(config, socket_path, workdir, env=env)
        self.pid = self.daemon.process.pid

    def backup(self, database: str) -> tuple[Measurement, dict[str, Any]]:
        """Time the request; CPU and the VmHWM reset/read around it (pg_dump, a reaped child, lands in
        cutime/cstime by the time the job answers)."""
        reset_hwm(self.pid)
        idle = read_hwm_kib(self.pid)  # just reset: the current RSS
        cpu_before = proc_cpu_seconds(self.pid)
        conn = UnixHTTPConnection(str(self.daemon.socket_path), timeout=REQUEST_TIMEOUT_SECONDS)
        start = time.perf_counter()
        resp = http_request(conn, "POST", "/v1/backup?wait=true", {"database": database})
        elapsed = time.perf_counter() - start
        hwm = read_hwm_kib(self.pid)
        cpu = proc_cpu_seconds(self.pid) - cpu_before
        jobs = resp.body.get("jobs", []) if isinstance(resp.body, dict) else []
        if resp.status != 200 or len(jobs) != 1 or jobs[0]["status"] != "succeeded":
            raise RuntimeError(f"daemon backup failed ({resp.status}): {resp.body}\n{self.daemon.log()[-4000:]}")
        return Measurement(elapsed, cpu, hwm, idle_rss_kib=idle), jobs[0].get("result") or {}

    def stop(self) -> None:
        self.daemon.stop()
        self.daemon.notify.close()


# --- S3 ---------------------------------------------------------------------------------------------------


class MotoS3:
    """A moto server with the benchmark's buckets; emptied between runs so its memory stays small."""

    def __init__(self, buckets: list[str]) -> None:
        self.server: MotoServer = start_moto_server()
        self.endpoint = self.server.endpoint
        self.client = self.server.client()
        for bucket in buckets:
            self.client.create_bucket(Bucket=bucket)

    def empty(self, bucket: str) -> int:
        """Delete every object and open upload; returns the bytes the objects held."""
        stored = 0
        for upload in self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            self.client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                stored += obj["Size"]
                self.client.delete_object(Bucket=bucket, Key=obj["Key"])
        return stored

    def repository(self, bucket: str, prefix: str) -> str:
        """The agent's [repository] section for ``s3://bucket/prefix`` on this server."""
        return (
            f'url = "s3://{bucket}/{prefix}"\nendpoint_url = "{self.endpoint}"\n'
            'region = "us-east-1"\naddressing_style = "path"\n'
        )

    def stop(self) -> None:
        self.server.stop()
