"""The agent's backup against the shell pipelines it replaces, to a folder and to S3, in one session.

    .venv/bin/python benchmarks/backup_bench.py [--scale 100] [--runs 5] [--skip-double] [--compare REV] [--out DIR]
    .venv/bin/python benchmarks/backup_bench.py --telemetry [--scale 100] [--runs 5]

Builds dataset B (../shared/bench/dataset-b.sh: pgbench rows whose filler compresses ~3×, scale 100 ≈ 1.03 GB
``pg_dump -Fc -Z0``) on a throwaway cluster, starts a moto S3 server and two ``kybdr-agent run`` daemons (one
on a folder repository, one on S3), then runs every variant once per round, in the same order each round:

    floor                  pg_dump -Fc -Z0 > /dev/null
    shell → file           pg_dump -Fc -Z0 | zstd -3 -T1 > file                         (folder baseline)
    agent → folder         daemon: POST /v1/backup?wait=true; CLI: kybdr-agent --local backup
    shell → S3             pg_dump -Fc -Z0 | zstd -3 -T1 | aws s3 cp - s3://…           (S3 baseline)
    agent → S3             daemon and CLI, as above

``--compare REV`` adds the agent as it was at git revision REV (its package exported to the work directory,
run through ``PYTHONPATH``) as "(REV)" variants of the same rounds: before and after, under the same load.

The agent's package is byte-compiled first, as pip does on install, so the one-shot CLI starts as an installed
agent does rather than compiling its modules on every run (``install_bytecode``).

Why it is built this way: the machines are shared and noisy, so absolute seconds drift from one hour to the
next; variants are interleaved and each agent variant is divided by its own baseline's median from the same
rounds, so the ratios stay comparable across runs. Reported per variant: median wall seconds, the ratio to
its baseline, median CPU seconds of the whole process tree (pg_dump included, for the agent as for the
shell), and the agent process's own peak RSS (VmHWM, never wait4's ru_maxrss — see bench_support.py).
Finally a database twice the size is backed up once through each daemon: the peak RSS must stay flat.

``--telemetry`` measures what observability costs on the backup path instead: the folder daemon as above
(metrics always on, no tracing) against a second folder daemon exporting OpenTelemetry traces by OTLP/HTTP
to a local collector while ``GET /metrics`` is scraped every second — the ratio is traced ÷ untraced.
It prints a Markdown table (docs/benchmarks.md carries it as printed) and writes the figures as JSON.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_support import (  # noqa: E402
    DUMMY_AWS,
    AgentDaemon,
    Measurement,
    MotoS3,
    build_database,
    build_dataset_b,
    dump_size,
    install_bytecode,
    pg_env,
    run_process,
)
from benchmarks.telemetry_load import OtlpSink, Scraper  # noqa: E402
from kybdr_agent.postgres.cluster import PG_BIN, Cluster, start_cluster  # noqa: E402

__all__ = ["build_database", "main"]  # control_bench.py imports build_database from here

AGENT = [sys.executable, "-m", "kybdr_agent"]
PG_DUMP = f"{PG_BIN}/pg_dump -Fc -Z0"
BUCKET = "bench"


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    command: str  # as the table shows it
    baseline: str | None  # key of the variant it is divided by; None for the floor and the baselines
    run: Callable[[str], Measurement]  # database name → one timed run (its output cleared afterwards)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Bench:
    """The cluster, the moto server, the daemons and the configs every variant runs against."""

    def __init__(self, cluster: Cluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.key = workdir / "master.key"
        self.key.write_text(secrets.token_hex(32))
        self.key.chmod(0o600)
        aws = shutil.which("aws")
        if aws is None:
            raise RuntimeError("the aws CLI is not on PATH (it uploads the shell baseline to S3)")
        self.aws = aws
        self.daemons: dict[str, AgentDaemon] = {}
        self.sink: OtlpSink | None = None
        self.moto = MotoS3([BUCKET])
        self.compare: str | None = None  # a git revision whose agent runs beside this one
        self.compare_env: dict[str, str] = {}

    def export_revision(self, revision: str) -> None:
        """The agent package as of ``revision``, byte-compiled, to run with ``PYTHONPATH`` (and ``PYTHONSAFEPATH``,
        so the current directory's package does not shadow it)."""
        tree = self.workdir / "compare"
        tree.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", revision, "kybdr_agent"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        install_bytecode(tree / "kybdr_agent")
        self.compare = revision
        self.compare_env = {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}

    def repository(self, target: str, name: str) -> str:
        if target == "s3":
            return self.moto.repository(BUCKET, f"agent-{name}")
        return f'url = "file://{self.workdir / f"repo-{name}"}"'

    def config(self, name: str, target: str, *, daemon: bool, extra: str = "") -> Path:
        """One agent configuration per variant: its own state directory, repository and socket."""
        state = self.workdir / f"state-{name}"
        text = (
            f'[backup]\nbackup_dir = "{state}"\n\n'
            f'[database]\ndsn = "host={self.cluster.socket_dir} port={self.cluster.port} user=postgres"\n\n'
            f'[encryption]\nkey_file = "{self.key}"\n\n[repository]\n{self.repository(target, name)}\n'
            '[drill]\nschedule = ""\n'
        )
        if daemon:
            text += f'\n[control]\nsocket = "{self.workdir / f"{name}.sock"}"\n\n[daemon]\nshutdown_grace_seconds = 2\n'
        path = self.workdir / f"{name}.toml"
        path.write_text(text + extra)
        return path

    def start_daemons(self, *, telemetry: bool = False) -> None:
        for target in ("folder", "s3"):
            name = f"daemon-{target}"
            config = self.config(name, target, daemon=True)
            self.daemons[target] = AgentDaemon(config, self.workdir / f"{name}.sock", self.workdir / name, DUMMY_AWS)
            if self.compare is not None:
                name = f"daemon-{target}-compare"
                config = self.config(name, target, daemon=True)
                env = {**DUMMY_AWS, **self.compare_env}
                self.daemons[f"{target}-compare"] = AgentDaemon(
                    config, self.workdir / f"{name}.sock", self.workdir / name, env
                )
        if telemetry:
            self.sink = OtlpSink()
            name = "daemon-traced"
            extra = f'\n[telemetry]\notlp_endpoint = "{self.sink.endpoint}"\n'
            config = self.config(name, "folder", daemon=True, extra=extra)
            self.daemons["traced"] = AgentDaemon(config, self.workdir / f"{name}.sock", self.workdir / name, DUMMY_AWS)

    def agent_traced(self, database: str) -> Measurement:
        daemon = self.daemons["traced"]
        with Scraper(daemon.daemon.socket_path):
            measured, _ = daemon.backup(database)
        return replace(measured, stored_bytes=self.clear("folder", "daemon-traced"))

    def stop(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()
        self.moto.stop()
        if self.sink is not None:
            self.sink.stop()

    # --- the variants: each returns its measurement with the bytes it stored, and clears what it wrote ---

    def floor(self, database: str) -> Measurement:
        return run_process(f"{PG_DUMP} > /dev/null", pg_env(self.cluster, database), shell=True)

    def shell_file(self, database: str) -> Measurement:
        out = self.workdir / "shell.dump.zst"
        measured = run_process(f"{PG_DUMP} | zstd -q -3 -T1 > {out}", pg_env(self.cluster, database), shell=True)
        stored = out.stat().st_size
        out.unlink()  # at once: its dirty pages are dropped, not written back during the next variant
        return replace(measured, stored_bytes=stored)

    def shell_s3(self, database: str) -> Measurement:
        upload = f"{self.aws} s3 cp - s3://{BUCKET}/shell/{database}.dump.zst --endpoint-url {self.moto.endpoint}"
        env = {**pg_env(self.cluster, database), **DUMMY_AWS}
        measured = run_process(f"{PG_DUMP} | zstd -q -3 -T1 | {upload} --only-show-errors", env, shell=True)
        return replace(measured, stored_bytes=self.moto.empty(BUCKET))

    def agent_daemon(self, target: str, suffix: str = "") -> Callable[[str], Measurement]:
        def run(database: str) -> Measurement:
            measured, _ = self.daemons[target + suffix].backup(database)
            return replace(measured, stored_bytes=self.clear(target, f"daemon-{target}{suffix}"))

        return run

    def agent_cli(self, target: str, suffix: str = "") -> Callable[[str], Measurement]:
        name = f"cli-{target}{suffix}"
        config = self.config(name, target, daemon=False)
        argv = [*AGENT, "--config", str(config), "--local", "backup", "--database"]
        extra = self.compare_env if suffix else {}

        def run(database: str) -> Measurement:
            env = {**pg_env(self.cluster), **DUMMY_AWS, **extra}
            measured = run_process([*argv, database], env, rss=True)
            return replace(measured, stored_bytes=self.clear(target, name))

        return run

    def clear(self, target: str, name: str) -> int:
        """Empty a variant's repository; returns the bytes it held (data object and manifest)."""
        if target == "s3":
            return self.moto.empty(BUCKET)
        repo = self.workdir / f"repo-{name}"
        stored = tree_bytes(repo)
        shutil.rmtree(repo)
        return stored

    def telemetry_variants(self) -> list[Variant]:
        post = "`POST /v1/backup?wait=true` to `kybdr-agent run`"
        traced = f"{post}, `[telemetry] otlp_endpoint` set, `GET /metrics` every 1 s"
        return [
            Variant("floor", "floor", "`pg_dump -Fc -Z0 > /dev/null`", None, self.floor),
            Variant("agent_folder_daemon", "agent → folder, untraced", post, None, self.agent_daemon("folder")),
            Variant(
                "agent_traced", "agent → folder, traced + scraped", traced, "agent_folder_daemon", self.agent_traced
            ),
        ]

    def variants(self) -> list[Variant]:
        zstd = "pg_dump -Fc -Z0 \\| zstd -3 -T1"
        post = "`POST /v1/backup?wait=true` to `kybdr-agent run`"
        cli = "`kybdr-agent --local backup --database …`"
        variants = [
            Variant("floor", "floor", "`pg_dump -Fc -Z0 > /dev/null`", None, self.floor),
            Variant("shell_file", "shell → file", f"`{zstd} > file`", None, self.shell_file),
            Variant("agent_folder_daemon", "agent → folder, daemon", post, "shell_file", self.agent_daemon("folder")),
            Variant("agent_folder_cli", "agent → folder, CLI", cli, "shell_file", self.agent_cli("folder")),
            Variant("shell_s3", "shell → S3", f"`{zstd} \\| aws s3 cp - s3://…`", None, self.shell_s3),
            Variant("agent_s3_daemon", "agent → S3, daemon", post, "shell_s3", self.agent_daemon("s3")),
            Variant("agent_s3_cli", "agent → S3, CLI", cli, "shell_s3", self.agent_cli("s3")),
        ]
        if self.compare is None:
            return variants
        # Each one right after its counterpart, so both meet the same moment's load.
        before: list[Variant] = []
        for v in variants:
            before.append(v)
            if v.key.startswith("agent_"):
                target, kind = v.key.split("_")[1:]
                run = self.agent_daemon(target, "-compare") if kind == "daemon" else self.agent_cli(target, "-compare")
                label = f"{v.label} ({self.compare})"
                before.append(Variant(f"{v.key}_compare", label, v.command, v.baseline, run))
        return before


# --- rounds and summaries -------------------------------------------------------------------------------


def run_rounds(variants: list[Variant], database: str, runs: int) -> dict[str, list[Measurement]]:
    """``runs`` rounds; each runs every variant once, in the same order."""
    results: dict[str, list[Measurement]] = {v.key: [] for v in variants}
    for round_no in range(1, runs + 1):
        for variant in variants:
            measured = variant.run(database)
            results[variant.key].append(measured)
            print(f"  round {round_no}/{runs} {variant.label}: {measured.seconds:.2f} s", flush=True)
    return results


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def summarize(variants: list[Variant], results: dict[str, list[Measurement]]) -> dict[str, dict[str, Any]]:
    """Per variant: median seconds and CPU, the ratio to its baseline, the highest peak RSS, every run."""
    median = {key: statistics.median(m.seconds for m in runs) for key, runs in results.items()}
    summary: dict[str, dict[str, Any]] = {}
    for v in variants:
        runs = results[v.key]
        rss = [m.peak_rss_kib for m in runs if m.peak_rss_kib is not None]
        summary[v.key] = {
            "label": v.label,
            "median_seconds": round(median[v.key], 3),
            "vs_baseline": round(median[v.key] / median[v.baseline], 3) if v.baseline in median else None,
            # Each run over its baseline's run of the same round, then the median: the machine's load drifts
            # between rounds more than within one, so pairs cancel most of it (the ratio of medians does not).
            "vs_baseline_paired": (
                round(statistics.median(m.seconds / b.seconds for m, b in zip(runs, base, strict=True)), 3)
                if (base := results.get(v.baseline or "")) is not None
                else None
            ),
            "vs_floor": round(median[v.key] / median["floor"], 3) if "floor" in median else None,
            "median_cpu_seconds": round(statistics.median(m.cpu_seconds for m in runs), 2),
            "peak_rss_mib": mib(max(rss)) if rss else None,
            "idle_rss_mib": mib(runs[-1].idle_rss_kib),
            "stored_bytes": runs[-1].stored_bytes,
            "runs": [
                {
                    "seconds": round(m.seconds, 3),
                    "cpu_seconds": round(m.cpu_seconds, 2),
                    "peak_rss_mib": mib(m.peak_rss_kib),
                }
                for m in runs
            ],
        }
    return summary


NOTES = (
    "Agent: zstd -3 with one worker thread, AES-256-GCM, SHA-256 and a manifest; the folder repository fsyncs, "
    "`> file` does not. × its baseline: median ÷ the median of shell → file (folder rows) or shell → S3 (S3 rows), "
    "same rounds; paired: the median over rounds of each run ÷ its baseline's run in the same round. CPU s: "
    "user+sys of the whole process tree, pg_dump included. Agent peak RSS: VmHWM of the agent "
    "process alone, pg_dump excluded (CLI: polled every 20 ms until exit; daemon: reset through clear_refs before "
    "each request, read when it answers)."
)


def cell(value: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def markdown_table(variants: list[Variant], summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| variant | command | median s | × its baseline | × baseline, paired | CPU s | agent peak RSS MiB "
        "| stored MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        s = summary[v.key]
        baseline = v.key in ("shell_file", "shell_s3") or (v.baseline is None and v.key != "floor")
        ratio = "baseline" if baseline else cell(s["vs_baseline"], "{:.3f}")
        paired = "baseline" if baseline else cell(s["vs_baseline_paired"], "{:.3f}")
        stored = None if s["stored_bytes"] is None else s["stored_bytes"] / 1e6
        lines.append(
            f"| {v.label} | {v.command} | {cell(s['median_seconds'])} | {ratio} | {paired} "
            f"| {cell(s['median_cpu_seconds'])} "
            f"| {cell(s['peak_rss_mib'], '{:.1f}')} | {cell(stored, '{:.1f}')} |"
        )
    return "\n".join(lines)


def doubled_table(summary: dict[str, dict[str, Any]], doubled: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| variant | seconds 1× (median) | seconds 2× | idle RSS MiB | peak RSS MiB 1× | peak RSS MiB 2× |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, s2 in doubled.items():
        s1 = summary[key]
        seconds = [cell(s1["median_seconds"]), cell(s2["median_seconds"])]
        rss = [cell(v, "{:.1f}") for v in (s2["idle_rss_mib"], s1["peak_rss_mib"], s2["peak_rss_mib"])]
        lines.append("| " + " | ".join([s2["label"], *seconds, *rss]) + " |")
    return "\n".join(lines)


def header(args: argparse.Namespace, dump_bytes: int, runs: int) -> str:
    command = shlex.join([".venv/bin/python", "benchmarks/backup_bench.py", *sys.argv[1:]])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rounds = f"{runs} interleaved round{'s' if runs > 1 else ''}"
    return (
        f"`{command}` — {when}, Linux {os.uname().release}, {os.cpu_count()} CPUs; dataset {args.dataset} at "
        f"scale {args.scale}, dump {dump_bytes / 1e9:.2f} GB (`pg_dump -Fc -Z0`); {rounds}, medians"
    )


# --- main -----------------------------------------------------------------------------------------------


def build(cluster: Cluster, dataset: str, name: str, scale: int) -> int:
    print(f"building dataset {dataset} at scale {scale} as {name} …", flush=True)
    if dataset == "mixed":
        build_database(cluster, name, scale)
    else:
        build_dataset_b(cluster, name, scale)
    return dump_size(cluster, name)


def doubled_check(bench: Bench, variants: list[Variant], args: argparse.Namespace, report: dict[str, Any]) -> str:
    """One round on a database twice the size, through each daemon: the agent's peak RSS must stay flat."""
    report["dump_bytes_2x"] = build(bench.cluster, args.dataset, "bench2x", args.scale * 2)
    daemon_variants = [v for v in variants if v.key.endswith("_daemon")]
    results = run_rounds(daemon_variants, "bench2x", 1)
    bench.cluster.psql("postgres", "drop database bench2x")
    report["doubled"] = summarize(daemon_variants, results)
    return (
        f"Doubled database (scale {args.scale * 2}, dump {report['dump_bytes_2x'] / 1e9:.2f} GB), one run through "
        f"each daemon:\n\n{doubled_table(report['variants'], report['doubled'])}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=100, help="pgbench scale (dataset B: 100 ≈ 1.03 GB dump)")
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--dataset", choices=("B", "mixed"), default="B", help="B: ../shared/bench/dataset-b.sh")
    parser.add_argument("--skip-double", action="store_true", help="skip the doubled database (RSS flatness)")
    parser.add_argument("--telemetry", action="store_true", help="tracing + scraping on vs off (folder daemons)")
    parser.add_argument("--compare", metavar="REV", help="also run the agent as of git revision REV, same rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where the JSON goes")
    parser.add_argument(
        "--only",
        choices=("folder", "s3"),
        help="only one target's variants (with the floor and its baseline): quicker rounds while iterating",
    )
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="kybdr-bench-"))
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:],
        "kernel": os.uname().release,
        "nproc": os.cpu_count(),
    }
    install_bytecode()
    cluster = start_cluster()
    bench: Bench | None = None
    try:
        report["dump_bytes"] = build(cluster, args.dataset, "bench", args.scale)
        bench = Bench(cluster, workdir)
        if args.compare:
            bench.export_revision(args.compare)
        bench.start_daemons(telemetry=args.telemetry)
        variants = bench.telemetry_variants() if args.telemetry else bench.variants()
        if args.only:
            keep = {"floor", "shell_file" if args.only == "folder" else "shell_s3"}
            variants = [v for v in variants if v.key in keep or v.key.startswith(f"agent_{args.only}_")]
        print(f"dump is {report['dump_bytes'] / 1e9:.2f} GB; {args.runs} interleaved round(s) …", flush=True)
        report["variants"] = summarize(variants, run_rounds(variants, "bench", args.runs))
        table = markdown_table(variants, report["variants"])
        notes = "" if args.telemetry else f"\n\n{NOTES}"
        text = f"{header(args, report['dump_bytes'], args.runs)}\n\n{table}{notes}"
        if args.telemetry and bench.sink is not None:
            text += f"\n\nThe collector received {bench.sink.requests} OTLP exports ({bench.sink.bytes} bytes)."
        elif not args.skip_double:
            text += "\n\n" + doubled_check(bench, variants, args, report)
    finally:
        if bench is not None:
            bench.stop()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report["markdown"] = text
    path = args.out / f"backup-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{text}\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
