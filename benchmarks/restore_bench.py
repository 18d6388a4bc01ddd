"""The agent's restore, streaming and ``--jobs N``, against the shell commands it replaces, in one session.

    .venv/bin/python benchmarks/restore_bench.py [--scale 100] [--runs 3] [--jobs 2] [--out DIR]

Builds dataset B (../shared/bench/dataset-b.sh; scale 100 ≈ 1.03 GB ``pg_dump -Fc -Z0``) on a throwaway
cluster, takes one agent backup of it to a folder repository (``kybdr-agent --local backup``: zstd -3,
AES-256-GCM, as the default configuration does), and writes the baselines' inputs once: the plain
``pg_dump -Fc -Z0`` file and the same archive through ``zstd -3``. Then each round restores that database
once per variant, in the same order, each into a fresh database ``restored`` on the same cluster:

    zstd -d | pg_restore      createdb; zstd -dc dump.zst | pg_restore --single-transaction --exit-on-error
    pg_restore -j N (file)    createdb; pg_restore -j N --exit-on-error dump          (the plain local file)
    pg_restore -j N (piped)   the same from dump.piped, which pg_dump wrote into a pipe, as the agent's backup is
    agent streaming           kybdr-agent --local restore ID --target-database restored
    agent --jobs N            kybdr-agent --local restore ID --target-database restored --jobs N

The piped file is what an agent backup decodes to: pg_dump writing into a pipe cannot seek back to put the
data blocks' offsets into the table of contents, so ``pg_restore -j`` reading it whole finds each table's
block by reading the chunk headers of every block before it (one chunk per row with -Z0), where ``pg_dump
-f`` writes the offsets. It is why ``restore --jobs N`` does not spool the whole archive: it streams the
pre-data and data sections in one transaction, then runs ``pg_restore -j N --section=post-data`` against
the archive's head (header and TOC) spooled to restore.spool_dir.

The baselines create their database inside the timed command because the agent creates its own (a scratch
database it renames at the end). Untimed, after each run: the restored tables are checked against the
source (row counts, relations) and ``restored`` is dropped, then a checkpoint, so no variant pays for the
previous one's dirty buffers.

Why it is built this way: the machine is shared and noisy, so variants are interleaved and every median is
divided by the medians of the two baselines from the same rounds. Reported per variant: median wall seconds,
both ratios, CPU seconds of the client process tree (zstd, pg_restore and its workers, the agent), CPU
seconds of the PostgreSQL cluster (where a restore's time mostly goes), the agent process's own peak RSS
(VmHWM, pg_restore excluded), and for ``--jobs N`` the spool's peak size and the two phases it dates (until
the spool is complete; pg_restore -j N reading it, until it is removed) — see restore_support.py. Prints a
Markdown table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_support import Measurement, build_dataset_b, pg_env, run_process  # noqa: E402
from benchmarks.restore_support import SpoolUse, SpoolWatcher, cluster_cpu_seconds  # noqa: E402
from kybdr_agent.postgres.cluster import PG_BIN, Cluster, start_cluster  # noqa: E402

AGENT = [sys.executable, "-m", "kybdr_agent"]
SOURCE = "bench"
TARGET = "restored"
SETTLE_SECONDS = 0.3  # after a run, before reading the cluster's CPU: the client's backend is still exiting
CHECK_SQL = (
    "select (select string_agg(relname || '/' || relkind::text, ',' order by relname) from pg_class "
    "where relnamespace = 'public'::regnamespace), (select count(*) from pgbench_accounts), "
    "(select count(*) from pgbench_tellers), (select count(*) from pgbench_branches)"
)


@dataclass(frozen=True)
class Run:
    measured: Measurement
    server_cpu_seconds: float
    spool: SpoolUse | None = None


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    command: str  # as the table shows it
    run: Callable[[], Run]


class Bench:
    """The cluster, the backup and the baselines' files every variant restores from."""

    def __init__(self, cluster: Cluster, workdir: Path, jobs: int) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.jobs = jobs
        self.env = pg_env(cluster)
        self.spool_dir = workdir / "spool"
        self.dump = workdir / "dump"
        self.dump_zst = workdir / "dump.zst"
        self.dump_piped = workdir / "dump.piped"
        key = workdir / "master.key"
        key.write_text(secrets.token_hex(32))
        key.chmod(0o600)
        self.config = workdir / "agent.toml"
        self.config.write_text(
            f'[backup]\nbackup_dir = "{workdir / "state"}"\n\n'
            f'[database]\ndsn = "host={cluster.socket_dir} port={cluster.port} user=postgres"\n\n'
            f'[encryption]\nkey_file = "{key}"\n\n[repository]\nurl = "file://{workdir / "repo"}"\n\n'
            f'[restore]\nspool_dir = "{self.spool_dir}"\n\n[drill]\nschedule = ""\n'
        )
        self.backup_id = ""
        self.expected = ""

    def prepare(self) -> dict[str, Any]:
        """One agent backup, the plain dump and its zstd -3 copy; what the source holds, for the checks."""
        agent = [*AGENT, "--config", str(self.config), "--local", "backup", "--database", SOURCE, "--json"]
        proc = subprocess.run(agent, env=self.env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"agent backup failed ({proc.returncode}): {proc.stderr.strip()}")
        manifest = json.loads(proc.stdout)
        self.backup_id = manifest["id"]
        subprocess.run([str(PG_BIN / "pg_dump"), "-Fc", "-Z0", "-f", str(self.dump), SOURCE], env=self.env, check=True)
        subprocess.run(["zstd", "-q", "-3", "-T1", str(self.dump), "-o", str(self.dump_zst)], check=True)
        piped = f"{PG_BIN}/pg_dump -Fc -Z0 {SOURCE} | cat > {self.dump_piped}"  # stdout a pipe: no data offsets
        subprocess.run(["bash", "-o", "pipefail", "-c", piped], env=self.env, check=True)
        self.expected = self.cluster.psql(SOURCE, CHECK_SQL)
        return {
            "backup_id": self.backup_id,
            "backup_dump_bytes": manifest["dump_bytes"],
            "backup_stored_bytes": manifest["stored_bytes"],
            "dump_bytes": self.dump.stat().st_size,
            "dump_zst_bytes": self.dump_zst.stat().st_size,
            "dump_piped_bytes": self.dump_piped.stat().st_size,
        }

    def reset(self) -> None:
        """No ``restored``, nothing dirty in shared buffers: every variant starts from the same state."""
        self.cluster.psql("postgres", f"drop database if exists {TARGET} with (force)")
        self.cluster.psql("postgres", "checkpoint")

    def timed(self, argv: list[str] | str, *, shell: bool = False, agent: bool = False, spool: bool = False) -> Run:
        """One restore: the client tree's wall and CPU time (and the agent's VmHWM), the cluster's CPU, the
        spool's use; then the restored database checked against the source (untimed)."""
        self.reset()
        postmaster = self.cluster.process.pid
        server_before = cluster_cpu_seconds(postmaster)
        watcher = SpoolWatcher(self.spool_dir) if spool else None
        if watcher:
            watcher.start()
        measured = run_process(argv, self.env, shell=shell, rss=agent)
        used = watcher.stop() if watcher else None
        time.sleep(SETTLE_SECONDS)
        server = cluster_cpu_seconds(postmaster) - server_before
        found = self.cluster.psql(TARGET, CHECK_SQL)
        if found != self.expected:
            raise RuntimeError(f"{argv!r} restored something else: {found.strip()!r} != {self.expected.strip()!r}")
        if used is not None and used.gone is None:
            raise RuntimeError(f"the spool in {self.spool_dir} was not removed after the restore ({used})")
        self.cluster.psql("postgres", f"drop database {TARGET} with (force)")
        return Run(measured, server, used)

    def variants(self) -> list[Variant]:
        n = self.jobs
        createdb = f"{PG_BIN}/createdb -T template0 {TARGET}"
        stream = (
            f"{createdb} && zstd -q -dc {self.dump_zst} "
            f"| {PG_BIN}/pg_restore --single-transaction --exit-on-error -d {TARGET}"
        )
        parallel = f"{createdb} && {PG_BIN}/pg_restore -j {n} --exit-on-error -d {TARGET} {self.dump}"
        piped = f"{createdb} && {PG_BIN}/pg_restore -j {n} --exit-on-error -d {TARGET} {self.dump_piped}"
        agent = [*AGENT, "--config", str(self.config), "--local", "restore", self.backup_id, "--target-database"]
        agent += [TARGET]
        cli = "`kybdr-agent --local restore ID --target-database db`"
        return [
            Variant(
                "stream",
                "zstd -d \\| pg_restore",
                "`zstd -dc dump.zst \\| pg_restore --single-transaction --exit-on-error -d db`",
                lambda: self.timed(stream, shell=True),
            ),
            Variant(
                "parallel_file",
                f"pg_restore -j {n} (file)",
                f"`pg_restore -j {n} --exit-on-error -d db dump`",
                lambda: self.timed(parallel, shell=True),
            ),
            Variant(
                "parallel_piped",
                f"pg_restore -j {n} (piped)",
                f"`pg_restore -j {n} --exit-on-error -d db dump.piped` (`pg_dump -Fc -Z0 \\| cat > dump.piped`)",
                lambda: self.timed(piped, shell=True),
            ),
            Variant("agent_stream", "agent streaming", cli, lambda: self.timed(agent, agent=True)),
            Variant(
                "agent_jobs",
                f"agent --jobs {n}",
                cli.replace("db`", f"db --jobs {n}`"),
                lambda: self.timed([*agent, "--jobs", str(n)], agent=True, spool=True),
            ),
        ]


# --- rounds and summaries -------------------------------------------------------------------------------


def run_rounds(variants: list[Variant], runs: int) -> dict[str, list[Run]]:
    """``runs`` rounds; each runs every variant once, in the same order."""
    results: dict[str, list[Run]] = {v.key: [] for v in variants}
    for round_no in range(1, runs + 1):
        for variant in variants:
            run = variant.run()
            results[variant.key].append(run)
            print(f"  round {round_no}/{runs} {variant.label}: {run.measured.seconds:.2f} s", flush=True)
    return results


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def median_or_none(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def spool_summary(runs: list[Run]) -> dict[str, Any] | None:
    used = [r.spool for r in runs if r.spool is not None]
    if not used:
        return None
    spooled = [u.last_growth for u in used if u.last_growth is not None]  # the spool complete
    restoring = [u.gone - u.last_growth for u in used if u.gone is not None and u.last_growth is not None]
    return {
        "peak_bytes": max(u.peak_bytes for u in used),
        "peak_allocated_bytes": max(u.peak_allocated_bytes for u in used),
        "files_per_run": max(u.files_seen for u in used),
        "median_seconds_to_spooled": median_or_none(spooled),
        "median_seconds_pg_restore": median_or_none(restoring),
    }


def summarize(variants: list[Variant], results: dict[str, list[Run]]) -> dict[str, dict[str, Any]]:
    """Per variant: median seconds and CPU, the ratios to both baselines, the highest peak RSS, every run."""
    median = {key: statistics.median(r.measured.seconds for r in runs) for key, runs in results.items()}
    summary: dict[str, dict[str, Any]] = {}
    for v in variants:
        runs = results[v.key]
        rss = [r.measured.peak_rss_kib for r in runs if r.measured.peak_rss_kib is not None]
        summary[v.key] = {
            "label": v.label,
            "median_seconds": round(median[v.key], 3),
            "vs_stream": round(median[v.key] / median["stream"], 3),
            "vs_parallel_file": round(median[v.key] / median["parallel_file"], 3),
            "median_cpu_seconds": round(statistics.median(r.measured.cpu_seconds for r in runs), 2),
            "median_server_cpu_seconds": round(statistics.median(r.server_cpu_seconds for r in runs), 2),
            "peak_rss_mib": mib(max(rss)) if rss else None,
            "spool": spool_summary(runs),
            "runs": [
                {
                    "seconds": round(r.measured.seconds, 3),
                    "cpu_seconds": round(r.measured.cpu_seconds, 2),
                    "server_cpu_seconds": round(r.server_cpu_seconds, 2),
                    "peak_rss_mib": mib(r.measured.peak_rss_kib),
                    "spool": None if r.spool is None else asdict(r.spool),
                }
                for r in runs
            ],
        }
    return summary


def cell(value: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def markdown_table(variants: list[Variant], summary: dict[str, dict[str, Any]], jobs: int) -> str:
    lines = [
        f"| variant | command | median s | × zstd -d \\| pg_restore | × pg_restore -j {jobs} (file) | client CPU s "
        "| server CPU s | agent peak RSS MiB | spool bytes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        s = summary[v.key]
        stream = "baseline" if v.key == "stream" else cell(s["vs_stream"], "{:.3f}")
        parallel = "baseline" if v.key == "parallel_file" else cell(s["vs_parallel_file"], "{:.3f}")
        spool = None if s["spool"] is None else s["spool"]["peak_bytes"]
        lines.append(
            f"| {v.label} | {v.command} | {cell(s['median_seconds'])} | {stream} | {parallel} "
            f"| {cell(s['median_cpu_seconds'])} | {cell(s['median_server_cpu_seconds'])} "
            f"| {cell(s['peak_rss_mib'], '{:.1f}')} | {cell(spool, '{:,}')} |"
        )
    return "\n".join(lines)


def notes(summary: dict[str, dict[str, Any]], jobs: int) -> str:
    spool = summary["agent_jobs"]["spool"] or {}
    return (
        "× columns: the variant's median ÷ that baseline's median, same rounds. The baselines' commands include "
        "`createdb -T template0 db` (the agent creates its own scratch database and renames it). `dump.piped` is "
        "the archive as pg_dump writes it into a pipe — as the agent's backup is: no data offsets in its table of "
        "contents, so pg_restore -j finds each table's data by reading past the blocks before it. Client CPU s: "
        "user+sys of the process tree (zstd, pg_restore and its workers, the agent). Server CPU s: the cluster's "
        "postmaster and children over the run (backends, parallel index-build workers, autovacuum, checkpointer). "
        "Agent peak RSS: VmHWM of the agent process alone, polled every 20 ms, pg_restore excluded. "
        f"Spool: the peak size of restore.spool_dir during `--jobs {jobs}`, polled every 10 ms "
        f"({cell(spool.get('peak_allocated_bytes', 0) / 1e3, '{:.0f}')} kB allocated), removed after every run: "
        f"the archive's head, which `pg_restore -j {jobs} --section=post-data` reads after pre-data and data "
        "streamed in one transaction. The run's phases (medians): start-up and the streamed sections until the "
        f"spool was complete {cell(spool.get('median_seconds_to_spooled'))} s, then `pg_restore -j {jobs}` "
        f"from it {cell(spool.get('median_seconds_pg_restore'))} s."
    )


def commit() -> str:
    """The checkout measured: HEAD, and whether the agent's code differed from it (a run takes a while)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "kybdr_agent"], cwd=ROOT, capture_output=True, text=True)
    return (head.stdout.strip() or "?") + (" with local changes to kybdr_agent" if dirty.stdout.strip() else "")


def header(args: argparse.Namespace, setup: dict[str, Any]) -> str:
    command = shlex.join([".venv/bin/python", "benchmarks/restore_bench.py", *sys.argv[1:]])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    version = subprocess.run([str(PG_BIN / "postgres"), "--version"], capture_output=True, text=True, check=False)
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    rounds = f"{args.runs} interleaved round{'s' if args.runs > 1 else ''}"
    return (
        f"`{command}` — {when}, commit {setup['commit']}, Linux {os.uname().release}, Debian {debian}, "
        f"{os.cpu_count()} CPUs, "
        f"PostgreSQL {version.stdout.strip().removeprefix('postgres (PostgreSQL) ').split(' ')[0] or '?'}; "
        f"dataset B at scale {args.scale}, dump {setup['dump_bytes'] / 1e9:.2f} GB (`pg_dump -Fc -Z0`), "
        f"`dump.zst` {setup['dump_zst_bytes'] / 1e6:.1f} MB, agent backup {setup['backup_stored_bytes'] / 1e6:.1f} MB "
        f"(zstd -3, AES-256-GCM); {rounds}, medians"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=100, help="pgbench scale (dataset B: 100 ≈ 1.03 GB dump)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--jobs", type=int, default=2, help="N for pg_restore -j N and restore --jobs N")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where the JSON goes")
    args = parser.parse_args()
    if args.jobs < 2 or args.runs < 1 or args.scale < 1:
        parser.error("--jobs must be at least 2, --runs and --scale at least 1")

    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="kybdr-restore-bench-"))
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:],
        "kernel": os.uname().release,
        "nproc": os.cpu_count(),
    }
    cluster = start_cluster()
    try:
        print(f"building dataset B at scale {args.scale} …", flush=True)
        build_dataset_b(cluster, SOURCE, args.scale)
        bench = Bench(cluster, workdir, args.jobs)
        print("backing up (agent), dumping (baselines) …", flush=True)
        report["setup"] = setup = {"commit": commit(), **bench.prepare()}
        variants = bench.variants()
        print(f"dump is {setup['dump_bytes'] / 1e9:.2f} GB; {args.runs} interleaved round(s) …", flush=True)
        report["variants"] = summary = summarize(variants, run_rounds(variants, args.runs))
        if commit() != setup["commit"]:
            print(f"warning: the checkout changed during the run ({setup['commit']} → {commit()})", flush=True)
            setup["commit"] += f" (changed during the run to {commit()})"
        table = markdown_table(variants, summary, args.jobs)
        text = f"{header(args, setup)}\n\n{table}\n\n{notes(summary, args.jobs)}"
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report["markdown"] = text
    path = args.out / f"restore-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{text}\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
