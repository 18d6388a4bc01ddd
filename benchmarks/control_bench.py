"""Control API latency while a large backup runs at full speed, against the same with the agent idle.

    .venv/bin/python benchmarks/control_bench.py [--scale 60] [--samples 300]

Starts a throwaway cluster with realistic mixed data, runs ``kybdr-agent run`` on a local repository,
and times sequential ``GET /v1/backup/stats``, ``GET /healthz`` and ``GET /metrics`` (Prometheus text) requests
over the unix socket: first
idle, then while a backup of the whole database streams (pg_dump → zstd → AES-GCM → folder). Reports
p50/p99 per endpoint and phase. The target: p99 under 10 ms during the backup — proof that compression and
encryption never run on the event loop.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.backup_bench import build_database  # noqa: E402
from kybdr_agent.postgres.cluster import start_cluster  # noqa: E402
from tests.daemon_support import Daemon, UnixHTTPConnection, start_daemon  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


PATHS = ("/v1/backup/stats", "/healthz", "/metrics")


def timed_get(agent: Daemon, path: str) -> float:
    start = time.perf_counter()
    if path == "/metrics":  # text, not JSON: read it whole without parsing
        conn = UnixHTTPConnection(str(agent.socket_path))
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        elapsed = (time.perf_counter() - start) * 1000
        assert resp.status == 200, body[:200]
        return elapsed
    answer = agent.request("GET", path)
    elapsed = (time.perf_counter() - start) * 1000
    assert answer.status == 200, answer.body
    return elapsed


def sample(agent: Daemon, count: int, while_job: str | None = None) -> dict[str, list[float]]:
    """Alternate the endpoints, so both see the same phase; with ``while_job``, until that job ends."""
    latencies: dict[str, list[float]] = {path: [] for path in PATHS}
    rounds = 0
    while while_job is not None or rounds < count:
        for path in PATHS:
            latencies[path].append(timed_get(agent, path))
        rounds += 1
        if (
            while_job is not None
            and rounds % 10 == 0
            and agent.request("GET", f"/v1/jobs/{while_job}").body["status"] != "running"
        ):
            break
    return latencies


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 0.5), 2),
        "p99_ms": round(percentile(values, 0.99), 2),
        "max_ms": round(max(values), 2),
        "mean_ms": round(statistics.fmean(values), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=60, help="pgbench scale (60 ≈ 0.8 GB dump)")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    workdir = Path(tempfile.mkdtemp(prefix="kybdr-ctlbench-"))
    key = workdir / "master.key"
    key.write_text(secrets.token_hex(32))
    key.chmod(0o600)
    cluster = start_cluster()
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    agent: Daemon | None = None
    try:
        print(f"building scale {args.scale} database …", flush=True)
        build_database(cluster, "bench", args.scale)
        config = workdir / "agent.toml"
        socket_path = workdir / "control.sock"
        config.write_text(
            f'[backup]\nbackup_dir = "{workdir / "state"}"\n\n'
            f'[database]\ndsn = "host={cluster.socket_dir} port={cluster.port} user=postgres"\n'
            'databases = ["bench"]\n\n'
            f'[encryption]\nkey_file = "{key}"\n\n[repository]\nurl = "file://{workdir / "repo"}"\n\n'
            f'[control]\nsocket = "{socket_path}"\n\n[drill]\nschedule = ""\n'
        )
        agent = start_daemon(config, socket_path, workdir)
        # One backup first, so /v1/backup/stats has a manifest to read in both phases.
        first = agent.request("POST", "/v1/backup?wait=true", {}).body["jobs"][0]
        assert first["status"] == "succeeded", first
        for path, values in sample(agent, args.samples).items():
            report[f"idle {path}"] = summary(values)
        job = agent.request("POST", "/v1/backup", {}).body["jobs"][0]
        time.sleep(0.5)  # let pg_dump and the pipeline reach full speed
        for path, values in sample(agent, 0, while_job=job["id"]).items():
            report[f"during backup {path}"] = summary(values)
        done = agent.wait_job(job["id"])
        report["backup_seconds"] = done["result"]["duration_seconds"]
        report["dump_bytes"] = done["result"]["dump_bytes"]
    finally:
        if agent is not None:
            agent.stop()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    path = args.out / f"control-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
