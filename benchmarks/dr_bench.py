"""DR failover timing and split-brain safety, on the end-to-end harness (real processes, real PostgreSQL).

    .venv/bin/python benchmarks/dr_bench.py [--runs 5] [--interval 1] [--threshold 3] [--scenario all]
    .venv/bin/python benchmarks/dr_bench.py --partition

Each run builds a fresh ``tests/dr_support.dr_world``: a primary and its streaming standby, the region link
as a TCP proxy, scripted health URLs and a witness, Route53/ELBv2 on one moto server, and both agents as
``kybdr-agent run`` processes (``health_check_interval``/``failover_threshold`` from the options, the
harness's ``probe_timeout = 0.5s`` and ``partition_timeout = 3s``). Once the DR agent is steady, at t0:

    dead     the primary region dies: health URL and witness answer 503, the primary agent gets SIGKILL and
             the primary database crashes (``pg_ctl stop -m immediate``). A dead primary cannot be fenced,
             so the DR agent waits out its self-fence deadline (last contact + partition_timeout +
             probe_timeout + interval) before it promotes.
    silent   as dead, but the region goes silent instead of refusing: the link and the DR agent's way to the
             peer are blackholed and the health URL hangs (a powered-off host, dropped packets: no TCP reset),
             so every connection the DR agent opens hangs until its own timeout.
    health   the health URL and the witness fail and the primary agent gets SIGKILL, but the primary
             database stays up and reachable over the link: the DR agent fences it over SQL at once.

t0 falls at a random point of the agent's probe cycle. Two pollers in threads of this process, both started
before t0, take the first moment that (a) an ordinary autocommit ``INSERT`` succeeds on the standby
(asyncpg, one kept session, every 25 ms) and (b) the switched record reads back as the DR load balancer
(ListResourceRecordSets on moto, every 50 ms).
Afterwards the DR agent's own history gives the phases: first failed check and threshold reached
(transitions steady→suspect→confirming), confirmation (→fencing), the fence attempt, the self-fence wait
(fence result → promote intent), promotion and DNS (their results' ``duration_s``).

``--partition``: a fresh world per scenario, a ``tests/dr_net.WriteProber`` writing every 100 ms to both
databases over their direct DSNs (the applications' view, not the region link), and one partition held for
partition_timeout + 5 s (longer while the DR agent is mid-failover, so a promotion lands inside the probed
window); per side the writes accepted and the 100 ms ticks at which both sides accepted (must be 0).
It prints Markdown tables (docs/benchmarks.md carries them as printed) and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from kybdr_agent.postgres.cluster import PG_BIN  # noqa: E402
from kybdr_agent.postgres.connection import Connection  # noqa: E402
from tests.dr_aws import aws  # noqa: E402
from tests.dr_net import WriteProber  # noqa: E402
from tests.dr_support import DRWorld, dr_world, wait_until  # noqa: E402
from tests.support import MotoServer, start_moto_server  # noqa: E402

WRITE_POLL_SECONDS = 0.025
DNS_POLL_SECONDS = 0.05
WRITE_TIMEOUT_SECONDS = 0.5
WRITABLE_DEADLINE_SECONDS = 60.0  # a run that has not failed over by then is reported as failed
DNS_DEADLINE_SECONDS = 30.0  # after writable
PARTITION_TIMEOUT_SECONDS = 3.0  # the harness's dr.partition_timeout
PROBE_TIMEOUT_SECONDS = 0.5  # the harness's dr.probe_timeout
PROBE_TABLE = "kybdr_bench_writes"
SCENARIOS = ("dead", "silent", "health")
BUSY_PHASES = frozenset({"fencing", "promoting", "dns_switching", "switching_back"})
SETTLE_CAP_SECONDS = 60.0  # a partition is held at most this long while the DR agent is mid-operation


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"Linux {os.uname().release}, {os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
        f"PostgreSQL {pg_version()}"
    )


def revision() -> str:
    """The commit the agents ran (their code is imported afresh by every world's processes)."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "kybdr_agent"], capture_output=True, text=True
    )
    return (head.stdout.strip() or "?") + (" + uncommitted kybdr_agent changes" if dirty.stdout.strip() else "")


def pg_version() -> str:
    out = subprocess.run([str(PG_BIN / "postgres"), "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"\d+(\.\d+)+", out.stdout)
    return found.group(0) if found else "?"


def at(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["at"]).timestamp()


# --- the pollers ----------------------------------------------------------------------------------------------


class FirstWrite(threading.Thread):
    """The first moment an ordinary autocommit INSERT succeeds on the standby (time.time() at its answer)."""

    def __init__(self, world: DRWorld) -> None:
        super().__init__(daemon=True, name="first-write")
        self.conn = Connection.from_settings(
            world.pair.dsn(world.standby), world.pair.password_file, None, WRITE_TIMEOUT_SECONDS
        )
        self.found: float | None = None
        self.attempts = 0
        self.last_error = ""
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._poll())

    async def _poll(self) -> None:
        session: asyncpg.Connection | None = None
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                        if session is None or session.is_closed():
                            session = await asyncpg.connect(**self.conn.asyncpg_kwargs("postgres"))
                        self.attempts += 1
                        await session.execute(f"INSERT INTO {PROBE_TABLE} DEFAULT VALUES")
                except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    self.last_error = str(exc) or type(exc).__name__
                    if session is not None and not isinstance(exc, asyncpg.PostgresError):
                        session.terminate()
                        session = None
                else:
                    self.found = time.time()
                    return
                await asyncio.sleep(max(0.0, started + WRITE_POLL_SECONDS - time.monotonic()))
        finally:
            if session is not None:
                session.terminate()


class FirstDns(threading.Thread):
    """The first moment the switched record reads back as the DR load balancer (one kept boto3 client)."""

    def __init__(self, world: DRWorld) -> None:
        super().__init__(daemon=True, name="first-dns")
        self.route53 = world.route53
        self.client = aws(world.route53.moto, "route53")
        self.wanted = world.route53.dns_names["dr"].rstrip(".").lower()
        self.domain = world.route53.domain.rstrip(".").lower()
        self.found: float | None = None
        self.last_error = ""
        self.stop = threading.Event()

    def points_at_dr(self) -> bool:
        # World.target() with one client instead of one per call (a client costs ~30 ms to build).
        answer = self.client.list_resource_record_sets(HostedZoneId=self.route53.zone_id)
        for record in answer["ResourceRecordSets"]:
            if record["Name"].rstrip(".").lower() == self.domain and record["Type"] == "A":
                alias = record.get("AliasTarget", {}).get("DNSName", "").rstrip(".").lower()
                return alias.removeprefix("dualstack.") == self.wanted
        return False

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                switched = self.points_at_dr()
            except Exception as exc:  # noqa: BLE001 — moto busy: the next poll tells
                self.last_error = str(exc)
                switched = False
            if switched:
                self.found = time.time()
                return
            self.stop.wait(max(0.0, started + DNS_POLL_SECONDS - time.monotonic()))


# --- one failover run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    scenario: str
    number: int
    ok: bool = False
    t_writable: float | None = None
    t_dns: float | None = None
    kill_s: float = 0.0  # how long the t0 sequence (health, witness, kill, crash) itself took
    phases: dict[str, float | None] = field(default_factory=dict)
    fence: str = ""
    error: str = ""
    log_file: str | None = None


@contextmanager
def fresh_world(moto: MotoServer) -> Iterator[DRWorld]:
    """A new world in its own temporary directory (agents' homes, the shared repository), removed after."""
    tmp = Path(tempfile.mkdtemp(prefix="kybdr-drbench-"))
    try:
        with dr_world(tmp, moto) as world:
            yield world
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def configure(world: DRWorld, interval: float, threshold: int) -> None:
    fields = {"health_check_interval": f"{interval:g}s", "failover_threshold": threshold}
    world.write_configs(dr=fields, primary=fields)


def bring_up(world: DRWorld) -> None:
    """Both agents started, the probe table replicated, the DR agent steady with the primary active."""
    world.primary.psql("postgres", f"CREATE TABLE {PROBE_TABLE} (at timestamptz NOT NULL DEFAULT clock_timestamp())")
    wait_until(
        "the probe table on the standby",
        lambda: world.standby.psql("postgres", f"SELECT to_regclass('{PROBE_TABLE}') IS NOT NULL") == "t",
        timeout=30,
    )
    world.start("primary")
    dr = world.start("dr")

    def steady() -> bool:
        status = dr.status()
        return status["state"] == "steady" and status["active"] == "primary"

    wait_until("the DR agent steady", steady, timeout=60)


def fence_outcome(world: DRWorld, t0: float) -> str:
    """How the failover's fence step ended, in the agent's words (kept in the JSON: why a wait was long)."""
    for e in world.agents["dr"].history(kind="result"):
        if e.get("step") == "fence" and at(e) >= t0:
            detail = e.get("detail") or {}
            peer = detail.get("peer") or {}
            return f"ok={e['ok']} how={detail.get('how')} sql: {detail.get('detail')}; peer: {peer}"
    return ""


def phases(world: DRWorld, t0: float) -> dict[str, float | None]:
    """The DR agent's own account, from its history: seconds from t0, or each step's own duration."""
    history = world.agents["dr"].history()
    after = [e for e in history if at(e) >= t0 - 0.5]

    def transition(src: str, dst: str) -> dict[str, Any] | None:
        return next((e for e in after if e["kind"] == "transition" and e["from"] == src and e["to"] == dst), None)

    def entry(kind: str, step: str) -> dict[str, Any] | None:
        return next((e for e in after if e["kind"] == kind and e.get("step") == step), None)

    suspect, confirming = transition("steady", "suspect"), transition("suspect", "confirming")
    fencing = transition("confirming", "fencing")
    fence, promote_intent = entry("result", "fence"), entry("intent", "promote")
    promote, dns = entry("result", "promote"), entry("result", "dns")
    operation = next((e for e in after if e["kind"] == "operation" and e.get("operation") == "failover"), None)

    def since(e: dict[str, Any] | None, start: float | None) -> float | None:
        return None if e is None or start is None else at(e) - start

    return {
        "first_failed_check": since(suspect, t0),
        "threshold_reached": since(confirming, t0),
        "confirmation": since(fencing, at(confirming) if confirming else None),
        "fence_attempt": fence["duration_s"] if fence else None,
        "fence_ok": float(bool(fence and fence["ok"])) if fence else None,
        "self_fence_wait": since(promote_intent, at(fence) if fence else None),
        "promote": promote["duration_s"] if promote else None,
        "dns": dns["duration_s"] if dns else None,
        "promoted_at": since(promote, t0),
        "dns_done_at": since(dns, t0),
        "operation": operation["duration_s"] if operation else None,
    }


def kill_region(world: DRWorld, scenario: str) -> None:
    world.witness.set("fail")
    if scenario == "silent":
        # No TCP reset from a host that is gone: the DR side's connections hang until their timeouts.
        world.health["primary"].set("hang")
        world.link.set("blackhole")
        world.peer_links["dr"].set("blackhole")
    else:
        world.health["primary"].set("fail")
    world.kill("primary")
    if scenario != "health":
        world.pair.crash(world.primary)


def failover_run(moto: MotoServer, scenario: str, number: int, args: argparse.Namespace, logs: Path) -> Run:
    run = Run(scenario, number)
    with fresh_world(moto) as world:
        configure(world, args.interval, args.threshold)
        bring_up(world)
        write, dns = FirstWrite(world), FirstDns(world)
        write.start()
        dns.start()
        # Both pollers past their first connection, then t0 at a random point of the agent's probe cycle:
        # bring_up returns just after a round, and a fixed phase would bias every run the same way.
        time.sleep(0.2 + random.uniform(0, args.interval))
        try:
            t0 = time.time()
            kill_region(world, scenario)
            run.kill_s = time.time() - t0
            write.join(WRITABLE_DEADLINE_SECONDS)
            if write.found is not None:
                run.t_writable = write.found - t0
                dns.join(DNS_DEADLINE_SECONDS)
                if dns.found is not None:
                    run.t_dns = dns.found - t0
            run.ok = run.t_writable is not None and run.t_dns is not None
            if not run.ok:
                run.error = (
                    "the standby never accepted a write" if run.t_writable is None else "DNS never switched"
                ) + f" (last write error: {write.last_error})"
            time.sleep(0.3)  # the operation record lands right after the DNS result
            run.phases = phases(world, t0)
            run.fence = fence_outcome(world, t0)
        finally:
            write.stop.set()
            dns.stop.set()
            write.join(2)
            dns.join(2)
            if not run.ok:
                path = logs / f"dr-bench-{scenario}-{number}.log"
                status = world.agents["dr"].status() if world.agents["dr"].daemon else {}
                path.write_text(
                    f"{run.error}\n\nDR status: {json.dumps(status, indent=1)}\n\n"
                    f"DR history: {json.dumps(world.agents['dr'].history(), indent=1)}\n\n"
                    f"=== DR agent log ===\n{world.agents['dr'].log()}\n"
                    f"=== primary agent log ===\n{world.agents['primary'].log()}\n"
                )
                run.log_file = str(path)
    return run


def cell(value: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def worst(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def failover_tables(runs: list[Run], args: argparse.Namespace) -> str:
    bound = args.threshold * args.interval + 2
    lines = [
        "| scenario | runs | failed over | writable median s | writable worst s | DNS median s | DNS worst s "
        "| DNS after writable (median) s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_scenario = {s: [r for r in runs if r.scenario == s] for s in SCENARIOS if any(r.scenario == s for r in runs)}
    for scenario, group in by_scenario.items():
        writable = [r.t_writable for r in group]
        dns = [r.t_dns for r in group]
        gap = [r.t_dns - r.t_writable for r in group if r.t_dns is not None and r.t_writable is not None]
        lines.append(
            f"| {scenario} | {len(group)} | {sum(r.ok for r in group)} | {cell(median(writable))} "
            f"| {cell(worst(writable))} | {cell(median(dns))} | {cell(worst(dns))} | {cell(median(list(gap)))} |"
        )
    lines += [
        "",
        "Phase medians from the DR agent's history (s; the first three from t0, the rest each step's own length):",
        "",
        "| scenario | first failed check | threshold reached | confirmation | fence attempt | self-fence wait "
        "| promote | DNS (UPSERT, INSYNC, read back) | operation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = (
        "first_failed_check",
        "threshold_reached",
        "confirmation",
        "fence_attempt",
        "self_fence_wait",
        "promote",
        "dns",
        "operation",
    )
    for scenario, group in by_scenario.items():
        cells = [cell(median([r.phases.get(k) for r in group]), "{:.3f}") for k in keys]
        lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
    margin = PARTITION_TIMEOUT_SECONDS + PROBE_TIMEOUT_SECONDS + args.interval
    kill = median([r.kill_s for r in runs])
    lines += [
        "",
        f"Goal (issue 9): writable within threshold × interval + 2 s = {bound:g} s, DNS in sync 1 s after "
        f"({bound + 1:g} s). t0 is taken before the region is killed; the kill sequence itself took "
        f"{cell(kill, '{:.3f}')} s (median). A dead primary cannot be fenced: the agent waits until its last "
        f"contact + partition_timeout + probe_timeout + interval = last contact + {margin:g} s (the agent "
        "wakes for a probe round at that deadline).",
    ]
    return "\n".join(lines)


# --- the partition matrix -----------------------------------------------------------------------------------


@dataclass
class PartitionResult:
    scenario: str
    what: str
    hold_s: float
    accepted: dict[str, int]
    attempts: dict[str, int]
    last_primary_accept: float | None
    first_standby_accept: float | None
    both_moments: int
    dr_state: str
    primary_db: str
    standby_db: str


def cut_dr_agent(world: DRWorld) -> None:
    # The DR region loses the primary region and the witness: link, both peer directions, its witness link.
    for proxy in (world.link, world.peer_links["dr"], world.peer_links["primary"], world.witness_links["dr"]):
        proxy.set("blackhole")


def cut_primary_side(world: DRWorld) -> None:
    # The primary agent reaches neither its peer nor the witness; the database link stays up.
    for proxy in (world.peer_links["dr"], world.peer_links["primary"], world.witness_links["primary"]):
        proxy.set("blackhole")


def cut_primary_region(world: DRWorld) -> None:
    # The whole primary region is cut off: from the DR region (link, peers, its health URL) and the witness,
    # which therefore no longer sees it healthy.
    for proxy in (world.link, world.peer_links["dr"], world.peer_links["primary"], world.witness_links["primary"]):
        proxy.set("blackhole")
    world.health["primary"].set("hang")
    world.witness.set("fail")


def cut_link(world: DRWorld) -> None:
    # Only the region link (replication and the DR agent's database probes); agents, witness, health fine.
    world.link.set("blackhole")


PARTITIONS: tuple[tuple[str, str, Callable[[DRWorld], None]], ...] = (
    ("DR agent isolated", "link, peer (both ways) and the DR agent's witness link blackholed", cut_dr_agent),
    ("primary side isolated", "peer (both ways) and the primary agent's witness link blackholed", cut_primary_side),
    (
        "full region partition",
        "link, peer, primary agent's witness link blackholed; primary health hangs; witness 503",
        cut_primary_region,
    ),
    ("link cut only", "the region link blackholed", cut_link),
)


def db_state(world: DRWorld, which: str) -> str:
    node = world.primary if which == "primary" else world.standby
    if not node.is_running():
        return "down"
    answer = node.psql(
        "postgres",
        "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only')",
        check=False,
    )
    recovery, read_only = [*answer.split("|"), "?", "?"][:2]
    if recovery == "t":
        return "standby"
    return "fenced (read-only)" if read_only == "on" else "writable"


def partition_run(
    moto: MotoServer, name: str, what: str, cut: Callable[[DRWorld], None], args: argparse.Namespace
) -> PartitionResult:
    hold = PARTITION_TIMEOUT_SECONDS + 5
    with fresh_world(moto) as world:
        configure(world, args.interval, args.threshold)
        bring_up(world)
        dr = world.agents["dr"]
        dsns = {"primary": world.pair.dsn(world.primary), "standby": world.pair.dsn(world.standby)}
        with WriteProber(dsns, password_file=world.pair.password_file, interval=0.1, timeout=0.5) as prober:
            time.sleep(1.0)  # a baseline: the primary accepts, the standby refuses
            started = time.time()
            cut(world)
            time.sleep(hold)
            # Past the minimum, keep the partition (and the prober) while the DR agent is mid-operation, so
            # the moment a promotion lands is inside the probed window.
            while time.time() - started < SETTLE_CAP_SECONDS and dr.status()["state"] in BUSY_PHASES:
                time.sleep(0.5)
            time.sleep(1.0)
            held = time.time() - started
            attempts = prober.snapshot()
            both = prober.both_writable_moments()
        window = [a for a in attempts if a.at >= started]
        accepted = {label: sum(1 for a in window if a.label == label and a.accepted) for label in dsns}
        tries = {label: sum(1 for a in window if a.label == label) for label in dsns}
        primary_hits = [a.at - started for a in window if a.label == "primary" and a.accepted]
        standby_hits = [a.at - started for a in window if a.label == "standby" and a.accepted]
        return PartitionResult(
            scenario=name,
            what=what,
            hold_s=held,
            accepted=accepted,
            attempts=tries,
            last_primary_accept=max(primary_hits) if primary_hits else None,
            first_standby_accept=min(standby_hits) if standby_hits else None,
            both_moments=len(both),
            dr_state=str(world.agents["dr"].status()["state"]),
            primary_db=db_state(world, "primary"),
            standby_db=db_state(world, "standby"),
        )


def partition_table(results: list[PartitionResult]) -> str:
    lines = [
        "| scenario | cut | held s | writes accepted primary / standby (of attempts) | last primary write s "
        "| first standby write s | both accepted | DR agent at end | primary DB | standby DB |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        accepted = (
            f"{r.accepted['primary']} / {r.accepted['standby']} ({r.attempts['primary']} / {r.attempts['standby']})"
        )
        lines.append(
            f"| {r.scenario} | {r.what} | {r.hold_s:.1f} | {accepted} | {cell(r.last_primary_accept)} "
            f"| {cell(r.first_standby_accept)} | **{r.both_moments}** | {r.dr_state} | {r.primary_db} "
            f"| {r.standby_db} |"
        )
    lines += [
        "",
        f"Each partition held partition_timeout + 5 s = {PARTITION_TIMEOUT_SECONDS + 5:g} s, longer while the DR "
        f"agent was mid-operation (then 1 s more; at most {SETTLE_CAP_SECONDS:g} s); a write every "
        "100 ms to each database over its direct DSN (autocommit INSERT, 0.5 s timeout); times in seconds from "
        'the cut. "both accepted": 100 ms ticks at which both databases accepted a write, over the whole probe.',
    ]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="failover runs per scenario (interleaved)")
    parser.add_argument("--interval", type=float, default=1.0, help="dr.health_check_interval, seconds")
    parser.add_argument("--threshold", type=int, default=3, help="dr.failover_threshold")
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all", help="which failover scenario")
    parser.add_argument("--partition", action="store_true", help="run the partition matrix instead")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="JSON and failure logs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    command = shlex.join([".venv/bin/python", "benchmarks/dr_bench.py", *sys.argv[1:]])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    head = f"`{command}` — {when}, commit {revision()}, {machine()}"
    print(head, flush=True)
    report: dict[str, Any] = {"argv": sys.argv[1:], "started": when, "machine": machine()}
    moto = start_moto_server()
    started = time.monotonic()
    try:
        if args.partition:
            results = []
            for name, what, cut in PARTITIONS:
                result = partition_run(moto, name, what, cut, args)
                results.append(result)
                print(
                    f"  {name}: accepted primary {result.accepted['primary']}, standby {result.accepted['standby']}, "
                    f"both {result.both_moments}",
                    flush=True,
                )
            report["partitions"] = [asdict(r) for r in results]
            table = partition_table(results)
            both = sum(r.both_moments for r in results)
            summary = (
                f"Summary: {len(results)} partition scenarios, {both} moment(s) where both databases accepted "
                f"writes{'' if both else ' (none)'}; {time.monotonic() - started:.0f} s."
            )
        else:
            scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
            runs: list[Run] = []
            for number in range(1, args.runs + 1):
                for scenario in scenarios:
                    run = failover_run(moto, scenario, number, args, args.out)
                    runs.append(run)
                    print(
                        f"  run {number}/{args.runs} {scenario}: writable {cell(run.t_writable)} s, "
                        f"DNS {cell(run.t_dns)} s"
                        + (f" — FAILED: {run.error}, logs {run.log_file}" if not run.ok else ""),
                        flush=True,
                    )
            report["runs"] = [asdict(r) for r in runs]
            table = failover_tables(runs, args)
            bound = args.threshold * args.interval + 2
            ok = [r for r in runs if r.ok]
            within = sum(1 for r in ok if r.t_writable is not None and r.t_writable <= bound)
            dns_within = sum(1 for r in ok if r.t_dns is not None and r.t_dns <= bound + 1)
            summary = (
                f"Summary: {len(ok)}/{len(runs)} runs failed over; "
                f"writable within {bound:g} s in {within}/{len(runs)}, "
                f"DNS within {bound + 1:g} s in {dns_within}/{len(runs)}; "
                f"worst writable {cell(worst([r.t_writable for r in runs]))} s; {time.monotonic() - started:.0f} s."
            )
    finally:
        moto.stop()
    text = f"{head}\n\n{table}\n\n{summary}"
    report["markdown"] = text
    kind = "partition" if args.partition else "failover"
    path = args.out / f"dr-{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{text}\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
