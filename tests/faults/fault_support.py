"""What the fault suite needs besides tests/support.py: repositories it can inspect for leftovers, a proxy
that holds chosen S3 requests (and drops them if the agent dies meanwhile), a lock that stops pg_dump mid-dump,
/proc inspection of the agent's pg_dump/pg_restore children, and small filesystems that fill up.

Nothing here stands in for the agent's own I/O: the agent runs as a real process against real PostgreSQL,
a real folder or a real moto server over HTTP. These helpers only inject faults from outside (a held
request, a delayed syscall, a signal, a full disk) and look at what is left afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from kybdr_agent.postgres.cluster import PG_BIN, Cluster
from tests.daemon_support import Daemon
from tests.faultproxy import FaultProxy
from tests.faults.report import FaultTally
from tests.support import (
    KYBDR,
    MotoServer,
    create_incompressible_database,
    create_mixed_database,
    run_cli,
    unique_db,
)

TEMP_MARKER: Final = ".kybdr-tmp-"
LEASE: Final = "lease.json"
MANIFEST: Final = "manifest.json"
TOOLS: Final = ("pg_dump", "pg_restore")
SCRATCH_PREFIXES: Final = ("kybdr_restore_", "kybdr_drill_")
BIG_MB: Final = 12  # stored ~12 MiB even compressed: three 5 MiB parts, more than a small disk holds

RepoKind = Literal["folder", "s3"]


# --- waiting ---------------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def conclude(tally: FaultTally, **details: object) -> None:
    """Record the tally and assert it is clean, showing what was found when it is not."""
    try:
        tally.assert_clean()
    except AssertionError:
        shown = "\n".join(f"  {name}: {value!r}" for name, value in details.items())
        raise AssertionError(f"{tally}\n{shown}") from None


# --- a proxy that holds requests ---------------------------------------------------------------------


@dataclass
class Hold:
    """Hold every request with this method whose path ends with ``suffix`` (and, with ``part``, only
    UploadPart requests; without it, never multipart requests) for ``seconds`` before forwarding it.

    The first ``skip`` matching requests pass at once. A request whose client disconnected while it was
    held is dropped, never forwarded: that is what a ``kill -9`` of the agent mid-request means to S3 (the
    request never arrived complete)."""

    method: str
    suffix: str
    seconds: float
    part: bool = False
    contains: str = ""
    skip: int = 0
    seen: int = 0
    forwarded: int = 0
    dropped: int = 0

    def matches(self, method: str, target: str) -> bool:
        parts = urlsplit(target)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        path = unquote(parts.path)
        multipart = "uploadId" in query or "partNumber" in query or "uploads" in query
        is_part = method == "PUT" and "partNumber" in query
        return (
            method == self.method
            and path.endswith(self.suffix)
            and self.contains in path
            and (is_part if self.part else not multipart)
        )

    @property
    def pending(self) -> int:
        return self.seen - self.forwarded - self.dropped


class HoldingProxy(FaultProxy):
    """tests/faultproxy.py's proxy plus per-path holds (``holds``), to widen a window a kill must hit."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.holds: list[Hold] = []

    def hold(
        self, method: str, suffix: str, seconds: float, *, part: bool = False, contains: str = "", skip: int = 0
    ) -> Hold:
        added = Hold(method, suffix, seconds, part=part, contains=contains, skip=skip)
        self.holds.append(added)
        return added

    def _held(self, method: str, target: str) -> Hold | None:
        for hold in list(self.holds):
            if hold.matches(method, target):
                hold.seen += 1
                if hold.seen <= hold.skip:
                    hold.forwarded += 1
                    return None
                return hold
        return None

    async def _serve_one(self, request: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        hold = self._held(request.method, request.target)
        if hold is None:
            return await super()._serve_one(request, reader, writer)
        if request.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        try:
            body = await reader.readexactly(request.length)
        except (asyncio.IncompleteReadError, ConnectionError):  # killed while sending it
            hold.dropped += 1
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold.seconds
        while loop.time() < deadline:
            if reader.at_eof() or writer.transport.is_closing():  # the agent died while we held it
                hold.dropped += 1
                return False
            await asyncio.sleep(0.01)
        hold.forwarded += 1
        status, headers, answer = await self._forward(request, body)
        await self._respond(writer, status, headers, answer, None, head_only=request.method == "HEAD")
        return bool(request.keep_alive)


# --- repositories -------------------------------------------------------------------------------------


@dataclass
class Repo:
    """A folder or S3 repository as the agent sees it (through ``endpoint``, maybe a proxy) and as the test
    inspects it (directly: the folder on disk, or moto without any proxy)."""

    kind: RepoKind
    root: Path
    moto: MotoServer | None = None
    bucket: str = ""
    prefix: str = "kybdr"
    endpoint: str = ""

    def toml(self) -> str:
        if self.kind == "folder":
            return f'url = "file://{self.root}"\n'
        assert self.moto is not None
        return (
            f'url = "s3://{self.bucket}/{self.prefix}"\nendpoint_url = "{self.endpoint or self.moto.endpoint}"\n'
            'region = "us-east-1"\naddressing_style = "path"\nmin_part_size_mib = 5\npart_size_mib = 5\n'
        )

    def objects(self) -> dict[str, int]:
        """Every stored object (folder: every file, temp files included) by key, with its size."""
        if self.kind == "folder":
            if not self.root.exists():
                return {}
            return {p.relative_to(self.root).as_posix(): p.stat().st_size for p in self.root.rglob("*") if p.is_file()}
        assert self.moto is not None
        s3 = self.moto.client()
        found: dict[str, int] = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/"):
            for item in page.get("Contents", []):
                found[item["Key"][len(self.prefix) + 1 :]] = int(item["Size"])
        return found

    def uploads(self) -> list[str]:
        """Open multipart uploads (S3) or temp files (folder): uploads nobody finished."""
        if self.kind == "folder":
            return sorted(k for k in self.objects() if k.rpartition("/")[2].startswith(TEMP_MARKER))
        assert self.moto is not None
        found = self.moto.client().list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        return sorted(str(u["Key"]) for u in found)

    def folders(self) -> dict[str, set[str]]:
        """``backups/<db>/<id>`` → the names of the objects in it (temp files excluded)."""
        found: dict[str, set[str]] = {}
        for key in self.objects():
            parts = key.split("/")
            if len(parts) == 4 and parts[0] == "backups" and not parts[3].startswith(TEMP_MARKER):
                found.setdefault("/".join(parts[:3]), set()).add(parts[3])
        return found

    def completed_ids(self) -> set[str]:
        return {prefix.rpartition("/")[2] for prefix, names in self.folders().items() if MANIFEST in names}

    def leftovers(self) -> list[str]:
        """Everything an unfinished or interrupted operation may leave: open uploads and temp files, objects
        in folders without a manifest, leases, and (folder) empty directories."""
        found = [f"unfinished upload {key}" for key in self.uploads()]
        for prefix, names in sorted(self.folders().items()):
            for name in sorted(names):
                if name == LEASE:
                    found.append(f"lease {prefix}/{name}")
                elif MANIFEST not in names:
                    found.append(f"object without manifest {prefix}/{name}")
        if self.kind == "folder" and self.root.exists():
            for path in sorted(self.root.rglob("*")):
                if path.is_dir() and not any(path.iterdir()):
                    found.append(f"empty folder {path.relative_to(self.root).as_posix()}")
        return found


def folder_repo(root: Path) -> Repo:
    return Repo("folder", root)


def s3_repo(moto: MotoServer, bucket: str, endpoint: str = "") -> Repo:
    return Repo("s3", Path("/nonexistent"), moto=moto, bucket=bucket, endpoint=endpoint)


# --- sample databases ----------------------------------------------------------------------------------

_SHARED: dict[tuple[int, str], str] = {}


def shared_database(pg: Cluster, kind: Literal["small", "big", "tiny"]) -> str:
    """One sample database of each kind per cluster, shared by the fault suite's modules (creating the big
    one takes seconds). Tests only read them."""
    key = (pg.port, kind)
    if key not in _SHARED:
        name = unique_db(f"fault_{kind}")
        if kind == "big":
            create_incompressible_database(pg, name, megabytes=BIG_MB)
            # One large object: pg_dump reads it after every table, where ``large_objects_locked`` stops it.
            pg.psql(name, "select lo_from_bytea(0, 'read after the tables')")
        else:
            create_mixed_database(pg, name, rows=2000 if kind == "small" else 200)
        _SHARED[key] = name
    return _SHARED[key]


@contextlib.contextmanager
def large_objects_locked(pg: Cluster, database: str) -> Iterator[None]:
    """Hold ``database``'s ``pg_largeobject`` in ACCESS EXCLUSIVE mode until the block ends.

    A pg_dump of the database started meanwhile streams all its table data, then waits at its first large
    object (it dumps them after the tables): alive and mid-dump however fast the agent takes its output in
    and however late the test looks. A held upload alone does not ensure that, since the agent's bounded
    buffers (two batches queued, parts in flight, the part being filled) take in more than the "big" dump.
    Leave the block only after killing the agent: pg_dump then writes into a pipe nobody reads, and exits."""
    holder = subprocess.Popen(
        [str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **pg.env()},
    )
    assert holder.stdin is not None
    holder.stdin.write(b"begin; lock table pg_catalog.pg_largeobject in access exclusive mode;\n")
    holder.stdin.flush()
    held = (
        "select count(*) from pg_locks where granted and mode = 'AccessExclusiveLock' "
        "and relation = 'pg_catalog.pg_largeobject'::regclass "
        "and database = (select oid from pg_database where datname = current_database())"
    )

    def locked() -> bool:
        assert holder.poll() is None, "the session locking the large objects ended"
        return pg.psql(database, held).strip() == "1"

    try:
        wait_for(locked, 30, f"the lock on {database}'s large objects")
        yield
    finally:
        with contextlib.suppress(BrokenPipeError):
            holder.stdin.write(b"commit;\n")
            holder.stdin.close()
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


# --- configuration ------------------------------------------------------------------------------------


def write_config(
    path: Path,
    pg: Cluster,
    repo: Repo,
    *,
    key_file: Path,
    databases: Sequence[str] = (),
    policies: str = "",
    backup_extra: str = "",
    daemon_extra: str = "",
    extra: str = "",
) -> tuple[Path, Path]:
    """An agent configuration in ``path``'s folder with its own state folder and control socket (``extra``:
    further sections, appended)."""
    state = path.parent / f"{path.stem}-state"
    state.mkdir(parents=True, exist_ok=True)
    socket_path = path.parent / f"{path.stem}.sock"
    path.write_text(
        f'[backup]\nbackup_dir = "{state}"\n{backup_extra}\n{policies}\n'
        f'[database]\ndsn = "host={pg.socket_dir} port={pg.port} user=postgres"\n'
        f"databases = {json.dumps(list(databases))}\n\n"
        f'[encryption]\nkey_file = "{key_file}"\n\n[repository]\n{repo.toml()}\n'
        f'[control]\nsocket = "{socket_path}"\n\n[drill]\nschedule = ""\n\n'
        f"[daemon]\nshutdown_grace_seconds = 2\n{daemon_extra}\n{extra}"
    )
    return path, socket_path


def policy(name: str, database: str, **keep: object) -> str:
    """A ``[[backup.policies]]`` table for one database; ``keep`` overrides its keep counts and ages."""
    lines = [
        "[[backup.policies]]",
        f'name = "{name}"',
        'schedule = "0 3 1 1 *"',
        f"databases = {json.dumps([database])}",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in keep.items()]
    return "\n".join(lines) + "\n"


def cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A one-shot command in its own process (``--local``: never through a running agent)."""
    proc: subprocess.CompletedProcess[str] = run_cli(config, "--local", *args, timeout=timeout)
    return proc


def cli_ok(config: Path, *args: str) -> Any:
    proc = cli(config, *args, "--json")
    assert proc.returncode == 0, (args, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def start_cli(config: Path, *args: str, prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*prefix, *KYBDR, "--config", str(config), "--local", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def invalid_backups(config: Path, ids: Iterable[str]) -> dict[str, str]:
    """Each id whose full validation fails, with why (empty: every one validates)."""
    bad: dict[str, str] = {}
    for backup_id in sorted(ids):
        proc = cli(config, "validate", backup_id, "--level", "full", "--json")
        if proc.returncode != 0 or not json.loads(proc.stdout or "{}").get("ok"):
            bad[backup_id] = proc.stderr.strip()[-500:]
    return bad


# --- processes ---------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rpartition(")")[2].split()


def running(pid: int) -> bool:
    """The pid exists and is not a zombie (a dead child nobody reaped yet holds no resources)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _read_proc(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (from each process's parent pid in /proc/<pid>/stat)."""
    parents: dict[int, list[int]] = {}
    for child in all_pids():
        fields = _stat_fields(child)
        if fields is not None and fields[0] not in ("Z", "X"):
            parents.setdefault(int(fields[1]), []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def comm(pid: int) -> str:
    return _read_proc(pid, "comm").strip()


def tool_children(pid: int, name: str) -> list[int]:
    return [child for child in descendants(pid) if comm(child) == name]


def bytes_read(pid: int) -> int:
    """How many bytes the process has read so far (``rchar`` of /proc/<pid>/io), 0 if it is gone."""
    for line in _read_proc(pid, "io").splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def tools_mentioning(markers: Iterable[str]) -> list[str]:
    """Live pg_dump/pg_restore processes whose command line or environment mentions any marker."""
    wanted = [m for m in markers if m]
    found: list[str] = []
    for pid in all_pids():
        if comm(pid) not in TOOLS or not running(pid):
            continue
        text = _read_proc(pid, "cmdline") + " " + _read_proc(pid, "environ")
        if any(marker in text for marker in wanted):
            found.append(f"{comm(pid)} pid {pid}: {_read_proc(pid, 'cmdline').strip()}")
    return found


def orphaned_tools(pids: Iterable[int], markers: Iterable[str], timeout: float = 5.0) -> list[str]:
    """pg_dump/pg_restore processes still running ``timeout`` seconds after their agent died: the ones
    recorded before the kill (``pids``) and any other mentioning ``markers``."""
    pids = list(pids)
    markers = list(markers)

    def still() -> list[str]:
        return [f"pid {p} ({comm(p)})" for p in pids if running(p) and comm(p) in TOOLS] + tools_mentioning(markers)

    with contextlib.suppress(AssertionError):
        wait_for(lambda: not still(), timeout, "the agent's children to exit", interval=0.05)
    return still()


def kill9(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGKILL and reap (a zombie's pid would still look alive to a lease check)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=timeout)


def scratch_databases(pg: Cluster) -> list[str]:
    names = pg.psql("postgres", "select datname from pg_database order by 1").split()
    return [n for n in names if n.startswith(SCRATCH_PREFIXES)]


def drop_databases(pg: Cluster, names: Iterable[str]) -> None:
    for name in names:
        pg.psql("postgres", f'drop database if exists "{name}" with (force)')


# --- the agent as a daemon, optionally under a wrapper --------------------------------------------------


def start_agent(
    config: Path, socket_path: Path, workdir: Path, *, prefix: Sequence[str] = (), env: dict[str, str] | None = None
) -> Daemon:
    """tests/daemon_support.start_daemon with a command prefix (e.g. ``unshare --uts``: another host name)."""
    notify_path = workdir / f"notify-{uuid.uuid4().hex[:8]}.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    log_path = workdir / f"{config.stem}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*prefix, *KYBDR, "--config", str(config), "run"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path), **(env or {})},
        )
    daemon = Daemon(config, socket_path, process, notify, log_path)
    try:
        daemon.wait_notify("READY=1", timeout=60)
    except AssertionError:
        daemon.stop()
        raise
    return daemon


def other_host(name: str) -> list[str]:
    """A command prefix running the agent under its own host name (a UTS namespace): to the repository's
    leases it is another machine. Empty when namespaces are not permitted here."""
    probe = subprocess.run(
        ["unshare", "--uts", "sh", "-c", f"hostname {name} && hostname"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0 or probe.stdout.strip() != name:
        return []
    return ["unshare", "--uts", "sh", "-c", f'hostname {name} && exec "$@"', "agent"]


def log_events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for line in daemon.log().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


# --- a small filesystem --------------------------------------------------------------------------------


@dataclass
class SmallFilesystem:
    path: Path
    kind: str
    image: Path | None = None
    notes: list[str] = field(default_factory=list)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self) -> Path:
        """Write a file until the filesystem is full; returns it (delete it to free the space)."""
        filler = self.path / "filler"
        with open(filler, "wb", buffering=0) as fh:
            block = b"\xa5" * (64 << 10)
            with contextlib.suppress(OSError):
                while True:
                    fh.write(block)
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\xa5" * 512)
        return filler


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)


@contextlib.contextmanager
def small_filesystem(path: Path, megabytes: int) -> Iterator[SmallFilesystem | str]:
    """A filesystem of ``megabytes`` mounted at ``path``: a tmpfs, else a loop-mounted ext4 image.
    Yields the reason instead when neither can be mounted here."""
    path.mkdir(parents=True, exist_ok=True)
    tried: list[str] = []
    mounted: SmallFilesystem | None = None
    tmpfs = _run("mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0755", "tmpfs", str(path))
    if tmpfs.returncode == 0:
        mounted = SmallFilesystem(path, "tmpfs")
    else:
        tried.append(f"tmpfs: {tmpfs.stderr.strip()}")
        image = path.with_suffix(".img")
        steps = [
            ("truncate", "-s", f"{megabytes}M", str(image)),
            ("mkfs.ext4", "-q", "-F", "-m", "0", str(image)),
            ("mount", "-o", "loop", str(image), str(path)),
        ]
        for step in steps:
            if shutil.which(step[0]) is None:
                tried.append(f"loop image: {step[0]} is not installed")
                break
            done = _run(*step)
            if done.returncode != 0:
                tried.append(f"loop image: {' '.join(step)}: {done.stderr.strip()}")
                break
        else:
            mounted = SmallFilesystem(path, "ext4 loop image", image=image)
            with contextlib.suppress(FileNotFoundError):
                (path / "lost+found").rmdir()
    if mounted is None:
        yield "; ".join(tried)
        return
    try:
        yield mounted
    finally:
        if _run("umount", str(path)).returncode != 0:
            _run("umount", "-l", str(path))
        if mounted.image is not None:
            mounted.image.unlink(missing_ok=True)
