"""Measure ``kybdr-agent backup`` against the shell pipeline it replaces, in the same session.

    .venv/bin/python benchmarks/backup_bench.py [--scale 100] [--runs 3] [--s3-scale 20]

Builds realistic mixed data on a throwaway cluster (pgbench tables with a third of the filler rewritten to
md5 text, plus timestamp/numeric/jsonb/text rows — plain pgbench compresses ~100× and would hide the
codec's cost), then times, interleaved and repeated:

    floor          pg_dump -Fc -Z0 > /dev/null
    baseline       pg_dump -Fc -Z0 | zstd -3 > file
    agent          kybdr-agent backup (zstd-3 + AES-256-GCM + SHA-256 + manifest) into a local folder
    agent_zstd_t0  the same with compression.threads = 0 (zstd in the pipeline's own worker thread)

and reports medians as ratios to the baseline, with the agent's peak RSS (from wait4). It then doubles the
database and measures peak RSS again (it must stay flat), and times a backup to a moto S3 server on a
smaller database against the same shell baseline. Machines here are shared and noisy: read the ratios, not
the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kybdr_agent.postgres.cluster import PG_BIN, Cluster, start_cluster  # noqa: E402
from tests.support import start_moto_server  # noqa: E402

AGENT = [sys.executable, "-m", "kybdr_agent"]

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


@dataclass
class Timing:
    seconds: float
    max_rss_kib: int = 0


def run_timed(argv: list[str] | str, *, env: dict[str, str], shell: bool = False) -> Timing:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{argv!r} failed ({proc.returncode}): {stderr}")
    return Timing(elapsed, usage.ru_maxrss)


def build_database(cluster: Cluster, name: str, scale: int) -> int:
    env = {**os.environ, **cluster.env()}
    cluster.psql("postgres", f"create database {name}")
    subprocess.run(
        [str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale), "--unlogged-tables", name],
        env=env,
        check=True,
        capture_output=True,
    )
    cluster.psql(name, MIXED_SQL.format(ledger_rows=15_000 * scale))
    return int(cluster.psql(name, "select pg_database_size(current_database())"))


def dump_size(cluster: Cluster, name: str) -> int:
    env = {**os.environ, **cluster.env(), "PGDATABASE": name}
    out = subprocess.run(
        f"{PG_BIN}/pg_dump -Fc -Z0 | wc -c",
        shell=True,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip())


def write_config(workdir: Path, cluster: Cluster, repository: str, key: Path, zstd_threads: int = 1) -> Path:
    config = workdir / f"agent-{secrets.token_hex(3)}.toml"
    config.write_text(
        f'[backup]\nbackup_dir = "{workdir}/state"\n\n'
        f'[database]\ndsn = "host={cluster.socket_dir} port={cluster.port} user=postgres"\n\n'
        f'[encryption]\nkey_file = "{key}"\n\n[compression]\nthreads = {zstd_threads}\n\n'
        f"[repository]\n{repository}\n"
    )
    return config


def compare(cluster: Cluster, name: str, workdir: Path, key: Path, runs: int) -> dict[str, Any]:
    env = {**os.environ, **cluster.env(), "PGDATABASE": name}
    repo = workdir / "repo"
    config = write_config(workdir, cluster, f'url = "file://{repo}"', key)
    config_t0 = write_config(workdir, cluster, f'url = "file://{repo}"', key, zstd_threads=0)
    out_file = workdir / "baseline.dump.zst"
    results: dict[str, list[Timing]] = {"floor": [], "baseline": [], "agent": [], "agent_zstd_t0": []}
    for _ in range(runs):
        results["floor"].append(run_timed(f"{PG_BIN}/pg_dump -Fc -Z0 > /dev/null", env=env, shell=True))
        results["baseline"].append(
            run_timed(f"{PG_BIN}/pg_dump -Fc -Z0 | zstd -q -3 > {out_file}", env=env, shell=True)
        )
        for variant, cfg in (("agent", config), ("agent_zstd_t0", config_t0)):
            results[variant].append(run_timed([*AGENT, "--config", str(cfg), "backup", "--database", name], env=env))
            shutil.rmtree(repo, ignore_errors=True)
    baseline_stored = out_file.stat().st_size
    out_file.unlink()
    med = {k: statistics.median(t.seconds for t in v) for k, v in results.items()}
    return {
        "seconds": {k: round(v, 2) for k, v in med.items()},
        "all_seconds": {k: [round(t.seconds, 2) for t in v] for k, v in results.items()},
        "agent_vs_baseline": round(med["agent"] / med["baseline"], 3),
        "agent_zstd_t0_vs_baseline": round(med["agent_zstd_t0"] / med["baseline"], 3),
        "agent_vs_floor": round(med["agent"] / med["floor"], 3),
        "baseline_vs_floor": round(med["baseline"] / med["floor"], 3),
        "agent_peak_rss_mib": round(max(t.max_rss_kib for t in results["agent"]) / 1024, 1),
        "agent_zstd_t0_peak_rss_mib": round(max(t.max_rss_kib for t in results["agent_zstd_t0"]) / 1024, 1),
        "baseline_stored_bytes": baseline_stored,
    }


def s3_compare(cluster: Cluster, name: str, workdir: Path, key: Path, runs: int) -> dict[str, Any]:
    import boto3

    moto = start_moto_server()
    endpoint = moto.endpoint
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        s3.create_bucket(Bucket="bench")
        env = {
            **os.environ,
            **cluster.env(),
            "PGDATABASE": name,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
        }
        config = write_config(
            workdir,
            cluster,
            f'url = "s3://bench/agent"\nendpoint_url = "{endpoint}"\nregion = "us-east-1"\naddressing_style = "path"',
            key,
        )
        out_file = workdir / "baseline.dump.zst"
        agent: list[Timing] = []
        baseline: list[Timing] = []
        for _ in range(runs):
            baseline.append(run_timed(f"{PG_BIN}/pg_dump -Fc -Z0 | zstd -q -3 > {out_file}", env=env, shell=True))
            agent.append(run_timed([*AGENT, "--config", str(config), "backup", "--database", name], env=env))
            for obj in s3.list_objects_v2(Bucket="bench").get("Contents", []):
                s3.delete_object(Bucket="bench", Key=obj["Key"])
        out_file.unlink()
        a = statistics.median(t.seconds for t in agent)
        b = statistics.median(t.seconds for t in baseline)
        return {
            "seconds": {"baseline_to_file": round(b, 2), "agent_to_moto": round(a, 2)},
            "agent_vs_baseline": round(a / b, 3),
            "agent_peak_rss_mib": round(max(t.max_rss_kib for t in agent) / 1024, 1),
        }
    finally:
        moto.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=100, help="pgbench scale of the main database (100 ≈ 1 GB dump)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--s3-scale", type=int, default=20, help="pgbench scale of the database sent to moto")
    parser.add_argument("--skip-double", action="store_true", help="skip the doubled database (RSS flatness)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="kybdr-bench-"))
    key = workdir / "master.key"
    key.write_text(secrets.token_hex(32))
    key.chmod(0o600)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "nproc": os.cpu_count()}
    cluster = start_cluster()
    try:
        print(f"building scale {args.scale} database …", flush=True)
        report["db_bytes"] = build_database(cluster, "bench", args.scale)
        report["dump_bytes"] = dump_size(cluster, "bench")
        print(f"dump is {report['dump_bytes'] / 1e9:.2f} GB; timing {args.runs} interleaved runs …", flush=True)
        report["folder"] = compare(cluster, "bench", workdir, key, args.runs)
        print(json.dumps(report["folder"], indent=2), flush=True)
        if not args.skip_double:
            print(f"building scale {args.scale * 2} database for the memory check …", flush=True)
            build_database(cluster, "bench2x", args.scale * 2)
            report["dump_bytes_2x"] = dump_size(cluster, "bench2x")
            report["folder_2x"] = compare(cluster, "bench2x", workdir, key, 1)
            cluster.psql("postgres", "drop database bench2x")
            print(json.dumps(report["folder_2x"], indent=2), flush=True)
        print(f"building scale {args.s3_scale} database for moto …", flush=True)
        build_database(cluster, "bench_s3", args.s3_scale)
        report["s3_dump_bytes"] = dump_size(cluster, "bench_s3")
        report["s3"] = s3_compare(cluster, "bench_s3", workdir, key, args.runs)
        print(json.dumps(report["s3"], indent=2), flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    path = args.out / f"backup-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
