"""What ``archive_command = 'kybdr-agent wal-push %p'`` costs PostgreSQL per WAL file, with the agent up.

    .venv/bin/python benchmarks/wal_push_bench.py [--pushes 60] [--out DIR]

Starts a throwaway cluster (16 MiB segments, the default) and ``kybdr-agent run`` on it with ``[wal] mode =
"archive_command"`` and a folder repository, so the agent's shipper seals and stores what is pushed while the
next push runs, as in production. The segments are real: ``--pushes`` distinct files PostgreSQL wrote
(``insert`` + ``pg_switch_wal()``), copied out of ``pg_wal`` once. Each push is the command PostgreSQL would
run — a new process of the console script as pip generates it (``from kybdr_agent.entry import main``), one
file, one 200 — timed from spawn to exit; the median and p99 are over every push.

Beside it, in the same session and interleaved per segment: what the same process costs with nothing to do
(``python -c pass`` through the same interpreter and site), the naive ``cp %p DIR/%f`` a minimal setup uses
(no fsync: it promises less), ``dd conv=fsync`` (the copy made as durable as the agent's), and importing the
agent's CLI (what a push through ``kybdr_agent.cli`` would pay before doing anything). Also ``-X importtime``
of the push path: the modules it loads and their total. Prints a Markdown table and writes JSON to --out.

Why per-process wall time: it is what PostgreSQL's archiver waits for, one file at a time; at 16 MiB a file,
the push time bounds the WAL rate archiving can keep up with (16 MiB / median).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_support import install_bytecode  # noqa: E402
from kybdr_agent.postgres.cluster import Cluster, start_cluster  # noqa: E402
from tests.daemon_support import start_daemon  # noqa: E402

SEGMENT_SIZE = 16 << 20


def _console_script(where: Path) -> Path:
    """The script pip writes for ``kybdr-agent = "kybdr_agent.entry:main"`` (the checkout's venv may still
    hold one made for the old entry point until it is reinstalled)."""
    script = where / "kybdr-agent"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom kybdr_agent.entry import main\n"
        "if __name__ == '__main__':\n    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n    sys.exit(main())\n"
    )
    script.chmod(0o755)
    return script


def _segments(cluster: Cluster, count: int, dest: Path) -> list[Path]:
    """``count`` distinct segments PostgreSQL wrote, each copied out as soon as it is complete (a checkpoint
    may recycle it)."""
    cluster.psql("postgres", "create table if not exists t (id serial primary key, pad text)")
    dest.mkdir(parents=True, exist_ok=True)
    copies = []
    for _ in range(count):
        sql = "insert into t (pad) select repeat('x', 500) from generate_series(1, 200); "
        name = cluster.psql("postgres", sql + "select pg_walfile_name(pg_switch_wal());").strip()
        shutil.copyfile(cluster.data_dir / "pg_wal" / name, dest / name)
        copies.append(dest / name)
    return copies


def _timed(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]!r}… failed ({done.returncode}): {done.stderr.decode(errors='replace').strip()}")
    return elapsed


def _import_profile(env: dict[str, str]) -> dict[str, Any]:
    """-X importtime of the push path in a fresh interpreter: every module it adds beyond start-up."""
    probe = "import kybdr_agent.entry, kybdr_agent.wal.push_client"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], env=env, capture_output=True, text=True)
    base = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=env, capture_output=True, text=True)
    startup = {line.split("|")[-1].strip() for line in base.stderr.splitlines() if "|" in line}
    modules, total_us = [], 0
    for line in out.stderr.splitlines():
        if "|" not in line or line.startswith("import time: self"):
            continue
        self_us, _cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        if name.strip() not in startup:
            modules.append(name.strip())
            total_us += int(self_us)
    heavy = sorted(m for m in modules if m.split(".")[0] in ("pydantic", "aiohttp", "anyio", "structlog", "asyncio"))
    return {"modules": len(modules), "self_ms_total": round(total_us / 1000, 1), "heavy": heavy}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pushes", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    install_bytecode()
    work = Path(tempfile.mkdtemp(prefix="kybdr-walbench-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KYBDR_")}
    results: dict[str, list[float]] = {
        "wal-push": [],
        "python -c pass": [],
        "cp": [],
        "dd conv=fsync": [],
        "import cli": [],
    }
    try:
        with start_cluster() as cluster:
            segments = _segments(cluster, args.pushes, work / "segments")
            socket_path, config = work / "control.sock", work / "agent.toml"
            key = work / "master.key"
            key.write_text(os.urandom(32).hex() + "\n")
            key.chmod(0o600)
            config.write_text(
                f'[backup]\nbackup_dir = "{work / "state"}"\n'
                f'[database]\ndsn = "host={cluster.socket_dir} port={cluster.port} user=postgres"\n'
                f'[encryption]\nkey_file = "{key}"\n[repository]\nurl = "file://{work / "repo"}"\n'
                f'[control]\nsocket = "{socket_path}"\n[drill]\nschedule = ""\n'
                f'[wal]\nenabled = true\nmode = "archive_command"\nspool_dir = "{work / "spool"}"\n'
                f"max_spool_bytes = {(args.pushes + 4) * SEGMENT_SIZE}\n"
            )
            script = _console_script(work)
            daemon = start_daemon(config, socket_path, work, env=env)
            try:
                (work / "copies").mkdir()
                for i, segment in enumerate(segments):
                    argv = [str(script), "--config", str(config), "wal-push", str(segment)]
                    results["wal-push"].append(_timed(argv, env))
                    results["python -c pass"].append(_timed([sys.executable, "-c", "pass"], env))
                    results["cp"].append(_timed(["cp", str(segment), str(work / "copies" / f"cp{i}")], env))
                    dd = [
                        "dd",
                        f"if={segment}",
                        f"of={work / 'copies' / f'dd{i}'}",
                        "bs=1M",
                        "conv=fsync",
                        "status=none",
                    ]
                    results["dd conv=fsync"].append(_timed(dd, env))
                    if i % 4 == 0:  # a slow one: fewer samples
                        results["import cli"].append(
                            _timed([sys.executable, "-c", "import kybdr_agent.cli"], env, ROOT)
                        )
                    for copy in (work / "copies").iterdir():
                        copy.unlink()
            finally:
                daemon.stop()
            profile = _import_profile(env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {
        name: {
            "n": len(values),
            "median_ms": round(statistics.median(values) * 1000, 1),
            "p99_ms": round(_pct(values, 0.99) * 1000, 1),
        }
        for name, values in results.items()
    }
    # Paired (the two ran back to back): what a push adds to starting the same interpreter, less noisy than
    # either alone on a shared machine.
    added = [a - b for a, b in zip(results["wal-push"], results["python -c pass"], strict=True)]
    rows["wal-push minus python -c pass (paired)"] = {
        "n": len(added),
        "median_ms": round(statistics.median(added) * 1000, 1),
        "p99_ms": round(_pct(added, 0.99) * 1000, 1),
    }
    push = rows["wal-push"]
    report = {
        "segment_bytes": SEGMENT_SIZE,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "rows": rows,
        "import_profile": profile,
        "archive_rate_mib_s_at_median": round(16 / (push["median_ms"] / 1000), 1),
    }
    print("| per 16 MiB WAL file | n | median ms | p99 ms |\n|---|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['n']} | {row['median_ms']} | {row['p99_ms']} |")
    print(
        f"\nwal-push path: {profile['modules']} modules beyond start-up, {profile['self_ms_total']} ms of imports; "
        f"heavy modules: {profile['heavy'] or 'none'}; archiving keeps up to "
        f"{report['archive_rate_mib_s_at_median']} MiB/s of WAL at the median"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.out / f"wal-push-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
