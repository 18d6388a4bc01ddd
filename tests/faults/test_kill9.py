"""``kill -9`` at every stage, for a folder repository and for S3 (a real moto server over HTTP).

Stages: mid-upload (pg_dump running), between the data object's completion and the manifest write, mid-
cleanup (between a backup's manifest delete and its data delete), mid-restore (pg_restore streaming into
its scratch database), and a daemon killed mid-backup then restarted. After each kill the NEXT command
(``list``, another ``restore``, or the restarted daemon) must leave nothing behind — no open multipart
upload, no ``.kybdr-tmp-*`` file, no object in a folder without a manifest (a lease included), no empty
folder, no scratch database, no pg_dump/pg_restore still running — and every backup it lists must pass
``validate --level full``.

Windows too narrow to hit by timing are widened from outside, never by changing the agent: the proxy holds
the request that starts the next stage (and drops it when its client dies, as a killed process's request
never completes), pg_dump is stopped mid-dump by a lock on the database's large objects, a folder
repository's unlinks are slowed with ``strace --inject``, or the agent is frozen with SIGSTOP at the instant
the stage's first trace appears and then killed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

from kybdr_agent.postgres.cluster import Cluster
from tests.daemon_support import Daemon
from tests.faults.fault_support import (
    LEASE,
    MANIFEST,
    TEMP_MARKER,
    HoldingProxy,
    Repo,
    RepoKind,
    bytes_read,
    cli,
    cli_ok,
    conclude,
    descendants,
    drop_databases,
    folder_repo,
    invalid_backups,
    kill9,
    large_objects_locked,
    orphaned_tools,
    policy,
    running,
    s3_repo,
    scratch_databases,
    shared_database,
    start_agent,
    start_cli,
    tool_children,
    wait_for,
    write_config,
)
from tests.faults.report import FaultTally
from tests.support import MotoServer, database_fingerprint, unique_db

# For the kills mid-upload: compression in the agent's own thread, so what pg_dump has written reaches the
# upload at once (libzstd's worker would hold a few MiB back, more on a loaded machine) and the first 5 MiB
# part is sent well before pg_dump stops at the large objects (``large_objects_locked``).
ONE_THREAD: Final = "[compression]\nthreads = 0\n"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "master.key"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def small_db(pg: Cluster) -> str:
    return shared_database(pg, "small")


@pytest.fixture(scope="module")
def big_db(pg: Cluster) -> str:
    return shared_database(pg, "big")


@dataclass
class Env:
    """One test's repository (folder, or S3 behind a holding proxy) and what it created on the server."""

    kind: RepoKind
    pg: Cluster
    tmp: Path
    keys: Path
    repo: Repo
    proxy: HoldingProxy | None = None
    databases: list[str] = field(default_factory=list)

    def config(self, name: str = "agent", **kwargs: Any) -> Path:
        path, _socket = write_config(self.tmp / f"{name}.toml", self.pg, self.repo, key_file=self.keys, **kwargs)
        return path

    def hold_parts(self) -> None:
        """S3: hold every UploadPart, so the upload stays open (and pg_dump blocked) until the kill."""
        if self.proxy is not None:
            self.proxy.hold("PUT", "", 120, part=True)

    def settle(self) -> None:
        """After a kill: wait until the proxy has dropped the dead agent's held requests."""
        if self.proxy is not None:
            proxy = self.proxy
            wait_for(lambda: all(h.pending == 0 for h in proxy.holds), 10, "held requests to be dropped")
            proxy.holds.clear()

    def upload_started(self, min_bytes: int = 1 << 20) -> bool:
        """The data upload is under way: S3, its first part has reached the proxy; folder, its temp file
        holds at least ``min_bytes``. Cheap, so it can be polled every millisecond."""
        if self.proxy is not None:
            return any(h.part and h.seen for h in self.proxy.holds)
        return any(
            key.rpartition("/")[2].startswith(f"{TEMP_MARKER}data") and size >= min_bytes
            for key, size in self.repo.objects().items()
        )


@pytest.fixture(params=["folder", "s3"])
def env(
    request: pytest.FixtureRequest, pg: Cluster, tmp_path: Path, keys: Path, moto_server: MotoServer
) -> Iterator[Env]:
    before = set(scratch_databases(pg))
    if request.param == "folder":
        made = Env("folder", pg, tmp_path, keys, folder_repo(tmp_path / "repo"))
        yield made
    else:
        bucket = f"kybdr-k9-{secrets.token_hex(4)}"
        moto_server.client().create_bucket(Bucket=bucket)
        with HoldingProxy(moto_server.endpoint) as proxy:
            made = Env("s3", pg, tmp_path, keys, s3_repo(moto_server, bucket, proxy.endpoint), proxy)
            yield made
    # A failing test must not fail later ones through what it left on the shared server.
    drop_databases(pg, [*(set(scratch_databases(pg)) - before), *made.databases])


@dataclass
class Aftermath:
    """What the next command left: listed backups, leftovers of every kind, and whether it hung."""

    listed: set[str]
    leftovers: list[str]
    invalid: dict[str, str]
    hung: int = 0


def next_list(env: Env, config: Path, orphans: list[str]) -> Aftermath:
    """Run ``list`` (it sweeps first), then look at everything; validate (full) every listed backup."""
    try:
        proc = cli(config, "list", "--json", timeout=120)
    except subprocess.TimeoutExpired:
        return Aftermath(set(), ["`list` did not finish in 120 s", *env.repo.leftovers()], {}, hung=1)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "not a valid manifest" not in proc.stderr, proc.stderr
    listed = {m["id"] for m in json.loads(proc.stdout)}
    return aftermath(env, config, listed, orphans)


def aftermath(env: Env, config: Path, listed: set[str], orphans: list[str]) -> Aftermath:
    leftovers = env.repo.leftovers() + orphans + [f"scratch database {n}" for n in scratch_databases(env.pg)]
    stored = env.repo.completed_ids()
    if stored != listed:
        leftovers.append(f"completed backups {sorted(stored)} but `list` shows {sorted(listed)}")
    return Aftermath(listed, leftovers, invalid_backups(config, listed))


def wait_new_folder(repo: Repo, database: str, known: set[str], proc: subprocess.Popen[str]) -> Path:
    """The folder of a backup that just started (it appears with its lease), in a folder repository."""
    parent = repo.root / "backups" / database
    found: list[Path] = []

    def appeared() -> bool:
        assert proc.poll() is None, proc.communicate()
        found[:] = [p for p in parent.glob("*") if p.name not in known] if parent.exists() else []
        return bool(found)

    wait_for(appeared, 60, f"a new backup folder under {parent}", interval=0.002)
    return found[0]


# --- (a) mid-upload ------------------------------------------------------------------------------------


def test_kill9_mid_upload(env: Env, small_db: str, big_db: str) -> None:
    config = env.config(extra=ONE_THREAD)
    baseline = cli_ok(config, "backup", "--database", small_db)["id"]
    env.hold_parts()
    # pg_dump streams the tables, then waits at the large objects until after the kill: mid-dump for sure.
    with large_objects_locked(env.pg, big_db):
        proc = start_cli(config, "backup", "--database", big_db)
        try:
            wait_for(env.upload_started, 60, "the data upload to start", interval=0.001)
            os.kill(proc.pid, signal.SIGSTOP)
            dumps = tool_children(proc.pid, "pg_dump")
            at_kill = env.repo.leftovers()
        finally:
            kill9(proc)
    env.settle()
    assert dumps, "pg_dump must be running when the agent is killed"
    assert any(item.startswith("lease ") for item in at_kill), f"no lease beside the open upload: {at_kill}"
    assert any(item.startswith("unfinished upload ") for item in at_kill), at_kill
    orphans = orphaned_tools(dumps, [big_db])

    after = next_list(env, config, orphans)
    conclude(
        FaultTally(
            fault=f"kill -9 mid-upload ({env.kind})",
            injected=1,
            attempted=2,
            restorable=int(after.listed == {baseline} and not after.invalid),
            failed_cleanly=int(not after.leftovers and after.listed == {baseline}),
            hung=after.hung,
            left_behind=len(after.leftovers),
        ),
        at_kill=at_kill,
        leftovers=after.leftovers,
        listed=after.listed,
        invalid=after.invalid,
    )


# --- (b) data complete, manifest not yet written -------------------------------------------------------


def _kill_before_manifest_s3(env: Env, config: Path, database: str) -> tuple[str, set[str]]:
    assert env.proxy is not None
    held = env.proxy.hold("PUT", f"/{MANIFEST}", 120)
    proc = start_cli(config, "backup", "--database", database)
    try:
        wait_for(lambda: held.seen >= 1, 60, "the manifest's PutObject")
        folders = env.repo.folders()
        uploads = env.repo.uploads()
    finally:
        kill9(proc)
    env.settle()
    assert held.forwarded == 0, "the held manifest write reached S3"
    assert uploads == [], f"the data upload should be complete: {uploads}"
    killed = [prefix for prefix, names in folders.items() if MANIFEST not in names]
    assert len(killed) == 1, folders
    return killed[0].rpartition("/")[2], folders[killed[0]]


def _kill_before_manifest_folder(env: Env, config: Path, database: str) -> tuple[str, set[str], list[str]]:
    """Freeze the agent (SIGSTOP) the moment its globals file (written after the data, before the manifest) is
    renamed into place, then kill it. Returns the
    hit backup's id and what its folder held, plus the ids of attempts that were frozen too late (after
    the manifest write): those are complete backups and must stay listed and valid."""
    missed: list[str] = []
    for _attempt in range(3):
        known = env.repo.completed_ids()
        proc = start_cli(config, "backup", "--database", database)
        try:
            folder = wait_new_folder(env.repo, database, known, proc)
            last = str(folder / "globals")
            deadline = time.monotonic() + 60
            while not os.path.exists(last):  # a busy loop: the window is a few hundred microseconds
                if time.monotonic() > deadline or proc.poll() is not None:
                    break
            os.kill(proc.pid, signal.SIGSTOP)
            names = {p.name for p in folder.iterdir()} if folder.exists() else set()
        finally:
            kill9(proc)
        if "globals" in names and MANIFEST not in names:
            return folder.name, names, missed
        missed.append(folder.name)
    raise AssertionError(f"never froze the agent between its data rename and its manifest write: {missed}")


def test_kill9_between_data_and_manifest(env: Env, small_db: str) -> None:
    config = env.config()
    baseline = cli_ok(config, "backup", "--database", small_db)["id"]
    missed: list[str] = []
    if env.kind == "s3":
        killed, names = _kill_before_manifest_s3(env, config, small_db)
    else:
        killed, names, missed = _kill_before_manifest_folder(env, config, small_db)
    # The state the kill left: the complete data and globals objects and the lease, no manifest, nothing uploading.
    assert names == {"data", "globals", LEASE}, names

    after = next_list(env, config, orphaned_tools([], [small_db]))
    traces = [item for item in env.repo.objects() if killed in item]
    expected = {baseline, *missed}
    restorable = len(expected & after.listed) - len(set(after.invalid) & expected)
    conclude(
        FaultTally(
            fault=f"kill -9 between data and manifest ({env.kind})",
            injected=1 + len(missed),
            attempted=2 + len(missed),
            restorable=restorable,
            failed_cleanly=int(killed not in after.listed and not traces),
            hung=after.hung,
            left_behind=len(after.leftovers),
        ),
        killed=killed,
        leftovers=after.leftovers,
        listed=after.listed,
        expected=expected,
        invalid=after.invalid,
    )
    assert after.listed == expected


# --- (c) mid-cleanup ------------------------------------------------------------------------------------


def _agent_pid(proc: subprocess.Popen[str]) -> int:
    """The agent's pid when it runs under a wrapper (strace): the descendant running kybdr_agent."""
    found: list[int] = []

    def started() -> bool:
        found[:] = [p for p in descendants(proc.pid) if b"kybdr_agent" in Path(f"/proc/{p}/cmdline").read_bytes()]
        return bool(found)

    wait_for(started, 30, "the agent under strace to start")
    return found[0]


def test_kill9_mid_cleanup(env: Env, small_db: str) -> None:
    """Retention keeps the newest of three backups; the kill lands after the first deleted backup's
    manifest is gone and before its data is: the next command must finish the job, at once."""
    thin = policy("thin", small_db, keep_daily=1, keep_weekly=0, keep_monthly=0, keep_yearly=0, min_age="0s")
    config = env.config(policies=thin)
    made = cli_ok(config, "backup", *(["--database", small_db] * 3))
    ids = [m["id"] for m in made]
    kept = ids[-1]  # the newest; cleanup deletes the others in the order of their ids
    first = f"backups/{small_db}/{min(ids[:-1])}"
    if env.proxy is not None:
        held = env.proxy.hold("DELETE", "", 120, contains="/backups/", skip=1)
        proc = start_cli(config, "cleanup")
        try:

            def second_delete() -> bool:
                assert proc.poll() is None, proc.communicate()
                return held.seen >= 2

            wait_for(second_delete, 60, "cleanup's second DeleteObject (the first deleted backup's data)")
        finally:
            kill9(proc)
        env.settle()
    else:
        strace = shutil.which("strace")
        if strace is None:
            pytest.skip("strace is needed to slow a folder repository's deletes down to a killable window")
        slow_unlink = ["-e", "trace=unlink,unlinkat", "-e", "inject=unlink,unlinkat:delay_exit=500000"]
        proc = start_cli(config, "cleanup", prefix=[strace, "-f", "-qq", "-o", "/dev/null", *slow_unlink])
        try:
            agent = _agent_pid(proc)
            manifest = env.repo.root / first / MANIFEST

            def manifest_deleted() -> bool:
                assert proc.poll() is None, proc.communicate()
                return not manifest.exists()

            wait_for(manifest_deleted, 60, "cleanup to delete the first manifest", interval=0.005)
            os.kill(agent, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.wait(timeout=30)
            assert not running(agent)
    half = env.repo.folders().get(first, set())
    # Cleanup deletes under a lease, so the half-deleted backup carries its dead owner's lease.
    assert half == {"data", "globals", "lease.json"}, f"the kill should leave data and lease without a manifest: {half}"

    after = next_list(env, config, orphaned_tools([], [small_db]))
    stored = env.repo.objects()
    gone_cleanly = [i for i in ids if i not in after.listed and not any(i in key for key in stored)]
    conclude(
        FaultTally(
            fault=f"kill -9 mid-cleanup ({env.kind})",
            injected=1,
            attempted=len(ids),
            restorable=len(after.listed & set(ids)) - len(after.invalid),
            failed_cleanly=len(gone_cleanly),
            hung=after.hung,
            left_behind=len(after.leftovers),
        ),
        leftovers=after.leftovers,
        listed=after.listed,
        invalid=after.invalid,
    )
    assert kept in after.listed, "the newest backup, which retention keeps, was lost"


# --- (d) mid-restore ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_fingerprint(pg: Cluster, big_db: str) -> dict[str, str]:
    return database_fingerprint(pg, big_db)


def test_kill9_mid_restore(env: Env, big_db: str, big_fingerprint: dict[str, str]) -> None:
    config = env.config()
    made = cli_ok(config, "backup", "--database", big_db)
    target = unique_db("k9target")
    env.databases.append(target)
    proc = start_cli(config, "restore", made["id"], "--target-database", target)
    restores: list[int] = []
    try:

        def streaming() -> bool:
            assert proc.poll() is None, proc.communicate()
            restores[:] = tool_children(proc.pid, "pg_restore")
            if not restores or bytes_read(restores[0]) <= 2 << 20:
                return False
            # Frozen at once: a restore left running while the scratch databases are listed could finish,
            # renaming its scratch database to the target before the kill (it did, on a loaded machine).
            os.kill(proc.pid, signal.SIGSTOP)
            return True

        wait_for(streaming, 60, "pg_restore to be reading the backup")
        scratch = scratch_databases(env.pg)
    finally:
        kill9(proc)
    assert scratch, "the restore should be writing into its scratch database"
    orphans = orphaned_tools(restores, [*scratch, target])

    # The next restore sweeps what the killed one left, then restores the same backup whole.
    again = unique_db("k9again")
    env.databases.append(again)
    hung = 0
    try:
        restored = cli(config, "restore", made["id"], "--target-database", again, timeout=180)
    except subprocess.TimeoutExpired:
        hung = 1
    whole = not hung and restored.returncode == 0 and database_fingerprint(env.pg, again) == big_fingerprint
    names = set(env.pg.psql("postgres", "select datname from pg_database").split())
    after = aftermath(env, config, env.repo.completed_ids(), orphans)
    if target in names:
        after.leftovers.append(f"the killed restore's target {target} exists")
    conclude(
        FaultTally(
            fault=f"kill -9 mid-restore ({env.kind})",
            injected=1,
            attempted=2,
            restorable=int(whole and not after.invalid),
            failed_cleanly=int(target not in names and not [n for n in names if n in scratch]),
            hung=hung,
            left_behind=len(after.leftovers),
        ),
        scratch_at_kill=scratch,
        leftovers=after.leftovers,
        restore_stderr="" if hung else restored.stderr[-2000:],
        invalid=after.invalid,
    )


# --- (e) the daemon, killed mid-backup and restarted --------------------------------------------------


def _one_job(daemon: Daemon, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = daemon.request(method, path, body)
    assert resp.status in (200, 202), resp.body
    jobs: list[dict[str, Any]] = resp.body["jobs"]
    assert len(jobs) == 1, jobs
    return jobs[0]


def test_sigkill_daemon_mid_backup_then_restart(env: Env, small_db: str, big_db: str) -> None:
    config, socket_path = write_config(
        env.tmp / "daemon.toml", env.pg, env.repo, key_file=env.keys, databases=[small_db, big_db], extra=ONE_THREAD
    )
    agent = start_agent(config, socket_path, env.tmp)
    try:
        baseline = _one_job(agent, "POST", "/v1/backup?wait=true", {"database": small_db})
        assert baseline["status"] == "succeeded", baseline
        env.hold_parts()
        # Without this lock pg_dump could finish the whole dump into the agent's buffers before the SIGSTOP
        # (it did, on a loaded machine): with it, pg_dump waits at the large objects until after the kill.
        with large_objects_locked(env.pg, big_db):
            _one_job(agent, "POST", "/v1/backup", {"database": big_db})
            wait_for(env.upload_started, 60, "the daemon's upload to start", interval=0.001)
            os.kill(agent.process.pid, signal.SIGSTOP)
            dumps = tool_children(agent.process.pid, "pg_dump")
            at_kill = env.repo.leftovers()
            agent.process.kill()
            agent.process.wait(timeout=30)
    finally:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait(timeout=30)
    env.settle()
    assert dumps, "pg_dump must be running when the daemon is killed"
    assert any(item.startswith("unfinished upload ") for item in at_kill), at_kill
    orphans = orphaned_tools(dumps, [big_db])

    restarted = start_agent(config, socket_path, env.tmp)
    hung = 0
    try:
        try:
            wait_for(lambda: not env.repo.leftovers(), 30, "the restarted daemon's sweep")
        except AssertionError:
            hung = 1
        listed = {b["id"] for b in restarted.request("GET", "/v1/backup").body["backups"]}
        invalid = {}
        for backup_id in listed:
            job = _one_job(restarted, "POST", f"/v1/backup/{backup_id}/validate?wait=true", {"level": "full"})
            if job["status"] != "succeeded" or not (job["result"] or {}).get("ok"):
                invalid[backup_id] = job.get("error")
        leftovers = env.repo.leftovers() + orphans + [f"scratch database {n}" for n in scratch_databases(env.pg)]
        if env.repo.completed_ids() != listed:
            leftovers.append(f"stored {sorted(env.repo.completed_ids())}, listed {sorted(listed)}")
    finally:
        assert restarted.stop() == 0, restarted.log()
    conclude(
        FaultTally(
            fault=f"SIGKILL daemon mid-backup, restart ({env.kind})",
            injected=1,
            attempted=2,
            restorable=int(listed == {baseline["result"]["id"]} and not invalid),
            failed_cleanly=int(not leftovers),
            hung=hung,
            left_behind=len(leftovers),
        ),
        at_kill=at_kill,
        leftovers=leftovers,
        listed=listed,
        invalid=invalid,
        log=restarted.log()[-3000:],
    )
