"""pg_dump and pg_restore as child processes: how they are started, read, stopped and judged.

How to reach the server (and which binaries to run) is ``postgres.connection``'s job; this module only
runs the children it is handed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import anyio

from kybdr_agent.asyncutil import TailBuffer

PIPE_LIMIT: Final = 4 << 20


async def drain_into(stream: asyncio.StreamReader | None, tail: TailBuffer) -> None:
    if stream is None:
        return
    while chunk := await stream.read(64 * 1024):
        tail.feed(chunk)


def failure_message(what: str, returncode: int, stderr: TailBuffer) -> str:
    detail = stderr.text() or "(no output on stderr)"
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
    return f"{what} {how}: {detail}"


@asynccontextmanager
async def child_process(
    argv: list[str], *, env: dict[str, str], stdin: int | None = None, stdout: int | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start a child; whatever happens in the block, it is not left running (terminate, then kill).

    ``stdin``/``stdout`` take asyncio's PIPE/DEVNULL constants or a file descriptor for the child."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=stdin, stdout=stdout, stderr=asyncio.subprocess.PIPE, env=env, limit=PIPE_LIMIT
    )
    try:
        yield proc
    finally:
        with anyio.CancelScope(shield=True):
            await stop_process(proc)


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    with anyio.move_on_after(grace):
        await proc.wait()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


PIPE_SIZE: Final = 1 << 20
# pg_dump writes its archive through stdio, which buffers a pipe in 4 KiB blocks: 250,000 writes per GB, and
# as many wake-ups of the thread reading them (each a GIL hand-off and a small copy: ~1.8 CPU-s per GB in a
# profile). coreutils' stdbuf gives its stdout a larger buffer; the same dump arrives in 512 KiB writes
# (strace: 12,304 writes → 49 for a 50 MB dump), two of which fit in the enlarged pipe.
STDOUT_BUFFER: Final = "512K"


def buffered_stdout(argv: list[str]) -> list[str]:
    """``argv`` run under ``stdbuf -o STDOUT_BUFFER`` when coreutils' stdbuf is installed; as it is otherwise
    (the output is the same, only written in smaller pieces)."""
    stdbuf = shutil.which("stdbuf")
    return [stdbuf, "-o", STDOUT_BUFFER, *argv] if stdbuf else argv


_F_SETPIPE_SZ: Final = 1031  # Linux fcntl; not exported by the fcntl module on every Python


class PipeReader:
    """Blocking reads of a child's stdout, meant to run in a worker thread.

    Reading pg_dump's pipe off the event loop lets the loop stay idle and the read overlap with
    compression in another thread (both release the GIL). The pipe is enlarged to 1 MiB so pg_dump can
    keep writing while a chunk is being handed over. The descriptor is closed by whoever finishes last:
    ``close()`` from the owner, or the reading thread if a read was in progress at that moment.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer only at end of stream. Empty bytes means EOF."""
        with self._lock:
            if self._closed:
                return b""
            self._busy = True
        try:
            pieces: list[bytes] = []
            total = 0
            while total < size:
                piece = os.read(self._fd, size - total)
                if not piece:
                    break
                pieces.append(piece)
                total += len(piece)
            return b"".join(pieces)
        finally:
            with self._lock:
                self._busy = False
                if self._close_requested():
                    os.close(self._fd)

    def _close_requested(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._busy:
                os.close(self._fd)
