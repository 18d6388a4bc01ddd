"""What restore_bench.py measures beyond bench_support.py: the server's CPU and the restore spool's peak size.

A restore's work is mostly the server's (COPY parsing, heap writes, index builds in the backend and its
parallel workers), which no client process tree includes, so the cluster's CPU is read from /proc around
each run: the postmaster's own and reaped children's time plus every live child's. The spool of
``restore --jobs N`` exists only while the agent runs (it is deleted when pg_restore -j is done, whatever
happens), so its size is read by polling the spool directory; the file sits at its full size for the whole
of pg_restore -j's run, seconds at a time, so a 10 ms poll cannot miss the peak. The poll also dates the
phases: the spool last grew when it was complete, and vanished when pg_restore -j had finished.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_support import CLK_TCK

SPOOL_POLL_SECONDS = 0.01


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from field 3 (state) on; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _cpu_ticks(fields: list[str]) -> int:
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
    return sum(int(f) for f in fields[11:15])


def cluster_cpu_seconds(postmaster: int) -> float:
    """CPU seconds the cluster has used so far: the postmaster (with the children it reaped) and its live
    children (backends, parallel workers, autovacuum, checkpointer …). Diff two readings taken at rest."""
    own = _stat_fields(postmaster)
    if own is None:
        raise RuntimeError(f"the postmaster (pid {postmaster}) is gone")
    ticks = _cpu_ticks(own)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == postmaster:
            ticks += _cpu_ticks(fields)
    return ticks / CLK_TCK


@dataclass(frozen=True)
class SpoolUse:
    """The spool directory during one run: peak bytes (apparent and allocated) and when things happened,
    in seconds from the watcher's start (None if the spool never appeared)."""

    peak_bytes: int
    peak_allocated_bytes: int
    files_seen: int
    first_seen: float | None
    last_growth: float | None
    gone: float | None


class SpoolWatcher(threading.Thread):
    """Polls ``spool_dir`` every 10 ms until stopped, keeping the largest total it saw."""

    def __init__(self, spool_dir: Path) -> None:
        super().__init__(daemon=True)
        self.spool_dir = spool_dir
        self.started_at = time.perf_counter()
        self.peak = 0
        self.peak_allocated = 0
        self.names: set[str] = set()
        self.first_seen: float | None = None
        self.last_growth: float | None = None
        self.gone: float | None = None
        self.done = threading.Event()

    def _sample(self) -> None:
        size = allocated = 0
        found = False
        try:
            entries = list(os.scandir(self.spool_dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found = True
            self.names.add(entry.name)
            size += st.st_size
            allocated += st.st_blocks * 512
        now = time.perf_counter() - self.started_at
        if found and self.first_seen is None:
            self.first_seen = now
        if size > self.peak:
            self.peak = size
            self.last_growth = now
        self.peak_allocated = max(self.peak_allocated, allocated)
        if not found and self.first_seen is not None and self.gone is None:
            self.gone = now

    def run(self) -> None:
        while not self.done.is_set():
            self._sample()
            self.done.wait(SPOOL_POLL_SECONDS)

    def stop(self) -> SpoolUse:
        self.done.set()
        self.join()
        self._sample()
        return SpoolUse(self.peak, self.peak_allocated, len(self.names), self.first_seen, self.last_growth, self.gone)
