"""A full disk under a folder repository, and two agents sharing one repository.

The disk is a real small filesystem (a tmpfs, else a loop-mounted ext4 image) that the backup outgrows, then
one filled to the last block: each backup fails with one clear message and leaves nothing, and once space
is freed backups work again.

The two agents are two daemons (two configurations, two control sockets, one repository, one database
server), each covering its own databases with its own policies. While agent A runs a long backup, agent B
sweeps the repository over and over (its housekeeping every second, the floor, with no grace for
leaseless leftovers) and runs its retention cleanup, and one-shot commands with B's configuration sweep
too: A's upload and objects are never touched, A's backup completes and validates, and B's cleanup deletes
only what B's own policy lets go — never A's backups, which B's ``retention_days`` still keeps. In the S3
variant B runs under another host name (a UTS namespace), so it judges A's lease as another machine would
(by its renewal time), while the one-shot commands judge it as this host does (by A's pid).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kybdr_agent.postgres.cluster import PG_BIN, Cluster
from tests.daemon_support import Daemon
from tests.faults.fault_support import (
    HoldingProxy,
    Repo,
    SmallFilesystem,
    cli,
    conclude,
    folder_repo,
    invalid_backups,
    log_events,
    other_host,
    policy,
    s3_repo,
    shared_database,
    small_filesystem,
    start_agent,
    start_cli,
    wait_for,
    write_config,
)
from tests.faults.report import FaultTally
from tests.support import MotoServer


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "master.key"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


# --- a full disk ----------------------------------------------------------------------------------------


def _failed_clearly(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """Why ``proc`` is not one clean "no space" failure (empty if it is one)."""
    problems = []
    if proc.returncode != 1:
        problems.append(f"exit status {proc.returncode}, expected 1")
    if "Traceback" in proc.stderr:
        problems.append("a traceback on stderr")
    said = [line for line in proc.stderr.splitlines() if line.startswith("kybdr-agent: backup failed")]
    if len(said) != 1 or "No space left on device" not in said[0]:
        problems.append(f"not one 'backup failed: ... No space left on device' line: {proc.stderr.strip()!r}")
    if proc.stdout.strip():
        problems.append(f"something on stdout: {proc.stdout.strip()!r}")
    return problems


def test_a_full_disk_fails_each_backup_cleanly_and_backups_resume_once_space_is_freed(
    pg: Cluster, tmp_path: Path, keys: Path
) -> None:
    small_db = shared_database(pg, "small")
    big_db = shared_database(pg, "big")
    with small_filesystem(tmp_path / "disk", megabytes=8) as fs:
        if not isinstance(fs, SmallFilesystem):
            pytest.skip(f"cannot mount a small filesystem here: {fs}")
        repo = folder_repo(fs.path / "repo")
        config, _socket = write_config(tmp_path / "agent.toml", pg, repo, key_file=keys)
        problems: dict[str, list[str]] = {}
        leftovers: dict[str, list[str]] = {}

        # 1. A backup larger than the whole filesystem: the data write runs out of space mid-dump.
        outgrown = cli(config, "backup", "--database", big_db)
        problems["outgrown"] = _failed_clearly(outgrown)
        leftovers["outgrown"] = repo.leftovers() + [f"object {key}" for key in repo.objects()]

        # 2. A filesystem full to the last block: not even the lease can be written.
        filler = fs.fill()
        assert fs.free_bytes() < 64 << 10, fs.free_bytes()
        full = cli(config, "backup", "--database", small_db)
        problems["full"] = _failed_clearly(full)
        leftovers["full"] = repo.leftovers() + [f"object {key}" for key in repo.objects() if key != "filler"]

        # 3. Space freed: a backup works and validates, and nothing else is there.
        filler.unlink()
        freed = cli(config, "backup", "--database", small_db, "--json")
        made = json.loads(freed.stdout)["id"] if freed.returncode == 0 else None
        invalid = invalid_backups(config, [made]) if made else {"-": freed.stderr}
        leftovers["freed"] = repo.leftovers()
        listed = repo.completed_ids()

    clean = [name for name in ("outgrown", "full") if not problems[name] and not leftovers[name]]
    conclude(
        FaultTally(
            fault=f"disk full under a folder repository ({fs.kind})",
            injected=2,
            attempted=3,
            restorable=int(made is not None and not invalid and listed == {made}),
            failed_cleanly=len(clean),
            hung=0,
            left_behind=len(set().union(*leftovers.values())),  # one leftover seen at two steps counts once
        ),
        problems=problems,
        leftovers=leftovers,
        invalid=invalid,
        listed=listed,
        freed_stderr=freed.stderr[-1000:],
    )


# --- two agents, one repository -------------------------------------------------------------------------


def _one_job(daemon: Daemon, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = daemon.request("POST", path, body)
    assert resp.status in (200, 202), resp.body
    jobs: list[dict[str, Any]] = resp.body["jobs"]
    assert len(jobs) == 1, jobs
    return jobs[0]


def _backup(daemon: Daemon, database: str) -> str:
    job = _one_job(daemon, "/v1/backup?wait=true", {"database": database})
    assert job["status"] == "succeeded", job
    backup_id: str = job["result"]["id"]
    return backup_id


def _invalid(daemon: Daemon, ids: set[str]) -> dict[str, str]:
    """Each backup whose full validation (through the agent) fails, with the error."""
    bad: dict[str, str] = {}
    for backup_id in sorted(ids):
        job = _one_job(daemon, f"/v1/backup/{backup_id}/validate?wait=true", {"level": "full"})
        if job["status"] != "succeeded" or not (job["result"] or {}).get("ok"):
            bad[backup_id] = str(job.get("error") or job.get("result"))
    return bad


@contextlib.contextmanager
def _dump_held_back(pg: Cluster, database: str, seconds: float) -> Iterator[None]:
    """An ACCESS EXCLUSIVE lock on one of ``database``'s tables for ``seconds``: a pg_dump started meanwhile
    waits for it with its upload open, so a folder backup (over in half a second otherwise) stays in
    flight long enough for the other agent's sweeps to meet it."""
    table = pg.psql(
        database,
        "select quote_ident(relname) from pg_class where relkind = 'r' "
        "and relnamespace = 'public'::regnamespace order by relname limit 1",
    ).strip()
    holder = subprocess.Popen(
        [str(PG_BIN / "psql"), "-X", "-q", "-d", database],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **pg.env()},
    )
    assert holder.stdin is not None
    holder.stdin.write(
        f"begin; lock table {table} in access exclusive mode; select pg_sleep({seconds}); commit;\n".encode()
    )
    holder.stdin.close()
    held = f"select count(*) from pg_locks where mode = 'AccessExclusiveLock' and relation = '{table}'::regclass"
    wait_for(lambda: pg.psql(database, held).strip() == "1", 30, f"the lock on {table}")
    try:
        yield
    finally:
        holder.wait(timeout=seconds + 60)


@pytest.mark.parametrize("kind", ["folder", "s3"])
def test_two_agents_on_one_repository_never_delete_each_others_backups(
    kind: str, pg: Cluster, tmp_path: Path, keys: Path, moto_server: MotoServer
) -> None:
    db_a = shared_database(pg, "small")
    big_a = shared_database(pg, "big")
    db_b = shared_database(pg, "tiny")
    with HoldingProxy(moto_server.endpoint) as proxy:
        if kind == "s3":
            bucket = f"kybdr-peers-{secrets.token_hex(4)}"
            moto_server.client().create_bucket(Bucket=bucket)
            # A's parts crawl through the proxy, so its backup stays in flight for several seconds.
            proxy.delay_upload_part = 1.0
            repo_a: Repo = s3_repo(moto_server, bucket, proxy.endpoint)
            repo_b: Repo = s3_repo(moto_server, bucket)
            b_prefix = other_host("kybdr-peer-b")
        else:
            repo_a = repo_b = folder_repo(tmp_path / "repo")
            b_prefix = []
        keep_a = policy("a-keep", db_a, keep_daily=7, min_age="1h") + policy("a-big", big_a, keep_daily=7)
        thin_b = policy("b-thin", db_b, keep_daily=1, keep_weekly=0, keep_monthly=0, keep_yearly=0, min_age="0s")
        config_a, socket_a = write_config(
            tmp_path / "a.toml", pg, repo_a, key_file=keys, databases=[db_a, big_a], policies=keep_a
        )
        config_b, socket_b = write_config(
            tmp_path / "b.toml",
            pg,
            repo_b,
            key_file=keys,
            databases=[db_b],
            policies=thin_b,
            backup_extra="retention_days = 1\n",
            daemon_extra='sweep_older_than = "0s"\nhousekeeping_interval = "1s"\n',
        )
        agent_a = start_agent(config_a, socket_a, tmp_path)
        try:
            agent_b = start_agent(config_b, socket_b, tmp_path, prefix=b_prefix)
        except BaseException:
            agent_a.stop()  # never leave A running because B could not start
            raise
        try:
            kept_a = [_backup(agent_a, db_a), _backup(agent_a, db_a)]
            made_b = [_backup(agent_b, db_b), _backup(agent_b, db_b)]

            held_back = contextlib.ExitStack()
            if kind == "folder":  # (the S3 variant's parts crawl through the proxy instead)
                held_back.enter_context(_dump_held_back(pg, big_a, 4.0))
            job = _one_job(agent_a, "/v1/backup", {"database": big_a})
            started = time.monotonic()
            wait_for(lambda: repo_b.uploads(), 60, "A's upload to start")
            in_flight = repo_b.uploads()
            sweeps_before = len(log_events(agent_b, "housekeeping.sweep"))
            # B's one-shot commands sweep at their start too (as this host, judging A by its pid).
            one_shots = [start_cli(config_b, "list", "--json"), start_cli(config_b, "cleanup", "--json")]
            cleanups = 0
            deleted_by_b: set[str] = set()
            while agent_a.request("GET", f"/v1/jobs/{job['id']}").body["status"] in ("queued", "running"):
                cleaned = _one_job(agent_b, "/v1/backup/cleanup?wait=true", {"dry_run": False})
                assert cleaned["status"] == "succeeded", cleaned
                deleted_by_b |= set(cleaned["result"]["deleted"])
                cleanups += 1
                time.sleep(0.05)
            a_seconds = time.monotonic() - started
            finished = agent_a.wait_job(job["id"])
            held_back.close()
            outputs = [proc.communicate(timeout=120) for proc in one_shots]
            one_shot_codes = [proc.returncode for proc in one_shots]
            if one_shots[1].returncode == 0:
                deleted_by_b |= set(json.loads(outputs[1][0])["deleted"])
            sweeps = log_events(agent_b, "housekeeping.sweep")[sweeps_before:]
            saw_a_live = [s for s in sweeps if any(big_a in prefix for prefix in s.get("live_backups", []))]

            listed_a = {b["id"] for b in agent_a.request("GET", "/v1/backup").body["backups"]}
            invalid = _invalid(agent_a, listed_a & {*kept_a, (finished.get("result") or {}).get("id")})
            leftovers = repo_a.leftovers()
        finally:
            assert agent_b.stop() == 0, agent_b.log()[-3000:]
            assert agent_a.stop() == 0, agent_a.log()[-3000:]

    big_id = (finished.get("result") or {}).get("id")
    a_backups = {*kept_a, big_id} - {None}
    lost = sorted(set(kept_a) - listed_a) + sorted(a_backups & deleted_by_b)
    conclude(
        FaultTally(
            fault=f"two agents on one repository ({kind}{', B as another host' if b_prefix else ''})",
            injected=len(sweeps) + cleanups + len(one_shots),
            attempted=3,
            restorable=len((a_backups & listed_a) - set(invalid)),
            failed_cleanly=0,
            hung=0,
            left_behind=len(leftovers) + len(lost),
        ),
        a_job=finished,
        lost_a_backups=lost,
        leftovers=leftovers,
        invalid=invalid,
        one_shot_stderr=[err[-500:] for _out, err in outputs],
    )
    assert finished["status"] == "succeeded", finished
    assert one_shot_codes == [0, 0], outputs
    assert in_flight, "A's upload was never seen in flight"
    # B's cleanup worked on B's own backups (the older one goes) and on nothing of A's.
    assert deleted_by_b == {made_b[0]}, deleted_by_b
    # The race really happened: B swept (every second, its floor) while A's backup ran, and saw it as live.
    assert len(saw_a_live) >= 1, (a_seconds, len(sweeps), sweeps[-3:])
    assert cleanups >= 1
