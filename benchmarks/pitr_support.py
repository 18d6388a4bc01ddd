"""What pitr_bench.py needs beyond bench_support.py: pgBackRest, the postgres OS user, process trees, the
source cluster's crash and restart, restored servers, and the WAL archives' progress.

**Who runs what.** PostgreSQL refuses to run as root, so a benchmark started as root runs every command that
writes or starts a data directory as the ``postgres`` OS user, as the test clusters do (``cluster.py``): all of
pgBackRest (its repository is written by ``archive-push``, which the server's archiver runs as that user) and
all of the agent (the daemon, ``backup --physical``, ``restore --physical --start`` — the issue asks that
they work as that user, "as pgBackRest runs"). The agent's interpreter must then be one that user can
execute: the checkout's venv is used when it can; when it cannot (on the benchmark machine it links to
``/root/.pyenv``), the system's ``python3.X`` of the same minor version runs the venv's site-packages through
``PYTHONPATH`` — the same code and the same compiled wheels, as an agent installed for all users would run.

**Peak RSS of a process tree.** pgBackRest with ``process-max`` N is a main process and N ``local`` workers;
the agent's backup is one process and its ``pg_basebackup`` child. ``TreeHwmPoller`` reads VmHWM of every
live descendant every 20 ms (through ``/proc/PID/task/TID/children``, not a scan of ``/proc``) and keeps each
process's last reading; the figure reported is the sum over the processes, an upper bound of what they held
at once (their peaks need not coincide). A child caught between fork and exec still carries its parent's
VmHWM (the agent forking ``pg_ctl`` would count the agent twice), so a descendant whose command line is still
the root's is left out (``TreeHwm.client``); a server the command starts is measured apart.

**CPU of a process tree.** ``tree_cpu_seconds``: utime+stime+cutime+cstime of the root and of every live
descendant. A process's cutime holds only the children it has reaped, which are no longer live, so nothing
is counted twice. The server's archiver runs ``archive_command`` through ``system()``, so its cutime+cstime
is what archive-push cost (``archiver_cpu_seconds``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bench_support import CLK_TCK, HWM_POLL_SECONDS, pg_env, read_hwm_kib
from kybdr_agent.postgres.cluster import PG_BIN, START_TIMEOUT, Cluster

SAMPLE_SECONDS = 0.5
SEGMENT_NAME = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")


# --- the postgres OS user -----------------------------------------------------------------------------------


def demote() -> dict[str, Any]:
    """Popen keywords running a child as ``postgres`` when we are root (as ``cluster._demote``), else nothing."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def give_to_postgres(*paths: Path) -> None:
    """chown to the postgres user (only as root; otherwise everything already belongs to whoever runs us)."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam("postgres")
    for path in paths:
        os.chown(path, pw.pw_uid, pw.pw_gid)


def mkdir_postgres(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    give_to_postgres(path)
    return path


def agent_python(root: Path) -> tuple[list[str], dict[str, str]]:
    """The argv prefix and environment that run ``python -m kybdr_agent`` as the demoted user (see the module
    docstring): this interpreter if that user can execute it, else the system's one of the same version with
    the venv's site-packages."""
    base = [sys.executable, "-m", "kybdr_agent"]
    if os.geteuid() != 0:
        return base, {}
    try:
        if subprocess.run([sys.executable, "-c", "pass"], capture_output=True, check=False, **demote()).returncode == 0:
            return base, {}
    except PermissionError:
        pass
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = Path("/usr/bin") / version
    site = Path(sys.prefix) / "lib" / version / "site-packages"
    if not system.exists() or not site.is_dir():
        raise RuntimeError(
            f"the postgres user cannot execute {sys.executable}, and there is no {system} to run the agent's "
            f"packages ({site}) with: install the agent where that user can run it"
        )
    env = {"PYTHONPATH": f"{root}:{site}"}
    check = subprocess.run(
        [str(system), "-c", "import kybdr_agent.cli, zstandard, asyncpg"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
        cwd="/",
        **demote(),
    )
    if check.returncode != 0:
        raise RuntimeError(f"{system} cannot import the agent as the postgres user: {check.stderr.strip()[-400:]}")
    return [str(system), "-m", "kybdr_agent"], env


# --- pgBackRest ---------------------------------------------------------------------------------------------


def ensure_pgbackrest() -> str:
    """pgBackRest's binary, installed from Debian's packages when missing (root only). Its version string."""
    if shutil.which("pgbackrest") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise RuntimeError(
                "pgBackRest is not installed and this run cannot install it (needs root and apt-get): "
                "apt-get install -y pgbackrest"
            )
        print("installing pgBackRest from Debian's packages (apt-get install -y pgbackrest) …", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "pgbackrest"]
        proc = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:  # a stale package list: refresh it once
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            proc = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or shutil.which("pgbackrest") is None:
            raise RuntimeError(
                "could not install pgBackRest from Debian's packages (apt-get install -y pgbackrest): "
                + (proc.stderr.strip()[-600:] or proc.stdout.strip()[-600:])
            )
    out = subprocess.run(["pgbackrest", "version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def pgbackrest_conf(workdir: Path, cluster: Cluster) -> Path:
    """A stanza ``bench`` on a posix repository in the work directory: zst (its default level, 3), files and
    logs under the work directory, fast start (the agent's pg_basebackup runs ``--checkpoint=fast``)."""
    for name in ("pgbr-repo", "pgbr-lock", "pgbr-spool", "pgbr-log"):
        mkdir_postgres(workdir / name, 0o750)
    conf = workdir / "pgbackrest.conf"
    conf.write_text(
        "[global]\n"
        f"repo1-path={workdir / 'pgbr-repo'}\n"
        "repo1-retention-full=9999\n"
        "compress-type=zst\n"
        f"lock-path={workdir / 'pgbr-lock'}\n"
        f"spool-path={workdir / 'pgbr-spool'}\n"
        f"log-path={workdir / 'pgbr-log'}\n"
        "log-level-console=warn\n"
        "log-level-stderr=warn\n"
        "log-level-file=info\n"
        "start-fast=y\n"
        "\n[bench]\n"
        f"pg1-path={cluster.data_dir}\n"
        f"pg1-port={cluster.port}\n"
        f"pg1-socket-path={cluster.socket_dir}\n"
        "pg1-user=postgres\n"
    )
    conf.chmod(0o644)
    return conf


def pgbackrest(conf: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One untimed pgBackRest command as the postgres user."""
    proc = subprocess.run(
        ["pgbackrest", f"--config={conf}", "--stanza=bench", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
        **demote(),
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"pgbackrest {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc


# --- process trees ------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return "?"


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as kids:
                found += [int(k) for k in kids.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def descendants(pid: int) -> Iterator[int]:
    stack = children(pid)
    while stack:
        child = stack.pop()
        yield child
        stack += children(child)


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime+cutime+cstime of ``pid`` and of its live descendants (see the module docstring)."""
    ticks = 0
    for each in (pid, *descendants(pid)):
        fields = _stat_fields(each)
        if fields is not None:
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / CLK_TCK


@dataclass
class TreeHwm:
    """Each process's last VmHWM reading (KiB), keyed by pid, with its command name and command line."""

    per_pid: dict[int, tuple[str, str, int]] = field(default_factory=dict)

    def by_name(self) -> dict[str, int]:
        """The largest process of each command name (KiB)."""
        out: dict[str, int] = {}
        for name, _, kib in self.per_pid.values():
            out[name] = max(out.get(name, 0), kib)
        return out

    def own_kib(self, pid: int) -> int | None:
        entry = self.per_pid.get(pid)
        return entry[2] if entry else None

    def client(self, root: int, exclude: set[str]) -> TreeHwm:
        """The root and the descendants that are programs of their own: not named in ``exclude`` (a server the
        command started), and not a fork that had not exec'd yet when last read — its command line is still the
        root's and its VmHWM the root's copy. pgBackRest's ``local`` workers are its own binary exec'd anew,
        with their own command line, so they count."""
        root_cmd = self.per_pid[root][1] if root in self.per_pid else None
        kept = {
            pid: entry
            for pid, entry in self.per_pid.items()
            if pid == root or (entry[0] not in exclude and entry[1] != root_cmd)
        }
        return TreeHwm(kept)

    def total_kib(self) -> int | None:
        return sum(kib for _, _, kib in self.per_pid.values()) or None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmd:
            return cmd.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


class TreeHwmPoller(threading.Thread):
    """Reads VmHWM of ``pid`` and of its descendants every 20 ms until stopped or the root exits."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.result = TreeHwm()
        self.done = threading.Event()

    def _sample(self) -> None:
        for each in [self.pid, *descendants(self.pid)]:
            cmdline = _cmdline(each)
            kib = read_hwm_kib(each)
            if kib is not None:
                self.result.per_pid[each] = (_comm(each), cmdline, kib)

    def run(self) -> None:
        while True:
            self._sample()
            if self.done.wait(HWM_POLL_SECONDS) or _stat_fields(self.pid) is None:
                return

    def stop(self) -> TreeHwm:
        self.done.set()
        self.join()
        return self.result


# --- the source cluster -------------------------------------------------------------------------------------


def crash(cluster: Cluster) -> None:
    """What ``pg_ctl stop -m immediate`` does — SIGQUIT to the postmaster, then wait for it — sent directly
    so the agent can be frozen in the same instant (the caller sends SIGSTOP right after)."""
    cluster.process.send_signal(signal.SIGQUIT)


def wait_exit(cluster: Cluster, timeout: float = 60.0) -> None:
    cluster.process.wait(timeout=timeout)


def restart(cluster: Cluster) -> None:
    """Start the crashed source again on the same directory, port and socket (crash recovery runs)."""
    logfile = open(cluster.base / "postgres.log", "ab")  # noqa: SIM115 - handed to the child
    cluster.process = subprocess.Popen(
        [
            str(PG_BIN / "postgres"),
            "-D",
            str(cluster.data_dir),
            "-p",
            str(cluster.port),
            "-k",
            cluster.socket_dir,
            "-c",
            "listen_addresses=127.0.0.1",
        ],
        stdout=logfile,
        stderr=subprocess.STDOUT,
        **demote(),
    )
    logfile.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if cluster.process.poll() is not None:
            raise RuntimeError(f"the source did not restart (exit {cluster.process.returncode}); see its log")
        ready = subprocess.run(
            [str(PG_BIN / "pg_isready"), "-q", "-h", cluster.socket_dir, "-p", str(cluster.port)], check=False
        )
        if ready.returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError("the source did not become ready after its restart")


def signal_tree(pid: int, signum: int) -> list[int]:
    """``signum`` to ``pid`` and its descendants (SIGSTOP/SIGCONT of the agent we started)."""
    pids = [pid, *descendants(pid)]
    for each in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signum)
    return pids


# --- restored servers ---------------------------------------------------------------------------------------


def psql_at(socket_dir: Path, port: int, database: str, sql: str, *, timeout: float = 30.0) -> str | None:
    """One query against a restored server; None when it does not answer (yet)."""
    try:
        argv = [str(PG_BIN / "psql"), "-X", "-q", "-At", "-h", str(socket_dir), "-p", str(port), "-U", "postgres"]
        proc = subprocess.run(
            [*argv, "-d", database, "-c", sql],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env={**os.environ, "PGCONNECT_TIMEOUT": "2"},
        )
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def wait_promoted(socket_dir: Path, port: int, deadline: float, data_dir: Path, poll: float = 0.05) -> None:
    """Until the restored server accepts connections and is out of recovery (``pg_is_in_recovery()`` false)."""
    while time.monotonic() < deadline:
        if psql_at(socket_dir, port, "postgres", "select pg_is_in_recovery()", timeout=10) == "f":
            return
        if not (data_dir / "postmaster.pid").exists():  # started before this is called: it has stopped
            raise RuntimeError(f"the restored server in {data_dir} stopped\n{server_log_tail(data_dir)}")
        time.sleep(poll)
    raise RuntimeError(f"the restored server in {data_dir} did not leave recovery in time\n{server_log_tail(data_dir)}")


def server_log_tail(data_dir: Path, lines: int = 15) -> str:
    logs = sorted(data_dir.parent.glob(f"{data_dir.name}*.log")) + sorted((data_dir / "log").glob("*"))
    text = ""
    for path in logs:
        try:
            text += f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        except OSError:
            continue
    return text


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def stop_restored(data_dir: Path, *extra: Path) -> None:
    """Stop a restored server (immediately: it is thrown away) and remove its directories."""
    if postmaster_pid(data_dir) is not None:
        subprocess.run(
            [str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            check=False,
            cwd="/",
            **demote(),
        )
    for path in (data_dir, *extra):
        shutil.rmtree(path, ignore_errors=True)


# --- WAL ----------------------------------------------------------------------------------------------------


def lsn_int(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def segno_of_lsn(lsn: str, segment_size: int) -> int:
    return lsn_int(lsn) // segment_size


def segno_of_name(name: str, segment_size: int) -> int | None:
    match = SEGMENT_NAME.match(name)
    if match is None:
        return None
    return int(match.group(2), 16) * ((1 << 32) // segment_size) + int(match.group(3), 16)


def agent_newest_segment(repo: Path, segment_size: int, timeline: str = "00000001") -> int | None:
    """The newest full segment whose record is in the agent's folder repository
    (``wal/<system identifier>/<timeline>/<name>.json``, the record written after the object)."""
    newest: int | None = None
    for sysid in _listdir(repo / "wal"):
        for entry in _listdir(repo / "wal" / sysid / timeline):
            if entry.endswith(".json"):
                segno = segno_of_name(entry.removesuffix(".json"), segment_size)
                if segno is not None and (newest is None or segno > newest):
                    newest = segno
    return newest


def agent_partial_records(repo: Path) -> list[Path]:
    """Records of partial segments (``….partial.json``) in the agent's folder repository."""
    return sorted(repo.glob("wal/*/*/*.partial.json"))


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def spool_use(spool: Path) -> tuple[int, int]:
    """Complete WAL files waiting in the agent's spool and their bytes (the ``.partial`` being written and
    the ``.incoming`` directory excluded: the one is pre-allocated to a full segment from its first byte)."""
    files = size = 0
    for entry in _scandir(spool):
        if entry.name.endswith(".partial") or entry.name.startswith("."):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                files += 1
                size += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
    return files, size


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(path))
    except FileNotFoundError:
        return []


@dataclass
class ArchiveSample:
    at: float
    current_segno: int
    slot_lag_bytes: int | None
    pgbackrest_lag_segments: int | None
    agent_lag_segments: int | None
    spool_files: int
    spool_bytes: int


class ArchiveSampler(threading.Thread):
    """Every 0.5 s: the server's current segment, the agent's slot's retained WAL, how many complete segments each
    archive is behind (pgBackRest: ``pg_stat_archiver.last_archived_wal``; the agent: the newest record in
    its repository) and the agent's spool."""

    def __init__(self, cluster: Cluster, repo: Path, spool: Path, segment_size: int, database: str) -> None:
        super().__init__(daemon=True)
        self.cluster, self.repo, self.spool = cluster, repo, spool
        self.segment_size = segment_size
        self.env = pg_env(cluster, database)
        self.samples: list[ArchiveSample] = []
        self.started = time.perf_counter()
        self.done = threading.Event()

    def sample(self) -> ArchiveSample | None:
        sql = (
            "select pg_current_wal_lsn(), "
            "(select pg_current_wal_lsn() - restart_lsn from pg_replication_slots where slot_name = 'kybdr_agent'), "
            "(select coalesce(last_archived_wal, '') from pg_stat_archiver)"
        )
        proc = subprocess.run(
            [str(PG_BIN / "psql"), "-X", "-At", "-F", "|", "-c", sql], env=self.env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            return None
        lsn, slot_lag, archived = proc.stdout.strip().split("|")
        current = segno_of_lsn(lsn, self.segment_size)
        archived_segno = segno_of_name(archived, self.segment_size) if archived else None
        agent = agent_newest_segment(self.repo, self.segment_size)
        files, size = spool_use(self.spool)
        return ArchiveSample(
            at=time.perf_counter() - self.started,
            current_segno=current,
            slot_lag_bytes=int(float(slot_lag)) if slot_lag else None,
            pgbackrest_lag_segments=None if archived_segno is None else max(0, current - archived_segno - 1),
            agent_lag_segments=None if agent is None else max(0, current - agent - 1),
            spool_files=files,
            spool_bytes=size,
        )

    def run(self) -> None:
        while not self.done.is_set():
            got = self.sample()
            if got is not None:
                self.samples.append(got)
            self.done.wait(SAMPLE_SECONDS)

    def stop(self) -> list[ArchiveSample]:
        self.done.set()
        self.join()
        return self.samples


def archiver_cpu_seconds(cluster: Cluster) -> float:
    """CPU of the server's archiver process and the archive_command runs it has reaped (pgBackRest's
    ``archive-push``, each in its own ``sh -c``)."""
    for pid in children(cluster.process.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                title = cmd.read().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if "archiver" in title:
            fields = _stat_fields(pid)
            if fields is not None:
                return sum(int(f) for f in fields[11:15]) / CLK_TCK
    return 0.0
