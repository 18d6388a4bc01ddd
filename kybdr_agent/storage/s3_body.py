"""How S3 request bodies reach the socket, so the stall deadline can see them move.

aiohttp writes a ``bytes`` body in one go, which would let a stall deadline bound only the whole request;
botocore's ``before-send`` hook (``watch_request``) swaps each signed body for ``_WatchedBody``, which goes
out in 64 KiB pieces and reports every one to the attempt's ``AttemptWatch`` (``storage/retry.py``).
"""

from __future__ import annotations

import fcntl
import io
import struct
import termios
from typing import Any, Final

import aiohttp.abc
import aiohttp.payload
import anyio

from kybdr_agent.storage.retry import AttemptWatch, current_watch

BODY_CHUNK: Final = 64 * 1024
_DRAIN_POLL_MAX: Final = 0.05


def _unsent(writer: aiohttp.abc.AbstractStreamWriter) -> int | None:
    """Bytes written but not yet acknowledged by the peer: the transport's buffer plus the socket's queue.

    None where that cannot be known (no transport, or a platform without ``TIOCOUTQ``).
    """
    transport = getattr(writer, "transport", None)
    if transport is None or transport.is_closing():
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, AttributeError):
        return None
    return int(transport.get_write_buffer_size()) + int(queued)


class _WatchedBody(aiohttp.payload.Payload):
    """A request body that tells the attempt's watch about every chunk the connection accepts.

    aiohttp writes a plain ``bytes`` body in one go, so a stall deadline could only bound the whole request.
    This body goes out in 64 KiB views of the same buffer (no copies); each ``writer.write`` returns once
    the transport has room again, so a returning write means bytes moved. The last bytes can sit in the
    kernel's socket buffer, megabytes of it on a slow link; aiohttp starts its per-read answer timeout as
    soon as the body is written, so before returning we wait until what is still unacknowledged could
    leave within half a stall deadline at the floor throughput, counting every drop as progress.
    """

    def __init__(self, data: bytes | bytearray | memoryview, watch: AttemptWatch) -> None:
        super().__init__(data)
        self._size = len(data)
        self._watch = watch

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: aiohttp.abc.AbstractStreamWriter, content_length: int | None) -> None:
        view = memoryview(self._value)
        end = len(view) if content_length is None else min(content_length, len(view))
        for start in range(0, end, BODY_CHUNK):
            chunk = view[start : min(start + BODY_CHUNK, end)]
            await writer.write(chunk)
            self._watch.moved(len(chunk))
        await self._drain(writer)
        self._watch.sent()

    async def _drain(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        unsent = _unsent(writer)
        pause = 0.001
        while unsent is not None and unsent > self._watch.tail_allowance:
            await anyio.sleep(pause)
            now = _unsent(writer)
            if now is not None and now < unsent:
                self._watch.moved(unsent - now)
            unsent = now
            pause = min(pause * 2, _DRAIN_POLL_MAX)


def watch_request(request: Any, **_: Any) -> None:
    """botocore's ``before-send`` event, after signing: send the body through ``_WatchedBody``.

    botocore measured, hashed and signed the bytes; only how they reach the socket changes. It hands
    PutObject and UploadPart bodies over as a ``BytesIO`` around our bytes, whose ``getvalue`` is that same
    object (no copy). A request without a body is sent at once, so its watch hands over to the answer's
    per-read timeout.
    """
    watch = current_watch()
    if watch is None:
        return
    body = request.body
    if isinstance(body, io.BytesIO):
        body = memoryview(body.getvalue())[body.tell() :]
    if isinstance(body, bytes | bytearray | memoryview) and len(body):
        request.body = _WatchedBody(body, watch)
    elif not body:
        watch.sent()
