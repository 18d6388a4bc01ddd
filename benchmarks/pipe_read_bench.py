"""What reading pg_dump's pipe costs, with pg_dump's stdout buffered by stdio's default or by ``stdbuf``.

    .venv/bin/python benchmarks/pipe_read_bench.py [--scale 30] [--runs 6]

Builds dataset B on a throwaway cluster, then alternates two ways of running ``pg_dump -Fc -Z0`` into a pipe
that the agent's ``PipeReader`` drains in 1 MiB reads (what the backup pump does, without the compression):
plain, and under ``stdbuf -o 512K`` (``backup/pgdump.py``'s ``buffered_stdout``). Reported per variant, sorted:
the reading thread's CPU seconds (``time.thread_time``), pg_dump's CPU seconds (``RUSAGE_CHILDREN``), wall
seconds. Why it exists: the backup benchmark's wall times on a shared 2-core host move by
±20 % between rounds, far more than this difference, while thread and child CPU time of one isolated stage
stay within a few per cent.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_support import build_dataset_b, pg_env  # noqa: E402
from kybdr_agent.backup.pgdump import STDOUT_BUFFER, PipeReader  # noqa: E402
from kybdr_agent.postgres.cluster import PG_BIN, start_cluster  # noqa: E402


def one_dump(env: dict[str, str], *, buffered: bool) -> tuple[float, float, float, int, int]:
    """Reader CPU s, pg_dump CPU s, wall s, bytes, reads."""
    read_fd, write_fd = os.pipe()
    argv = [str(PG_BIN / "pg_dump"), "-Fc", "-Z0"]
    if buffered:
        argv = ["stdbuf", "-o", STDOUT_BUFFER, *argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    thread_start, wall_start = time.thread_time(), time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=write_fd)
    os.close(write_fd)
    reader = PipeReader(read_fd)
    total = reads = 0
    while chunk := reader.read(1 << 20):
        total += len(chunk)
        reads += 1
    reader.close()
    if proc.wait() != 0:
        raise RuntimeError(f"pg_dump exited {proc.returncode}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return time.thread_time() - thread_start, child, time.perf_counter() - wall_start, total, reads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=30, help="dataset B's pgbench scale (30 ≈ 0.3 GB dump)")
    parser.add_argument("--runs", type=int, default=6, help="alternating runs of each variant")
    args = parser.parse_args()
    cluster = start_cluster()
    try:
        build_dataset_b(cluster, "pipebench", args.scale)
        env = pg_env(cluster, "pipebench")
        results: dict[str, list[tuple[float, float, float, int, int]]] = {"plain": [], "stdbuf": []}
        for _ in range(args.runs):
            for name in results:
                results[name].append(one_dump(env, buffered=name == "stdbuf"))
    finally:
        cluster.stop()
    dump_bytes = results["plain"][0][3]
    print(f"dataset B at scale {args.scale}: dump {dump_bytes / 1e9:.2f} GB; {args.runs} alternating runs each\n")
    print("| pg_dump stdout | reader CPU s (median) | pg_dump CPU s (median) | wall s (median) |")
    print("|---|---:|---:|---:|")
    for name, runs in results.items():
        label = "stdio default (4 KiB)" if name == "plain" else f"`stdbuf -o {STDOUT_BUFFER}`"
        reader, child, wall = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"| {label} | {reader:.3f} | {child:.2f} | {wall:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
