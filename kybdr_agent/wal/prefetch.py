"""Fetching a restore's WAL into the local spool, ahead of PostgreSQL, following ``wal.recovery``'s protocol.

``restore_command`` is a plain shell copy out of the spool (``recovery.restore_command``): no agent process per
file, no repository credentials in the server's environment. This module is the other half: it announces every
planned file with ``<name>.pending`` before PostgreSQL starts, fetches the files with bounded parallelism (each
verified by ``WalArchive.fetch`` and renamed into place whole), and then removes the marker. A file that cannot be
fetched after a few attempts gets ``<name>.failed`` — written *before* its ``.pending`` goes, so the copy never
sees "nothing" and takes a planned file for the end of the WAL: it prints the reason into PostgreSQL's log and
exits above 125, which aborts recovery instead of promoting a shorter database.

Two ways to run:

* ``run(follow=False)``: everything, at once, then return (the restore without ``--start``: nobody fetches
  after the command exits, so the spool must be complete). The first failure raises ``PrefetchError``.
* ``run(follow=True)``: alongside the server, until the caller cancels it. PostgreSQL touches ``<name>.wanted``
  on every request; the segment whose ``.wanted`` was touched last is where recovery *is*. Segments are fetched
  at most ``lookahead`` past it, and ready ones more than ``keep_behind`` behind it are evicted — the
  ``.wanted`` removed, ``.pending`` put back, then the file removed — so the spool holds a bounded number of
  segments whatever the range. A server that restarts its recovery asks for an evicted segment again: its fresh
  ``.wanted`` puts it at the head of the queue, the copy waits on ``.pending`` meanwhile, and that segment is
  then where recovery is (the ones after it come back the same way, one request at a time). Histories are
  never evicted (a few bytes; recovery reads them at the start and again at the end, to pick the new
  timeline).

``abandon`` marks whatever is not in the spool yet as failed, so a server started later on this spool aborts
rather than taking the missing files for the end of the WAL.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import anyio

from kybdr_agent.asyncutil import task_group
from kybdr_agent.errors import KybdrError
from kybdr_agent.wal.fetch_plan import SpoolFile
from kybdr_agent.wal.recovery import FAILED_SUFFIX, PENDING_SUFFIX, WANTED_SUFFIX

DEFAULT_CONCURRENCY: Final = 4
DEFAULT_LOOKAHEAD: Final = 16  # segments past the one PostgreSQL asked for last
DEFAULT_KEEP_BEHIND: Final = 2
DEFAULT_ATTEMPTS: Final = 3
POLL_SECONDS: Final = 0.2

Fetch = Callable[[SpoolFile, Path], Awaitable[None]]


class PrefetchError(KybdrError):
    """A planned WAL file could not be fetched or did not verify; the message names it and says why."""


class _State(enum.Enum):
    PENDING = "pending"
    FETCHING = "fetching"
    READY = "ready"
    EVICTED = "evicted"
    FAILED = "failed"


@dataclass
class PrefetchStats:
    fetched: int = 0
    bytes: int = 0
    evicted: int = 0
    refetched: int = 0
    failures: list[str] = field(default_factory=list)


def write_marker(path: Path, text: str) -> None:
    """A marker file appears whole: written beside it, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Prefetcher:
    """The spool of one restore: its markers, its fetch workers and (following a server) its window."""

    def __init__(
        self,
        spool: Path,
        histories: Sequence[SpoolFile],
        segments: Sequence[SpoolFile],
        fetch: Fetch,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        lookahead: int = DEFAULT_LOOKAHEAD,
        keep_behind: int = DEFAULT_KEEP_BEHIND,
        attempts: int = DEFAULT_ATTEMPTS,
        retry_delay: float = 0.5,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        if concurrency < 1 or lookahead < 1 or keep_behind < 1 or attempts < 1:
            raise ValueError("concurrency, lookahead, keep_behind and attempts must be at least 1")
        self.spool = spool
        self.files: tuple[SpoolFile, ...] = (*histories, *segments)
        self._histories = len(histories)
        self._index = {f.spool_name: i for i, f in enumerate(self.files)}
        if len(self._index) != len(self.files):
            raise ValueError("two planned files have the same spool name")
        self._fetch = fetch
        self._concurrency = concurrency
        self._lookahead = lookahead
        self._keep_behind = keep_behind
        self._attempts = attempts
        self._retry_delay = retry_delay
        self._poll_seconds = poll_seconds
        self._state = [_State.PENDING] * len(self.files)
        self._next = 0
        self._priority: deque[int] = deque()
        self._position = -1  # segment index (0 = first segment) of the one PostgreSQL asked for last
        self._wake = anyio.Event()
        self.stats = PrefetchStats()

    # --- markers ------------------------------------------------------------------------------------------

    def path(self, file: SpoolFile, suffix: str = "") -> Path:
        return self.spool / (file.spool_name + suffix)

    def prepare(self) -> None:
        """Create the spool (0700, new or empty) and announce every planned file as pending."""
        self.spool.mkdir(mode=0o700, exist_ok=True)
        if any(self.spool.iterdir()):
            raise PrefetchError(f"the WAL spool {self.spool} is not empty; remove it or choose another")
        os.chmod(self.spool, 0o700)
        for file in self.files:
            with open(self.path(file, PENDING_SUFFIX), "x"):
                pass

    def abandon(self, why: str) -> None:
        """Every file not in the spool yet becomes failed, so nothing started on this spool later promotes early."""
        for index, file in enumerate(self.files):
            if self._state[index] not in (_State.READY, _State.FAILED):  # a failure keeps its own reason
                self._fail(index, f"kybdr-agent restore: abandoned before {file.spool_name} was fetched: {why}")

    @property
    def complete(self) -> bool:
        return all(state is _State.READY for state in self._state)

    @property
    def failed(self) -> bool:
        return bool(self.stats.failures)

    def _fail(self, index: int, message: str) -> None:
        file = self.files[index]
        write_marker(self.path(file, FAILED_SUFFIX), message + "\n")
        with contextlib.suppress(FileNotFoundError):
            self.path(file, PENDING_SUFFIX).unlink()  # only once .failed is there: never "nothing"
        self._state[index] = _State.FAILED

    # --- running ------------------------------------------------------------------------------------------

    async def run(self, *, follow: bool) -> PrefetchStats:
        """Fetch the plan (see the module docstring); ``follow`` runs until cancelled."""
        async with task_group() as tg:
            if follow:
                tg.start_soon(self._poll_forever)
            for _ in range(self._concurrency):
                tg.start_soon(self._worker, follow)
        if self.stats.failures:
            raise PrefetchError(self.stats.failures[0])
        return self.stats

    async def _worker(self, follow: bool) -> None:
        while True:
            index = await self._take(follow)
            if index is None:
                return
            await self._fetch_one(index, follow)

    def _allowed(self, index: int, follow: bool) -> bool:
        if not follow or index < self._histories:
            return True
        return index - self._histories <= self._position + self._lookahead

    async def _take(self, follow: bool) -> int | None:
        while True:
            if self._priority:
                return self._priority.popleft()
            if self.stats.failures and not follow:
                return None
            if not self.stats.failures and self._next < len(self.files) and self._allowed(self._next, follow):
                self._next += 1
                return self._next - 1
            if not follow and self._next >= len(self.files):
                return None
            await self._wake.wait()

    async def _fetch_one(self, index: int, follow: bool) -> None:
        file = self.files[index]
        self._state[index] = _State.FETCHING
        error: Exception | None = None
        for attempt in range(self._attempts):
            try:
                await self._fetch(file, self.path(file))
            except Exception as exc:  # noqa: BLE001 - any failure to fetch is retried, then reported whole
                error = exc
                if attempt + 1 < self._attempts:
                    await anyio.sleep(self._retry_delay * 2**attempt)
                continue
            error = None
            break
        if error is not None:
            message = f"{file.spool_name} could not be fetched from the repository: {error}"
            self.stats.failures.append(message)
            self._fail(index, f"kybdr-agent restore: {message}")
            self._notify()
            return
        with contextlib.suppress(OSError):
            self.stats.bytes += self.path(file).stat().st_size
        self.stats.fetched += 1
        self._state[index] = _State.READY
        with contextlib.suppress(FileNotFoundError):
            self.path(file, PENDING_SUFFIX).unlink()
        if follow:
            self._notify()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = anyio.Event()

    # --- following the server -----------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            wanted = await anyio.to_thread.run_sync(self._wanted_names)
            if self._observe(wanted):
                self._notify()
            await anyio.sleep(self._poll_seconds)

    def _wanted_names(self) -> dict[str, int]:
        """Every ``.wanted`` marker's name (without the suffix) and when it was last touched."""
        found: dict[str, int] = {}
        with os.scandir(self.spool) as entries:
            for entry in entries:
                if entry.name.endswith(WANTED_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        found[entry.name[: -len(WANTED_SUFFIX)]] = entry.stat().st_mtime_ns
        return found

    def _observe(self, wanted: dict[str, int]) -> bool:
        """Find where recovery is, queue evicted files asked for again, evict what is far behind; True when
        workers may have something new to do."""
        changed = False
        asked = [(touched, self._index[name]) for name, touched in wanted.items() if name in self._index]
        segments = [(touched, index - self._histories) for touched, index in asked if index >= self._histories]
        if segments:
            position = max(segments)[1]  # the last touched; the later segment when the clock cannot tell
            changed = position != self._position
            self._position = position
        for _, index in asked:
            if self._state[index] is _State.EVICTED:
                self._state[index] = _State.PENDING
                self._priority.append(index)
                self.stats.refetched += 1
                changed = True
        limit = self._histories + self._position - self._keep_behind
        for index in range(self._histories, max(self._histories, limit)):
            if self._state[index] is _State.READY:
                self._evict(index)
        return changed

    def _evict(self, index: int) -> None:
        file = self.files[index]
        with contextlib.suppress(FileNotFoundError):
            self.path(file, WANTED_SUFFIX).unlink()
        with open(self.path(file, PENDING_SUFFIX), "w"):
            pass
        with contextlib.suppress(FileNotFoundError):
            self.path(file).unlink()
        self._state[index] = _State.EVICTED
        self.stats.evicted += 1
