"""The S3 fault suite's machinery: isolated repositories behind the fault proxy, backups run as the real CLI,
and the verdict on each: completed and intact, or failed cleanly — never hung, never leaving anything behind.

Every backup gets its own prefix in one bucket, so backups can run side by side (the faults are waits, not
work) and each one's leftovers, faults and retries are its own. What is left behind is read from moto
directly, never through the proxy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kybdr_agent.pgcluster import Cluster
from tests.faultproxy import Fault, FaultProxy
from tests.faults.report import FaultTally
from tests.support import (
    MotoServer,
    agent_config,
    create_mixed_database,
    database_fingerprint,
    run_cli,
    unique_db,
)

MIB: Final = 1 << 20
PARALLEL: Final = 4
BLOB_MIB: Final = 6  # incompressible, so the stored object needs two 5 MiB-minimum parts


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
    """What every fault test shares: the source database, the proxy, one bucket and a key."""

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
        return self.moto.client()


@dataclass(frozen=True)
class Repo:
    """One isolated repository (a prefix): a config through the proxy and one straight to moto."""

    prefix: str
    config: Path
    direct: Path


def make_repo(suite: Suite, label: str, *, request_timeout: float = 2, attempts: int = 3, extra: str = "") -> Repo:
    prefix = f"{label}-{secrets.token_hex(3)}"
    folder = suite.workdir / prefix
    configs = []
    for name, endpoint in (("proxy", suite.proxy.endpoint), ("direct", suite.moto.endpoint)):
        path = folder / name
        path.mkdir(parents=True)
        repository = (
            f'url = "s3://{suite.bucket}/{prefix}"\nendpoint_url = "{endpoint}"\nregion = "us-east-1"\n'
            f'addressing_style = "path"\nmin_part_size_mib = 5\nrequest_timeout_seconds = {request_timeout}\n'
            f"max_attempts = {attempts}\nconnect_timeout_seconds = 2\n{extra}"
        )
        configs.append(agent_config(path, suite.pg, repository=repository, key_file=suite.key_file))
    return Repo(prefix, configs[0], configs[1])


@dataclass
class Run:
    """One CLI run and its verdict."""

    repo: Repo
    returncode: int | None  # None: still running at its deadline (killed, counted as hung)
    stdout: str
    stderr: str
    seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def backup_id(self) -> str | None:
        lines = self.stdout.split()
        return lines[-1] if self.returncode == 0 and lines else None

    def events(self, name: str) -> list[dict[str, Any]]:
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


def run_backup(suite: Suite, repo: Repo, deadline: float) -> Run:
    started = time.monotonic()
    try:
        proc = run_cli(repo.config, "-v", "backup", "--database", suite.database, timeout=deadline)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return Run(repo, None, out, err, time.monotonic() - started)
    return Run(repo, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def leftovers(suite: Suite, repo: Repo, backup_id: str | None) -> list[str]:
    """Everything under the repository that is not the one completed backup: open uploads, any object."""
    s3 = suite.s3
    found = [f"open upload {u['Key']}" for u in _uploads(s3, suite.bucket, repo.prefix)]
    keep = set()
    if backup_id is not None:
        folder = next((k.rsplit("/", 1)[0] for k in _keys(s3, suite.bucket, repo.prefix) if backup_id in k), None)
        keep = {f"{folder}/manifest.json", f"{folder}/data"}
    found += [f"object {k}" for k in _keys(s3, suite.bucket, repo.prefix) if k not in keep]
    return found


def _uploads(s3: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = s3.list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/").get("Uploads", [])
    return uploads


def _keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def stored_intact(suite: Suite, repo: Repo, backup_id: str) -> str | None:
    """None when the stored object is exactly what the manifest recorded (size and SHA-256); else why not."""
    s3 = suite.s3
    keys = _keys(s3, suite.bucket, repo.prefix)
    manifest_key = next((k for k in keys if backup_id in k and k.endswith("/manifest.json")), None)
    if manifest_key is None:
        return "no manifest"
    made = json.loads(s3.get_object(Bucket=suite.bucket, Key=manifest_key)["Body"].read())
    data = s3.get_object(Bucket=suite.bucket, Key=f"{repo.prefix}/{made['object_key']}")["Body"].read()
    if len(data) != made["stored_bytes"] or hashlib.sha256(data).hexdigest() != made["sha256"]:
        return f"stored object differs from its manifest ({len(data)} bytes vs {made['stored_bytes']})"
    return None


def restore_matches(suite: Suite, config: Path, backup_id: str, *, deadline: float = 120) -> str | None:
    """Restore into a new database and compare it with the source; None when identical, else why not."""
    target = unique_db("restored")
    proc = run_cli(config, "restore", backup_id, "--target-database", target, timeout=deadline)
    try:
        if proc.returncode != 0:
            return f"restore failed: {proc.stderr.strip()[-500:]}"
        if database_fingerprint(suite.pg, target) != suite.fingerprint:
            return "restored database differs from the source"
        return None
    finally:
        suite.pg.psql("postgres", f'drop database if exists "{target}"')


def judge_backup(suite: Suite, run: Run, *, attempts: int) -> None:
    """Fill ``run.problems``: the backup must be complete and intact, or have failed cleanly; either way
    with nothing left behind, no traceback, and retries bounded and logged."""
    if run.returncode is None:
        run.problems.append(f"hung: still running after {run.seconds:.0f} s")
        return
    if "Traceback" in run.stderr:
        run.problems.append("a traceback on stderr")
    for retry in run.events("s3.retry"):
        if not {"operation", "attempt", "reason"} <= retry.keys() or not 1 <= int(retry["attempt"]) < attempts:
            run.problems.append(f"retry log line out of bounds: {retry}")
    left = leftovers(suite, run.repo, run.backup_id)
    if left:
        run.problems.append(f"left behind: {left}")
    if run.returncode == 0:
        if run.backup_id is None:
            run.problems.append("exit 0 without a backup id")
        elif why := stored_intact(suite, run.repo, run.backup_id):
            run.problems.append(why)
    elif run.returncode != 1:
        run.problems.append(f"exit status {run.returncode}")
    elif not run.message.startswith("kybdr-agent: backup failed: ") or len(run.message) > 2000:
        run.problems.append(f"unclear failure message: {run.stderr.strip()[-800:]!r}")


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


def run_backups(
    suite: Suite,
    label: str,
    count: int,
    faults: Callable[[str], list[Fault]],
    *,
    request_timeout: float = 2,
    attempts: int = 3,
    deadline: float = 90,
) -> tuple[list[Run], int]:
    """``count`` backups side by side, each in its own repository with its own faults; judged, with the
    number of faults the proxy injected into them."""
    repos = [make_repo(suite, f"{label}{i}", request_timeout=request_timeout, attempts=attempts) for i in range(count)]
    rules = [rule for repo in repos for rule in faults(f"{repo.prefix}/")]
    for rule in rules:
        suite.proxy.add(rule)
    with ThreadPoolExecutor(PARALLEL) as pool:
        runs = list(pool.map(lambda repo: run_backup(suite, repo, deadline), repos))
    for run in runs:
        judge_backup(suite, run, attempts=attempts)
    return runs, sum(rule.hits for rule in rules)


def describe(runs: Iterable[Run]) -> str:
    """What went wrong, for an assertion message."""
    return "\n".join(f"{run.repo.prefix}: rc={run.returncode} {run.problems}" for run in runs if run.problems)


@contextlib.contextmanager
def open_suite(pg: Cluster, moto: MotoServer, workdir: Path) -> Iterator[Suite]:
    """A source database, its fingerprint, a bucket and a key, and the fault proxy in front of moto."""
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
