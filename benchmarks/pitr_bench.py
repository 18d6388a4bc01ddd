"""Point-in-time recovery, the agent against pgBackRest, on one database in one run.

    .venv/bin/python benchmarks/pitr_bench.py [--scale 100] [--runs 3] [--wal-seconds 30] [--load-seconds 20]
        [--load-rate 200] [--max-partial-age 5] [--archive-timeout SECONDS] [--out DIR]

Builds dataset B (../shared/bench/dataset-b.sh; scale 100 ≈ 1.6 GB on disk) on a throwaway PostgreSQL 15
cluster that both systems archive at the same time: pgBackRest (installed from Debian's packages if missing)
through ``archive_command = pgbackrest archive-push`` into a stanza on a posix repository (``compress-type=zst``),
the agent through ``[wal] mode = "stream"`` — pg_receivewal on a replication slot under ``kybdr-agent run`` —
into a folder repository (zstd, AES-256-GCM). The source runs with PostgreSQL's defaults where they decide
the outcome (``synchronous_commit = on``, ``full_page_writes = on``; ``fsync = off`` as every test cluster
here). Each round then runs, in the same order:

1. **Base backup** — ``pgbackrest backup --type=full`` with ``process-max`` 1 and 2, the agent's
   ``kybdr-agent --local backup --physical`` (one process; ``pg_basebackup`` under it) and the same backup
   through the daemon (``POST /v1/backup`` ``{"physical": true}``). Wall seconds until the backup is
   restorable (both wait until the WAL that makes it consistent is archived), CPU of the client process tree
   and of the cluster, peak RSS, bytes stored.
2. **WAL throughput** — ``pgbench -c 4 -j 2 -T wal-seconds`` (tpcb-like: write-heavy), then ``pg_switch_wal()``.
   Every 0.5 s: how many complete segments each archive is behind the server, the agent's spool (complete files
   waiting) and the slot's retained WAL. Reported: segments generated per second, each archive's segments per
   second until it holds the run's last segment (and the catch-up time after the run), the worst lag, the CPU
   each spent (the daemon with pg_receivewal; the archiver's ``archive-push`` children) and the daemon's peak
   RSS over the run against its RSS before it ("memory flat").
3. **Crash** — a steady load (``pgbench -R load-rate``: one account update and one ``insert into commits (ts)
   values (clock_timestamp())`` per transaction) for load-seconds, then an immediate shutdown of the source
   (SIGQUIT to the postmaster: what ``pg_ctl stop -m immediate`` sends). In the same instant the agent is frozen
   (SIGSTOP) and its repository is snapshotted (``cp -al``: the folder store writes by rename, so hard links keep
   the crash-time content): what a restore finds when the *host* is lost with the database. Then the agent is
   let go and ships what its spool holds — the database crashed, the agent's host did not. pgBackRest has
   nothing more to ship either way: ``archive_command`` runs in the server that just died.
4. **Restore to latest** into an empty directory until the server accepts connections and is out of recovery:
   ``pgbackrest restore`` (process-max 1 and 2, ``--archive-mode=off``) + ``pg_ctl start``; the agent's
   ``kybdr-agent restore --physical --pgdata DIR --latest --start --no-archive`` from the crash-time snapshot
   and from the repository after its spool was shipped. Each restored server is asked for ``max(ts)`` of
   ``commits``; the source, restarted afterwards (crash recovery), for its own: the difference is the seconds of
   commits lost — the recovery point. The restored copies replay everything since their base backup, the
   heavy run of step 2 included.

Each is configured as it is run: the agent ships the segment being written once it is ``--max-partial-age``
seconds old (``wal.max_partial_age``, default here 5: the few seconds the issue asks for); pgBackRest can only
receive complete segments, so PostgreSQL switches to a new one at ``archive_timeout`` (default 60, "a minute or
so" as PostgreSQL's documentation suggests; ``--archive-timeout 5`` buys pgBackRest the same promise at the price
of a forced, mostly empty 16 MiB segment every 5 s that every restore then replays). The switches serve the
agent too — it shares the cluster — so its recovery point is the better of the two mechanisms.
The restored copies start on their own
port and socket (``port`` and ``unix_socket_directories`` are in the source's postgresql.conf, where its
command line overrides them, so every copy inherits them) and never archive (``archive_command`` is guarded by
the source's data directory as well, so a copy can never push a new timeline into either archive).

Everything that touches a data directory or the repositories runs as the ``postgres`` OS user when the script
runs as root (``pitr_support.py`` says how, and how peak RSS and CPU of process trees are read). A part of the
agent that is not there (no ``--physical`` in its CLI, no WAL streaming) leaves its rows in the tables as "not
available" with the reason.

Why it is built this way: the machine is shared and noisy, so variants are interleaved and every agent median
is divided by pgBackRest's medians from the same rounds; a crash-and-restore needs a base backup and WAL, so one
round is the whole life cycle, and the restores replay the WAL the round made. Prints three Markdown tables and
writes JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_support import (  # noqa: E402
    build_dataset_b,
    install_bytecode,
    pg_env,
    proc_cpu_seconds,
    read_hwm_kib,
    reset_hwm,
)
from benchmarks.pitr_support import (  # noqa: E402
    ArchiveSampler,
    TreeHwm,
    TreeHwmPoller,
    agent_newest_segment,
    agent_python,
    archiver_cpu_seconds,
    crash,
    demote,
    descendants,
    ensure_pgbackrest,
    give_to_postgres,
    lsn_int,
    mkdir_postgres,
    pgbackrest,
    pgbackrest_conf,
    postmaster_pid,
    psql_at,
    restart,
    segno_of_lsn,
    segno_of_name,
    signal_tree,
    spool_use,
    stop_restored,
    tree_cpu_seconds,
    wait_exit,
    wait_promoted,
)
from benchmarks.restore_support import cluster_cpu_seconds  # noqa: E402
from kybdr_agent.postgres.cluster import PG_BIN, Cluster, free_port, start_cluster  # noqa: E402
from tests.daemon_support import UnixHTTPConnection, http_request  # noqa: E402

SOURCE = "bench"
SLOT = "kybdr_agent"
RESTORE_TIMEOUT = 3600.0
NOT_SHELL = {"postgres", "pg_ctl", "sh", "bash", "cp"}  # a restore's server is measured apart from its client


@dataclass
class Timed:
    """One timed run. ``rss_kib``: the sum of the client tree's per-process peaks (the server excluded);
    ``own_rss_kib``: the command's own process (the agent alone; pgBackRest's main process)."""

    seconds: float
    cpu_seconds: float
    server_cpu_seconds: float
    rss_kib: int | None = None
    own_rss_kib: int | None = None
    rss_by_name: dict[str, int] = field(default_factory=dict)
    stored_bytes: int | None = None
    commits_lost_seconds: float | None = None
    restored_max_ts: float | None = None  # the newest of this round's commits the copy holds (None: not one)
    lost_all: bool = False  # the copy holds none of the round's commits: the whole load was lost
    idle_rss_kib: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # what the command reported (the agent's --json)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    command: str
    run: Callable[[], Timed] | None
    missing: str | None = None  # why it cannot run in this checkout


def agent_has(prefix: list[str], env: dict[str, str], command: str, flag: str) -> bool:
    """Whether ``kybdr-agent COMMAND --help`` lists ``flag`` (a part of issue 13 may not be in the checkout)."""
    proc = subprocess.run([*prefix, command, "--help"], capture_output=True, text=True, env=env, check=False, cwd="/")
    return proc.returncode == 0 and flag in proc.stdout


class Bench:
    """The source cluster, pgBackRest's stanza, the agent's daemon, and every variant's run."""

    def __init__(self, cluster: Cluster, workdir: Path, args: argparse.Namespace, restore_port: int) -> None:
        self.cluster, self.workdir, self.args = cluster, workdir, args
        self.restore_port = restore_port
        self.restore_sock = workdir / "restore-sock"
        self.env = pg_env(cluster, SOURCE)
        self.conf = pgbackrest_conf(workdir, cluster)
        self.agent_dir = mkdir_postgres(workdir / "agent")
        self.repo = self.agent_dir / "repo"
        self.snapshot = self.agent_dir / "repo-at-crash"
        self.spool = self.agent_dir / "wal-spool"
        self.restores = mkdir_postgres(workdir / "restores", 0o755)
        self.agent_cmd, agent_env = agent_python(ROOT)
        self.agent_env = {
            **os.environ,
            **agent_env,
            "PATH": f"{PG_BIN}:{os.environ.get('PATH', '')}",
            "HOME": str(self.agent_dir),
        }
        self.agent_env.pop("NOTIFY_SOCKET", None)
        self.config = self.agent_config("agent.toml", self.repo, "state")
        self.snapshot_config = self.agent_config("agent-at-crash.toml", self.snapshot, "state-at-crash")
        self.daemon: subprocess.Popen[bytes] | None = None
        segment_size = "select setting from pg_settings where name = 'wal_segment_size'"
        self.segment_size = int(cluster.psql("postgres", segment_size))
        self.first_id = 1  # the first commit of the round's steady load
        self.wal_missing: str | None = None
        self.backup_missing: str | None = None
        self.restore_missing: str | None = None

    # --- set-up -------------------------------------------------------------------------------------------

    def agent_config(self, name: str, repo: Path, state: str) -> Path:
        key = self.agent_dir / "master.key"
        if not key.exists():
            key.write_text(secrets.token_hex(32))
            key.chmod(0o600)
            give_to_postgres(key)
        c = self.cluster
        path = self.agent_dir / name
        path.write_text(
            f'[backup]\nbackup_dir = "{self.agent_dir / state}"\nschedule = "0 3 1 1 *"\n\n'
            f'[database]\ndsn = "host={c.socket_dir} port={c.port} user=postgres"\npg_bin_dir = "{PG_BIN}"\n\n'
            f'[encryption]\nkey_file = "{key}"\n\n[repository]\nurl = "file://{repo}"\n\n'
            f'[control]\nsocket = "{self.agent_dir / (state + ".sock")}"\n\n'
            '[daemon]\nshutdown_grace_seconds = 2\n\n[drill]\nschedule = ""\n\n'
            f'[wal]\nenabled = true\nmode = "stream"\nslot_name = "{SLOT}"\nspool_dir = "{self.spool}"\n'
            f"max_partial_age = {self.args.max_partial_age}\n"
        )
        path.chmod(0o600)
        give_to_postgres(path)
        return path

    def setup_source(self) -> None:
        """The commits table, pgBackRest's archive_command (guarded: only the source's own directory pushes),
        the stanza, and a check that archiving works."""
        self.cluster.psql(SOURCE, "create table commits (id bigserial primary key, ts timestamptz not null)")
        command = (
            f'test "$PWD" != "{self.cluster.data_dir}" || pgbackrest --config={self.conf} --stanza=bench '
            "archive-push %p"
        )
        self.cluster.psql("postgres", f"alter system set archive_command = '{command.replace(chr(39), chr(39) * 2)}'")
        self.cluster.psql("postgres", "select pg_reload_conf()")
        time.sleep(0.5)
        pgbackrest(self.conf, "stanza-create")
        pgbackrest(self.conf, "check")

    def start_agent(self) -> None:
        """``kybdr-agent run`` as the postgres user; ready when its socket answers and its slot streams."""
        log = open(self.agent_dir / "agent.log", "ab")  # noqa: SIM115 - handed to the child
        self.daemon = subprocess.Popen(
            [*self.agent_cmd, "--config", str(self.config), "run"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=self.agent_env,
            cwd="/",
            **demote(),
        )
        log.close()
        socket_path = self.agent_dir / "state.sock"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"the agent exited ({self.daemon.returncode}):\n{self.agent_log()}")
            try:
                http_request(UnixHTTPConnection(str(socket_path), timeout=5), "GET", "/healthz")
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"the agent's control socket did not answer:\n{self.agent_log()}")
        if not self.wait_slot_active(60):
            self.wal_missing = 'the agent\'s daemon did not stream WAL ([wal] mode = "stream": no active slot in 60 s)'

    def agent_log(self) -> str:
        path = self.agent_dir / "agent.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else ""

    def wait_slot_active(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        sql = "select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = 'kybdr_agent'"
        while time.monotonic() < deadline:
            if self.cluster.psql("postgres", sql).strip() == "t":
                return True
            time.sleep(0.25)
        return False

    def detect(self) -> None:
        """Which of the agent's parts this checkout has (the rest becomes "not available")."""
        if self.wal_missing:
            self.backup_missing = self.restore_missing = self.wal_missing
            return
        if not agent_has(self.agent_cmd, self.agent_env, "backup", "--physical"):
            self.backup_missing = "`kybdr-agent backup --physical` is not in this checkout's CLI"
        if self.backup_missing:
            self.restore_missing = "no physical backup of the agent to restore (" + self.backup_missing + ")"
        elif not agent_has(self.agent_cmd, self.agent_env, "restore", "--physical"):
            self.restore_missing = "`kybdr-agent restore --physical` is not in this checkout's CLI"

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            signal_tree(self.daemon.pid, signal.SIGCONT)
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()

    # --- timing -------------------------------------------------------------------------------------------

    def timed(self, argv: list[str], env: dict[str, str], *, server_pid: int | None = None) -> tuple[Timed, str]:
        """Run as the postgres user to completion: wall, the tree's CPU (wait4), each process's VmHWM, and
        the CPU the cluster spent meanwhile (``server_pid``: the source's postmaster)."""
        server_before = cluster_cpu_seconds(server_pid) if server_pid else 0.0
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", **demote())
        poller = TreeHwmPoller(proc.pid)
        poller.start()
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [  # a server the command started must not hold its pipes open: bounded joins below
            threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else b""), daemon=True),
            threading.Thread(target=lambda: err.append(proc.stderr.read() if proc.stderr else b""), daemon=True),
        ]
        for reader in readers:
            reader.start()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        hwm = poller.stop()
        for reader in readers:
            reader.join(timeout=10)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            tail = b"".join(err).decode(errors="replace").strip()[-1500:]
            raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}): {tail}")
        server = cluster_cpu_seconds(server_pid) - server_before if server_pid else 0.0
        return self._timed(elapsed, usage.ru_utime + usage.ru_stime, server, hwm, proc.pid), b"".join(out).decode()

    @staticmethod
    def _timed(seconds: float, cpu: float, server: float, hwm: TreeHwm, pid: int) -> Timed:
        client = hwm.client(pid, NOT_SHELL)
        return Timed(seconds, cpu, server, client.total_kib(), hwm.own_kib(pid), client.by_name())

    # --- base backups -------------------------------------------------------------------------------------

    def pgbackrest_backup(self, process_max: int) -> Timed:
        argv = ["pgbackrest", f"--config={self.conf}", "--stanza=bench", "--type=full"]
        argv += [f"--process-max={process_max}", "backup"]
        result, _ = self.timed(argv, {**os.environ}, server_pid=self.cluster.process.pid)
        info = json.loads(pgbackrest(self.conf, "info", "--output=json").stdout)
        result.stored_bytes = int(info[0]["backup"][-1]["info"]["repository"]["delta"])
        return result

    def agent_backup_cli(self) -> Timed:
        argv = [*self.agent_cmd, "--config", str(self.config), "--local", "backup", "--physical", "--json"]
        result, out = self.timed(argv, self.agent_env, server_pid=self.cluster.process.pid)
        result.stored_bytes = stored_bytes(out)
        return result

    def agent_backup_daemon(self) -> Timed:
        """``POST /v1/backup?wait=true`` — the daemon's CPU (pg_basebackup is its reaped child) and VmHWM."""
        assert self.daemon is not None
        pid = self.daemon.pid
        reset_hwm(pid)
        idle = read_hwm_kib(pid)
        cpu_before = proc_cpu_seconds(pid)
        server_before = cluster_cpu_seconds(self.cluster.process.pid)
        conn = UnixHTTPConnection(str(self.agent_dir / "state.sock"), timeout=RESTORE_TIMEOUT)
        start = time.perf_counter()
        resp = http_request(conn, "POST", "/v1/backup?wait=true", {"physical": True})
        elapsed = time.perf_counter() - start
        hwm = read_hwm_kib(pid)
        cpu = proc_cpu_seconds(pid) - cpu_before
        server = cluster_cpu_seconds(self.cluster.process.pid) - server_before
        jobs = resp.body.get("jobs", []) if isinstance(resp.body, dict) else []
        if resp.status != 200 or len(jobs) != 1 or jobs[0]["status"] != "succeeded":
            raise RuntimeError(f"daemon backup failed ({resp.status}): {resp.body}\n{self.agent_log()}")
        result = jobs[0].get("result") or {}
        return Timed(elapsed, cpu, server, hwm, hwm, {}, result.get("stored_bytes"), idle_rss_kib=idle)

    def backup_variants(self) -> list[Variant]:
        cli = "`kybdr-agent --local backup --physical`"
        return [
            Variant(
                "pgbackrest_pm1",
                "pgBackRest, process-max 1",
                "`pgbackrest backup --type=full --process-max=1` (zst)",
                lambda: self.pgbackrest_backup(1),
            ),
            Variant(
                "pgbackrest_pm2",
                "pgBackRest, process-max 2",
                "`pgbackrest backup --type=full --process-max=2` (zst)",
                lambda: self.pgbackrest_backup(2),
            ),
            Variant("agent_cli", "agent, one-shot CLI", cli, self.agent_backup_cli, self.backup_missing),
            Variant(
                "agent_daemon",
                "agent, through the daemon",
                '`POST /v1/backup?wait=true {"physical": true}`',
                self.agent_backup_daemon,
                self.backup_missing,
            ),
        ]

    # --- WAL throughput -----------------------------------------------------------------------------------

    def archived_segno(self) -> tuple[int, int | None]:
        """(the server's current segment, pgBackRest's newest archived one)."""
        row = self.cluster.psql(
            "postgres", "select pg_current_wal_lsn(), coalesce(last_archived_wal, '') from pg_stat_archiver"
        ).strip()
        lsn, archived = row.split("|")
        return segno_of_lsn(lsn, self.segment_size), segno_of_name(archived, self.segment_size) if archived else None

    def wait_archived(self, target: int, timeout: float) -> tuple[float | None, float | None]:
        """Seconds until each archive (pgBackRest, the agent) holds segment ``target``; None past ``timeout``."""
        start = time.perf_counter()
        pgbr: float | None = None
        agent: float | None = None if not self.wal_missing else -1.0
        while time.perf_counter() - start < timeout and (pgbr is None or agent is None):
            _, archived = self.archived_segno()
            if pgbr is None and archived is not None and archived >= target:
                pgbr = time.perf_counter() - start
            newest = agent_newest_segment(self.repo, self.segment_size)
            if agent is None and newest is not None and newest >= target:
                agent = time.perf_counter() - start
            time.sleep(0.1)
        return pgbr, (None if agent == -1.0 else agent)

    def wal_run(self) -> dict[str, Any]:
        current, _ = self.archived_segno()
        self.wait_archived(current - 1, 120)  # start with both archives caught up
        assert self.daemon is not None
        agent_pids = [self.daemon.pid, *descendants(self.daemon.pid)]
        for pid in agent_pids:
            reset_hwm(pid)
        idle = read_hwm_kib(self.daemon.pid)
        agent_cpu = tree_cpu_seconds(self.daemon.pid)
        archiver_cpu = archiver_cpu_seconds(self.cluster)
        start_lsn = self.cluster.psql("postgres", "select pg_current_wal_lsn()").strip()
        sampler = ArchiveSampler(self.cluster, self.repo, self.spool, self.segment_size, SOURCE)
        sampler.start()
        bench = [str(PG_BIN / "pgbench"), "-n", "-c", "4", "-j", "2", "-T", str(self.args.wal_seconds), SOURCE]
        started = time.perf_counter()
        run = subprocess.run(bench, env=self.env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        if run.returncode != 0:
            raise RuntimeError(f"pgbench failed: {run.stderr.strip()[-800:]}")
        end_lsn = self.cluster.psql("postgres", "select pg_current_wal_lsn()").strip()
        switched = self.cluster.psql("postgres", "select pg_switch_wal()").strip()
        target = (lsn_int(switched) - 1) // self.segment_size
        pgbr_drain, agent_drain = self.wait_archived(target, 600)
        samples = sampler.stop()
        first = segno_of_lsn(start_lsn, self.segment_size)
        segments = target - first + 1
        hwm = {pid: read_hwm_kib(pid) for pid in [self.daemon.pid, *descendants(self.daemon.pid)]}
        tps = next((line for line in run.stdout.splitlines() if line.startswith("tps")), "")

        def per_second(drain: float | None) -> float | None:
            return None if drain is None else round(segments / (seconds + drain), 2)

        def worst(values: list[int | None]) -> int | None:
            present = [v for v in values if v is not None]
            return max(present) if present else None

        return {
            "seconds": round(seconds, 2),
            "tps": tps,
            "wal_bytes": lsn_int(end_lsn) - lsn_int(start_lsn),
            "segments": segments,
            "generated_per_second": round(segments / seconds, 2),
            "pgbackrest": {
                "catch_up_seconds": None if pgbr_drain is None else round(pgbr_drain, 2),
                "segments_per_second": per_second(pgbr_drain),
                "max_lag_segments": worst([s.pgbackrest_lag_segments for s in samples]),
                "cpu_seconds": round(archiver_cpu_seconds(self.cluster) - archiver_cpu, 2),
            },
            "agent": None
            if self.wal_missing
            else {
                "catch_up_seconds": None if agent_drain is None else round(agent_drain, 2),
                "segments_per_second": per_second(agent_drain),
                "max_lag_segments": worst([s.agent_lag_segments for s in samples]),
                "max_spool_files": worst([s.spool_files for s in samples]),
                "max_spool_bytes": worst([s.spool_bytes for s in samples]),
                "max_slot_retained_bytes": worst([s.slot_lag_bytes for s in samples]),
                "cpu_seconds": round(tree_cpu_seconds(self.daemon.pid) - agent_cpu, 2),
                "daemon_idle_rss_kib": idle,
                "daemon_peak_rss_kib": hwm.get(self.daemon.pid),
                "receiver_peak_rss_kib": max(
                    (kib or 0 for pid, kib in hwm.items() if pid != self.daemon.pid), default=None
                ),
            },
        }

    # --- the crash ----------------------------------------------------------------------------------------

    def crash_run(self) -> dict[str, Any]:
        """A steady load with commit timestamps, the immediate shutdown, the agent frozen for the snapshot."""
        accounts = 100_000 * self.args.scale
        script = self.workdir / "steady.sql"
        script.write_text(
            f"\\set aid random(1, {accounts})\n\\set delta random(-5000, 5000)\nBEGIN;\n"
            "UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;\n"
            "INSERT INTO commits (ts) VALUES (clock_timestamp());\nEND;\n"
        )
        archived_before = int(self.cluster.psql("postgres", "select archived_count from pg_stat_archiver"))
        self.first_id = int(self.cluster.psql(SOURCE, "select coalesce(max(id), 0) from commits")) + 1
        argv = [str(PG_BIN / "pgbench"), "-n", "-c", "2", "-j", "2", "-R", str(self.args.load_rate), "-T", "3600"]
        load = subprocess.Popen(
            [*argv, "-f", str(script), SOURCE],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(self.args.load_seconds)
        archived = int(self.cluster.psql("postgres", "select archived_count from pg_stat_archiver")) - archived_before
        frozen: list[int] = []
        crash(self.cluster)
        if self.daemon is not None and not self.wal_missing:
            frozen = signal_tree(self.daemon.pid, signal.SIGSTOP)
        wait_exit(self.cluster)
        snap = None
        if frozen:
            shutil.rmtree(self.snapshot, ignore_errors=True)
            started = time.perf_counter()
            subprocess.run(["cp", "-al", str(self.repo), str(self.snapshot)], check=True)
            snap = round(time.perf_counter() - started, 3)
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        try:
            load.wait(timeout=60)
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait()
        shipped = None if self.wal_missing else self.wait_spool_shipped(3 * self.args.max_partial_age + 30)
        return {
            "pgbackrest_segments_archived_during_load": archived,
            "snapshot_seconds": snap,
            "agent_shipped_after_crash_seconds": shipped,
        }

    def wait_spool_shipped(self, timeout: float) -> float | None:
        """Until the agent's spool holds no complete file and its record of the ``.partial`` is newer than the
        partial's last write (pg_receivewal flushes what it had when the connection dies)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            files, _ = spool_use(self.spool)
            partials = list(self.spool.glob("*.partial"))
            done = files == 0
            for partial in partials:
                record = next(self.repo.glob(f"wal/*/*/{partial.name}.json"), None)
                try:
                    if record is None or record.stat().st_mtime <= partial.stat().st_mtime:
                        done = False
                except FileNotFoundError:
                    done = False
            if done:
                return round(time.monotonic() - start, 2)
            time.sleep(0.2)
        return None

    def round_commits(self, columns: str) -> str:
        """A query over this round's commits (``first_id`` is an integer we read)."""
        return f"select {columns} from commits where id >= {int(self.first_id)}"  # noqa: S608

    def recover_source(self) -> tuple[float, float]:
        """Restart the crashed source; the first and last of the round's commits are what was committed (epoch
        seconds)."""
        restart(self.cluster)
        span = self.round_commits("extract(epoch from min(ts)), extract(epoch from max(ts))")
        first, last = (float(v) for v in self.cluster.psql(SOURCE, span).strip().split("|"))
        if not self.wal_missing and not self.wait_slot_active(120):
            raise RuntimeError(f"the agent did not stream again after the source restarted:\n{self.agent_log()}")
        return first, last

    # --- restores -----------------------------------------------------------------------------------------

    def fresh_dir(self, key: str) -> Path:
        parent = mkdir_postgres(self.restores / key, 0o755)
        for child in parent.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
        return parent / "data"

    def finish_restore(self, result: Timed, data: Path, *extra: Path) -> Timed:
        """The restored server's CPU since it started (its reaped startup process ran restore_command), what it
        holds, and then it is thrown away."""
        try:
            pid = postmaster_pid(data)
            result.server_cpu_seconds = tree_cpu_seconds(pid) if pid else 0.0
            row = psql_at(
                self.restore_sock,
                self.restore_port,
                SOURCE,
                self.round_commits("extract(epoch from max(ts)), (select count(*) from pgbench_branches)"),
            )
            if row is None:
                raise RuntimeError(f"the restored server in {data} does not answer")
            max_ts, branches = row.split("|")
            if int(branches) != self.args.scale:
                raise RuntimeError(f"the restored copy has {branches} branches, not {self.args.scale}")
            result.restored_max_ts = float(max_ts) if max_ts else None
        finally:
            stop_restored(data, *extra)
        return result

    def pgbackrest_restore(self, process_max: int) -> Timed:
        data = mkdir_postgres(self.fresh_dir(f"pgbackrest-pm{process_max}"))
        argv = ["pgbackrest", f"--config={self.conf}", "--stanza=bench", f"--pg1-path={data}"]
        argv += [f"--process-max={process_max}", "--archive-mode=off", "restore"]
        log = data.parent / "data.log"
        start = time.perf_counter()
        result, _ = self.timed(argv, {**os.environ})
        restored = time.perf_counter() - start
        started = subprocess.run(
            [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(int(RESTORE_TIMEOUT)), "start"],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            **demote(),
        )
        if started.returncode != 0:
            stop_restored(data)
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()}\n{log.read_text()[-2000:]}")
        wait_promoted(self.restore_sock, self.restore_port, time.monotonic() + RESTORE_TIMEOUT, data)
        result.seconds = time.perf_counter() - start
        result.detail = {"restore_seconds": round(restored, 3), "recovery_seconds": round(result.seconds - restored, 3)}
        return self.finish_restore(result, data)

    def agent_restore(self, config: Path) -> Timed:
        data = self.fresh_dir("agent-at-crash" if config == self.snapshot_config else "agent")
        argv = [*self.agent_cmd, "--config", str(config), "restore", "--physical", "--pgdata", str(data)]
        argv += ["--latest", "--start", "--no-archive", "--port", str(self.restore_port), "--json"]
        start = time.perf_counter()
        try:
            result, out = self.timed(argv, self.agent_env)
            with contextlib.suppress(json.JSONDecodeError):
                result.detail = json.loads(out)
            wait_promoted(self.restore_sock, self.restore_port, time.monotonic() + RESTORE_TIMEOUT, data)
        except BaseException:
            stop_restored(data, data.parent / "data.wal-spool")
            raise
        result.seconds = time.perf_counter() - start
        return self.finish_restore(result, data, data.parent / "data.wal-spool")

    def restore_variants(self) -> list[Variant]:
        cli = "`kybdr-agent restore --physical --pgdata DIR --latest --start`"
        return [
            Variant(
                "pgbackrest_pm1",
                "pgBackRest, process-max 1",
                "`pgbackrest restore --process-max=1` + `pg_ctl start`",
                lambda: self.pgbackrest_restore(1),
            ),
            Variant(
                "pgbackrest_pm2",
                "pgBackRest, process-max 2",
                "`pgbackrest restore --process-max=2` + `pg_ctl start`",
                lambda: self.pgbackrest_restore(2),
            ),
            Variant(
                "agent_host_lost",
                "agent, repository as the crash left it",
                cli + " (host lost: spool not shipped)",
                lambda: self.agent_restore(self.snapshot_config),
                self.restore_missing,
            ),
            Variant(
                "agent",
                "agent, after its spool was shipped",
                cli + " (database crashed, agent alive)",
                lambda: self.agent_restore(self.config),
                self.restore_missing,
            ),
        ]


def stored_bytes(out: str) -> int | None:
    """``stored_bytes`` of the manifest ``backup --json`` printed (an object, or a list of one)."""
    try:
        parsed: Any = json.loads(out)
    except json.JSONDecodeError:
        return None
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    if isinstance(parsed, dict):
        value = parsed.get("stored_bytes") or (parsed.get("manifest") or {}).get("stored_bytes")
        return int(value) if value is not None else None
    return None


# --- rounds ---------------------------------------------------------------------------------------------------


def run_phase(name: str, variants: list[Variant], results: dict[str, list[Timed]], round_no: int, runs: int) -> None:
    for v in variants:
        if v.run is None or v.missing:
            continue
        got = v.run()
        results.setdefault(v.key, []).append(got)
        print(f"  round {round_no}/{runs} {name} {v.label}: {got.seconds:.2f} s", flush=True)


def run_rounds(bench: Bench, runs: int) -> tuple[dict[str, list[Timed]], dict[str, list[Timed]], list[dict[str, Any]]]:
    backups: dict[str, list[Timed]] = {}
    restores: dict[str, list[Timed]] = {}
    rounds: list[dict[str, Any]] = []
    for round_no in range(1, runs + 1):
        run_phase("backup", bench.backup_variants(), backups, round_no, runs)
        wal = bench.wal_run()
        print(f"  round {round_no}/{runs} WAL: {wal['segments']} segments in {wal['seconds']} s", flush=True)
        crashed = bench.crash_run()
        print(f"  round {round_no}/{runs} crash: {crashed}", flush=True)
        before = {key: len(got) for key, got in restores.items()}
        run_phase("restore", bench.restore_variants(), restores, round_no, runs)
        first, last = bench.recover_source()
        for key, got in restores.items():
            if len(got) > before.get(key, 0):
                run = got[-1]
                run.lost_all = run.restored_max_ts is None
                run.commits_lost_seconds = round(
                    last - (first if run.restored_max_ts is None else run.restored_max_ts), 3
                )
        rounds.append({"wal": wal, "crash": crashed})
        shutil.rmtree(bench.snapshot, ignore_errors=True)
    return backups, restores, rounds


# --- summaries --------------------------------------------------------------------------------------------------


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def cell(value: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def ratio(mine: float | None, baseline: float | None) -> float | None:
    return None if mine is None or not baseline else round(mine / baseline, 3)


def med(values: Sequence[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def summarize(variants: list[Variant], results: dict[str, list[Timed]]) -> dict[str, dict[str, Any]]:
    medians = {key: med([r.seconds for r in runs]) for key, runs in results.items()}
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        runs = results.get(v.key, [])
        if not runs:
            out[v.key] = {"label": v.label, "command": v.command, "not_available": v.missing or "did not run"}
            continue
        mine = medians[v.key]
        rss = [r.rss_kib for r in runs if r.rss_kib is not None]
        lost = [r.commits_lost_seconds for r in runs if r.commits_lost_seconds is not None]
        out[v.key] = {
            "label": v.label,
            "command": v.command,
            "median_seconds": mine,
            "vs_pm1": ratio(mine, medians.get("pgbackrest_pm1")),
            "vs_pm2": ratio(mine, medians.get("pgbackrest_pm2")),
            "median_cpu_seconds": med([r.cpu_seconds for r in runs]),
            "median_server_cpu_seconds": med([r.server_cpu_seconds for r in runs]),
            "peak_rss_mib": mib(max(rss)) if rss else None,
            "median_stored_bytes": med([r.stored_bytes for r in runs]),
            "median_commits_lost_seconds": med(lost),
            "max_commits_lost_seconds": max(lost) if lost else None,
            "rounds_all_lost": sum(r.lost_all for r in runs),
            "runs": [asdict(r) for r in runs],
        }
    return out


def backup_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| base backup | command | median s | × pgBackRest pm 1 | × pgBackRest pm 2 | client CPU s | server CPU s "
        "| peak RSS MiB | stored MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, s in summary.items():
        if "not_available" in s:
            lines.append(f"| {s['label']} | {s['command']} | not available: {s['not_available']} | | | | | | |")
            continue
        stored = None if s["median_stored_bytes"] is None else s["median_stored_bytes"] / 1e6
        lines.append(
            f"| {s['label']} | {s['command']} | {cell(s['median_seconds'])} "
            f"| {'baseline' if key == 'pgbackrest_pm1' else cell(s['vs_pm1'], '{:.3f}')} "
            f"| {'baseline' if key == 'pgbackrest_pm2' else cell(s['vs_pm2'], '{:.3f}')} "
            f"| {cell(s['median_cpu_seconds'])} | {cell(s['median_server_cpu_seconds'])} "
            f"| {cell(s['peak_rss_mib'], '{:.1f}')} | {cell(stored, '{:.1f}')} |"
        )
    return "\n".join(lines)


def restore_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| restore to latest | command | median s | × pgBackRest pm 1 | × pgBackRest pm 2 | client CPU s "
        "| server CPU s | peak RSS MiB | commits lost s (median / worst) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, s in summary.items():
        if "not_available" in s:
            lines.append(f"| {s['label']} | {s['command']} | not available: {s['not_available']} | | | | | | |")
            continue
        lost = f"{cell(s['median_commits_lost_seconds'])} / {cell(s['max_commits_lost_seconds'])}"
        if s["rounds_all_lost"]:
            lost += f" ({s['rounds_all_lost']} of {len(s['runs'])} rounds: every commit of the load)"
        lines.append(
            f"| {s['label']} | {s['command']} | {cell(s['median_seconds'])} "
            f"| {'baseline' if key == 'pgbackrest_pm1' else cell(s['vs_pm1'], '{:.3f}')} "
            f"| {'baseline' if key == 'pgbackrest_pm2' else cell(s['vs_pm2'], '{:.3f}')} "
            f"| {cell(s['median_cpu_seconds'])} | {cell(s['median_server_cpu_seconds'])} "
            f"| {cell(s['peak_rss_mib'], '{:.1f}')} | {lost} |"
        )
    return "\n".join(lines)


def wal_table(rounds: list[dict[str, Any]], missing: str | None) -> str:
    wal = [r["wal"] for r in rounds]
    generated = med([w["generated_per_second"] for w in wal])
    mb = med([w["wal_bytes"] / w["seconds"] / 1e6 for w in wal])
    lines = [
        f"WAL generated: {cell(generated)} segments/s ({cell(mb, '{:.1f}')} MB/s), median of {len(wal)} run(s) of "
        f"`pgbench -c 4 -j 2 -T {wal[0]['seconds']:.0f}` ({wal[-1]['tps']}).",
        "",
        "| archiver | segments/s until archived | catch-up after the run s | worst lag (segments) | CPU s "
        "| CPU ms per segment | spool (files / MB, worst) | peak RSS MiB (idle → run) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, key: str) -> str:
        parts = [w[key] for w in wal if w.get(key)]
        if not parts:
            return f"| {label} | not available: {missing} | | | | | | |"
        cpu = med([p["cpu_seconds"] for p in parts])
        per = med([p["cpu_seconds"] * 1000 / w["segments"] for p, w in zip(parts, wal, strict=False)])
        spool = rss = "—"
        if key == "agent":
            spool = (
                f"{max(p['max_spool_files'] or 0 for p in parts)} / "
                f"{max(p['max_spool_bytes'] or 0 for p in parts) / 1e6:.1f}"
            )
            idle = mib(max(p["daemon_idle_rss_kib"] or 0 for p in parts))
            peak = mib(max(p["daemon_peak_rss_kib"] or 0 for p in parts))
            recv = mib(max(p["receiver_peak_rss_kib"] or 0 for p in parts))
            rss = f"{cell(idle, '{:.1f}')} → {cell(peak, '{:.1f}')} (+ pg_receivewal {cell(recv, '{:.1f}')})"
        catch = [p["catch_up_seconds"] for p in parts]
        lag = max((p["max_lag_segments"] or 0) for p in parts)
        return (
            f"| {label} | {cell(med([p['segments_per_second'] for p in parts]))} "
            f"| {cell(med(catch))}{' (did not catch up in 600 s)' if None in catch else ''} | {lag} "
            f"| {cell(cpu)} | {cell(per, '{:.0f}')} | {spool} | {rss} |"
        )

    lines.append(row("pgBackRest `archive-push` (archive_command)", "pgbackrest"))
    lines.append(row('agent, `[wal] mode = "stream"` (pg_receivewal + shipper)', "agent"))
    return "\n".join(lines)


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "kybdr_agent"], cwd=ROOT, capture_output=True, text=True)
    return (head.stdout.strip() or "?") + (" with local changes to kybdr_agent" if dirty.stdout.strip() else "")


def header(args: argparse.Namespace, pgbr_version: str, source_commit: str) -> str:
    command = shlex.join([".venv/bin/python", "benchmarks/pitr_bench.py", *sys.argv[1:]])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    version = subprocess.run([str(PG_BIN / "postgres"), "--version"], capture_output=True, text=True, check=False)
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    pg = version.stdout.strip().removeprefix("postgres (PostgreSQL) ").split(" ")[0] or "?"
    rounds = f"{args.runs} interleaved round{'s' if args.runs > 1 else ''}"
    return (
        f"`{command}` — {when}, commit {source_commit}, Linux {os.uname().release}, Debian {debian}, "
        f"{os.cpu_count()} CPUs, PostgreSQL {pg}, {pgbr_version} (`compress-type=zst`, posix repository); "
        f"dataset B at scale {args.scale}; agent: folder repository, zstd + AES-256-GCM, "
        f"`max_partial_age = {args.max_partial_age}`; source: `archive_timeout = {args.archive_timeout}`, "
        f"`synchronous_commit = on`, `full_page_writes = on`; {rounds}, medians"
    )


def notes(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> str:
    archived = med([r["crash"]["pgbackrest_segments_archived_during_load"] for r in rounds])
    return (
        "× columns: the row's median ÷ pgBackRest's median from the same rounds. pgBackRest runs with its "
        "defaults besides zst: `archive-push` synchronous (no `archive-async`), no `repo1-bundle` (one repository "
        "file per PostgreSQL file). Client CPU s: user+sys of the "
        "command's process tree (pg_basebackup under the agent; pgBackRest's `local` workers). Server CPU s: the "
        "source cluster's over a backup (pg_basebackup's walsender reads the files pgBackRest reads itself); for "
        "a restore, the restored server's from its start until it is out of recovery, its restore_command runs "
        "included (pgBackRest's `archive-get`, one process per file; the agent's is a copy from its prefetched "
        "spool). Peak RSS: the sum of the client processes' own peaks (VmHWM, polled every 20 ms; the daemon "
        "row: the daemon's VmHWM over the request). A restore's seconds run from the command's start until "
        "`pg_is_in_recovery()` is false. Commits lost: the source's last `commits.ts` (read after its crash "
        "recovery) minus the restored copy's, after a steady load of "
        f"{args.load_rate} transactions/s for {args.load_seconds} s and an immediate shutdown; pgBackRest's "
        f"archive got {cell(archived, '{:.0f}')} segments during that load (archive_timeout "
        f"{args.archive_timeout} s switches). 'Host lost' restores from the agent's repository as it was at the "
        "crash instant (the agent frozen, the folder hard-linked); the other agent row after the agent shipped "
        "the rest of its spool. WAL table: lag is counted in complete segments each archive lacks behind the "
        "server's current one, sampled every 0.5 s; the agent's spool counts complete files waiting to ship "
        "(the `.partial` being written excluded); CPU is the daemon's with pg_receivewal, and the server "
        "archiver's children (every `archive-push`) for pgBackRest."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=100, help="pgbench scale (dataset B: 100 ≈ 1.6 GB on disk)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--wal-seconds", type=int, default=30, help="the write-heavy pgbench run (-c 4)")
    parser.add_argument("--load-seconds", type=int, default=20, help="the steady load before the crash")
    parser.add_argument("--load-rate", type=int, default=200, help="transactions per second of the steady load")
    parser.add_argument("--max-partial-age", type=int, default=5, help="the agent's wal.max_partial_age (s)")
    parser.add_argument(
        "--archive-timeout", type=int, default=60, help="the source's archive_timeout, s (PostgreSQL's docs: a minute)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where the JSON goes")
    args = parser.parse_args()
    if min(args.runs, args.scale, args.wal_seconds, args.load_seconds, args.load_rate, args.max_partial_age) < 1:
        parser.error("every number must be at least 1")

    pgbr_version = ensure_pgbackrest()
    install_bytecode()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="kybdr-pitr-bench-", dir="/tmp"))
    workdir.chmod(0o755)  # the postgres user reaches its directories inside
    restore_port = free_port()
    restore_sock = mkdir_postgres(workdir / "restore-sock", 0o755)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:]}
    cluster = start_cluster(
        extra_conf=(
            "synchronous_commit = on\nfull_page_writes = on\narchive_mode = on\narchive_command = ':'\n"
            f"archive_timeout = {args.archive_timeout}\nmax_wal_senders = 10\nmax_replication_slots = 10\n"
            f"port = {restore_port}\nunix_socket_directories = '{restore_sock}'\n"
        )
    )
    bench: Bench | None = None
    try:
        print(f"building dataset B at scale {args.scale} …", flush=True)
        build_dataset_b(cluster, SOURCE, args.scale)
        bench = Bench(cluster, workdir, args, restore_port)
        bench.setup_source()
        bench.start_agent()
        bench.detect()
        for what in (bench.wal_missing, bench.backup_missing, bench.restore_missing):
            if what:
                print(f"not available: {what}", flush=True)
        source_commit = commit()
        print(f"{args.runs} interleaved round(s) …", flush=True)
        backups, restores, rounds = run_rounds(bench, args.runs)
        if commit() != source_commit:
            source_commit += f" (changed during the run to {commit()})"
        report["backup"] = b_sum = summarize(bench.backup_variants(), backups)
        report["restore"] = r_sum = summarize(bench.restore_variants(), restores)
        report["rounds"] = rounds
        text = (
            f"{header(args, pgbr_version, source_commit)}\n\n{backup_table(b_sum)}\n\n{restore_table(r_sum)}\n\n"
            f"{wal_table(rounds, bench.wal_missing)}\n\n{notes(args, rounds)}"
        )
    finally:
        if bench is not None:
            bench.stop()
        cluster.stop()
        if os.environ.get("KYBDR_BENCH_KEEP"):
            print(f"kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["markdown"] = text
    path = args.out / f"pitr-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{text}\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
