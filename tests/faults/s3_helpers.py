"""The S3 fault suite's machinery: isolated repositories behind the fault proxy, backups and restores run
as the real CLI, and the verdict on each: completed and intact, or failed cleanly — never hung, never
leaving anything behind.

Every backup gets its own prefix in one bucket, so runs can go side by side (most faults are waits, not
work) and each one's leftovers, faults and retries are its own: a fault rule names the prefix it applies to.
What is left behind is read from moto and PostgreSQL directly, never through the proxy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kybdr_agent.postgres.cluster import Cluster
from tests.faultproxy import Fault, FaultProxy
from tests.faults.report import FaultTally
from tests.support import KYBDR, MotoServer, agent_config, create_mixed_database, database_fingerprint, unique_db

PARALLEL: Final = 5
BLOB_MIB: Final = 6  # incompressible, so the stored object needs two parts of the 5 MiB minimum
_CLIENTS = threading.local()
_CLIENT_LOCK = threading.Lock()


def create_fault_database(cluster: Cluster, name: str) -> None:
    """The mixed sample (types, schemas, large objects) plus a few MiB that compression cannot shrink."""
    create_mixed_database(cluster, name, rows=2000)
    cluster.psql(
        name,
        "create table blobs (id int, data bytea); "
        "insert into blobs select g, decode(string_agg(md5((g*1000+i)::text), ''), 'hex') "
        f"from generate_series(1, {BLOB_MIB * 64}) g, generate_series(1, 1000) i group by g;",
    )


@dataclass
class Suite:
    """What every fault test shares: the source database and its fingerprint, the proxy, a bucket, a key."""

    pg: Cluster
    moto: MotoServer
    proxy: FaultProxy
    bucket: str
    database: str
    fingerprint: dict[str, str]
    key_file: Path
    workdir: Path

    @property
    def s3(self) -> Any:
        """A client straight to moto, one per thread (creating boto3 clients is not thread-safe)."""
        client = getattr(_CLIENTS, "s3", None)
        if client is None or getattr(_CLIENTS, "endpoint", None) != self.moto.endpoint:
            with _CLIENT_LOCK:
                client = self.moto.client()
            _CLIENTS.s3, _CLIENTS.endpoint = client, self.moto.endpoint
        return client


@contextlib.contextmanager
def open_suite(pg: Cluster, moto: MotoServer, workdir: Path) -> Iterator[Suite]:
    database = unique_db("faults")
    create_fault_database(pg, database)
    bucket = f"kybdr-faults-{secrets.token_hex(4)}"
    moto.client().create_bucket(Bucket=bucket)
    key_file = workdir / "master.key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    key_file.chmod(0o600)
    try:
        with FaultProxy(moto.endpoint, seed=7) as proxy:
            yield Suite(pg, moto, proxy, bucket, database, database_fingerprint(pg, database), key_file, workdir)
    finally:
        pg.psql("postgres", f'drop database if exists "{database}"')


@dataclass(frozen=True)
class Repo:
    """One isolated repository (a prefix): a config through the proxy and one straight to moto."""

    prefix: str
    config: Path
    direct: Path
    attempts: int


def make_repo(suite: Suite, label: str, *, request_timeout: float = 2, attempts: int = 3) -> Repo:
    prefix = f"{label}-{secrets.token_hex(3)}"
    configs = []
    for name, endpoint in (("proxy", suite.proxy.endpoint), ("direct", suite.moto.endpoint)):
        folder = suite.workdir / prefix / name
        folder.mkdir(parents=True)
        repository = (
            f'url = "s3://{suite.bucket}/{prefix}"\nendpoint_url = "{endpoint}"\nregion = "us-east-1"\n'
            f'addressing_style = "path"\nmin_part_size_mib = 5\nrequest_timeout_seconds = {request_timeout}\n'
            f"max_attempts = {attempts}\nconnect_timeout_seconds = 2\n"
        )
        configs.append(agent_config(folder, suite.pg, repository=repository, key_file=suite.key_file))
    return Repo(prefix, configs[0], configs[1], attempts)


@dataclass
class Run:
    """One CLI run (a backup, or a restore into ``target``) and what is wrong with how it ended."""

    repo: Repo
    returncode: int | None  # None: still running at its deadline (killed, counted as hung)
    stdout: str
    stderr: str
    seconds: float
    target: str | None = None
    restored: str | None = None  # the backup a restore read
    problems: list[str] = field(default_factory=list)

    @property
    def backup_id(self) -> str | None:
        words = self.stdout.split()
        return words[-1] if self.returncode == 0 and self.target is None and words else None

    def events(self, name: str) -> list[dict[str, Any]]:
        """The agent's JSON log records named ``name`` (the CLI runs with -v, logging to stderr)."""
        found = []
        for line in self.stderr.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == name:
                        found.append(record)
        return found

    @property
    def message(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.startswith("kybdr-agent:")]
        return lines[-1] if lines else ""


def cli_env() -> dict[str, str]:
    """The CLI's environment: moto's fake credentials and no KYBDR_* overrides. Module-scoped fixtures run
    before conftest's per-test credentials fixture, so the runs here cannot rely on it."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("KYBDR_", "AWS_"))}
    return env | {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def cli(config: Path, *args: str, deadline: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KYBDR, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=deadline,
        env=cli_env(),
        check=False,
    )


def run_command(repo: Repo, *args: str, deadline: float) -> Run:
    started = time.monotonic()
    try:
        proc = cli(repo.config, "-v", *args, deadline=deadline)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return Run(repo, None, out, err, time.monotonic() - started)
    return Run(repo, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def _uploads(s3: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = s3.list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/").get("Uploads", [])
    return uploads


def _keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def leftovers(suite: Suite, repo: Repo, backup_id: str | None) -> list[str]:
    """Everything in the repository but the one completed backup's data, globals and manifest: open uploads,
    any other object (a manifest, data, globals or lease of a failed backup)."""
    found = [f"open upload {u['Key']}" for u in _uploads(suite.s3, suite.bucket, repo.prefix)]
    keys = _keys(suite.s3, suite.bucket, repo.prefix)
    folder = next((k.rsplit("/", 1)[0] for k in keys if backup_id and f"/{backup_id}/" in k), None)
    keep = {f"{folder}/manifest.json", f"{folder}/data", f"{folder}/globals"} if folder else set()
    return found + [f"object {k}" for k in keys if k not in keep]


def stored_intact(suite: Suite, repo: Repo, backup_id: str) -> str | None:
    """None when the stored object is exactly what the manifest recorded (size and SHA-256); else why not."""
    s3 = suite.s3
    key = next((k for k in _keys(s3, suite.bucket, repo.prefix) if f"/{backup_id}/manifest.json" in k), None)
    if key is None:
        return "no manifest"
    made = json.loads(s3.get_object(Bucket=suite.bucket, Key=key)["Body"].read())
    for record in (made, made["globals"]):
        data = s3.get_object(Bucket=suite.bucket, Key=f"{repo.prefix}/{record['object_key']}")["Body"].read()
        if len(data) != record["stored_bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            return (
                f"stored object {record['object_key']} differs from its manifest ({len(data)} bytes, manifest "
                f"{record['stored_bytes']})"
            )
    return None


def restore_matches(suite: Suite, config: Path, backup_id: str, *, deadline: float = 120) -> str | None:
    """Restore into a new database and compare it with the source; None when identical, else why not."""
    target = unique_db("restored")
    proc = cli(config, "restore", backup_id, "--target-database", target, deadline=deadline)
    try:
        if proc.returncode != 0:
            return f"restore failed: {proc.stderr.strip()[-500:]}"
        if database_fingerprint(suite.pg, target) != suite.fingerprint:
            return "restored database differs from the source"
        return None
    finally:
        suite.pg.psql("postgres", f'drop database if exists "{target}"')


def _common_problems(run: Run) -> bool:
    """What every run is judged on; False when it hung (nothing more can be judged)."""
    if run.returncode is None:
        run.problems.append(f"hung: still running after {run.seconds:.0f} s")
        return False
    if "Traceback" in run.stderr:
        run.problems.append("a traceback on stderr")
    for retry in run.events("s3.retry"):
        if not {"operation", "attempt", "reason"} <= retry.keys() or not 1 <= int(retry["attempt"]) < run.repo.attempts:
            run.problems.append(f"retry log line out of bounds: {retry}")
    if run.returncode not in (0, 1):
        run.problems.append(f"exit status {run.returncode}")
    elif run.returncode == 1 and (not run.message.startswith("kybdr-agent: ") or len(run.message) > 2000):
        run.problems.append(f"unclear failure message: {run.stderr.strip()[-800:]!r}")
    return True


def judge_backup(suite: Suite, run: Run) -> None:
    """A backup is complete and intact, or failed cleanly; either way nothing else is left in its repository."""
    if not _common_problems(run):
        return
    if left := leftovers(suite, run.repo, run.backup_id):
        run.problems.append(f"left behind: {left}")
    if run.returncode == 0:
        if run.backup_id is None:
            run.problems.append("exit 0 without a backup id")
        elif why := stored_intact(suite, run.repo, run.backup_id):
            run.problems.append(why)
    elif run.returncode == 1 and not run.message.startswith("kybdr-agent: backup failed: "):
        run.problems.append(f"not a backup failure: {run.message!r}")


def judge_restore(suite: Suite, run: Run) -> None:
    """A restore gives a database identical to the source, or fails cleanly without creating its target."""
    assert run.target is not None
    try:
        if not _common_problems(run):
            return
        exists = suite.pg.psql("postgres", f"select count(*) from pg_database where datname = '{run.target}'")
        if run.returncode == 0:
            if database_fingerprint(suite.pg, run.target) != suite.fingerprint:
                run.problems.append("restored database differs from the source")
        elif exists.strip() != "0":
            run.problems.append(f"left behind: the target database {run.target} of a failed restore")
    finally:
        suite.pg.psql("postgres", f'drop database if exists "{run.target}"')


def tally(name: str, runs: Iterable[Run], injected: int) -> FaultTally:
    counted = FaultTally(fault=name, injected=injected)
    for run in runs:
        counted.attempted += 1
        if run.returncode is None:
            counted.hung += 1
        elif any(p.startswith("left behind") for p in run.problems):
            counted.left_behind += 1
        elif not run.problems:
            if run.returncode == 0:
                counted.restorable += 1
            else:
                counted.failed_cleanly += 1
    return counted


@dataclass
class Plan:
    """Runs under one kind of fault: what the tally calls it, how many, and the proxy's rules for one run
    (given the string that singles out that run's requests: its repository's prefix)."""

    fault: str
    count: int
    rules: Callable[[str], list[Fault]]
    request_timeout: float = 2
    attempts: int = 3
    deadline: float = 90
    sweep_after: bool = False  # judge what is left only after the next command (and its sweep) ran


@dataclass
class Outcome:
    plan: Plan
    runs: list[Run]
    injected: int

    def tally(self) -> FaultTally:
        return tally(self.plan.fault, self.runs, self.injected)


def _side_by_side(
    suite: Suite, jobs: Sequence[tuple[Plan, Repo, str | None]], one: Callable[[Plan, Repo, str | None], Run]
) -> list[Outcome]:
    """Install each job's faults, run all jobs in a pool, and group the judged runs by plan."""
    rules = [plan.rules(f"{repo.prefix}/") for plan, repo, _ in jobs]
    for installed in rules:
        for rule in installed:
            suite.proxy.add(rule)
    try:
        with ThreadPoolExecutor(PARALLEL) as pool:
            runs = list(pool.map(lambda job: one(*job), jobs))
    finally:
        for installed in rules:
            for rule in installed:
                suite.proxy.remove(rule)
    outcomes: dict[int, Outcome] = {}
    for (plan, _, _), run, installed in zip(jobs, runs, rules, strict=True):
        outcome = outcomes.setdefault(id(plan), Outcome(plan, [], 0))
        outcome.runs.append(run)
        outcome.injected += sum(rule.hits for rule in installed)
    return list(outcomes.values())


def run_backups(suite: Suite, *plans: Plan) -> list[Outcome]:
    """Every plan's backups side by side, each in its own repository with its own faults, then judged."""
    jobs = [
        (plan, make_repo(suite, f"p{n}b{i}", request_timeout=plan.request_timeout, attempts=plan.attempts), None)
        for n, plan in enumerate(plans)
        for i in range(plan.count)
    ]

    def one(plan: Plan, repo: Repo, _: str | None) -> Run:
        run = run_command(repo, "backup", "--database", suite.database, deadline=plan.deadline)
        if plan.sweep_after and run.returncode is not None:
            follow = cli(repo.direct, "list", deadline=60)
            if follow.returncode != 0:
                run.problems.append(f"the next command failed: {follow.stderr.strip()[-300:]}")
        judge_backup(suite, run)
        return run

    return _side_by_side(suite, jobs, one)


def run_restores(suite: Suite, sources: list[Run], *plans: Plan) -> list[Outcome]:
    """Restore completed backups (one source each, so each restore's faults are its own) through the proxy
    under each plan's faults, side by side, and judge each restored database against the source."""
    available = iter(sources)
    jobs = [(plan, run.repo, run.backup_id) for plan in plans for run in [next(available) for _ in range(plan.count)]]

    def one(plan: Plan, repo: Repo, backup_id: str | None) -> Run:
        assert backup_id is not None
        target = unique_db("restored")
        run = run_command(repo, "restore", backup_id, "--target-database", target, deadline=plan.deadline)
        run.target, run.restored = target, backup_id
        judge_restore(suite, run)
        return run

    outcomes = _side_by_side(suite, jobs, one)
    scratch = suite.pg.psql("postgres", "select datname from pg_database where datname like 'kybdr_restore_%'")
    if scratch.strip():
        for outcome in outcomes:
            for run in outcome.runs:
                if run.returncode != 0:
                    run.problems.append(f"left behind: scratch databases {scratch.split()}")
    return outcomes


def describe(runs: Iterable[Run]) -> str:
    """What went wrong, for an assertion message."""
    return "\n".join(
        f"{run.repo.prefix}: rc={run.returncode} after {run.seconds:.1f} s: {run.problems}\n  {run.message}"
        for run in runs
        if run.problems
    )
