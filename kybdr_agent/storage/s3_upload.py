"""One multipart upload in flight, for ``S3Store.open_upload``.

Kept apart from the store because it is the part with state: bytes buffered into parts, at most
``upload_concurrency`` part uploads running, their answers collected for the completing request.

Part buffers come from a pool of ``upload_concurrency + 1`` (one filling while the others upload), allocated
only when none is free and reused once their part is stored, so the upload's memory is that many parts
whatever the dump's size, and no part costs a fresh allocation (an 8 MiB buffer is an mmap: 2,048 page
faults each time it is made). The backup pipeline fills a lent buffer in place (``lend``/``write_lent``),
so the bytes it seals are the bytes sent; anything else writes bytes, copied into the pool's buffers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio

from kybdr_agent.errors import NotFound, StoreError
from kybdr_agent.storage.base import UploadResult
from kybdr_agent.storage.parts import PartRun, part_size_for
from kybdr_agent.telemetry import get_logger

if TYPE_CHECKING:
    from kybdr_agent.storage.s3 import S3Store

log = get_logger("kybdr_agent.s3")


class MultipartUpload:
    """One multipart upload in flight: fills parts from a bounded pool and keeps at most N uploads running."""

    def __init__(self, store: S3Store, key: str, upload_id: str, base_part_size: int, result: UploadResult):
        self._store = store
        self._key = key
        self._upload_id = upload_id
        self._base = base_part_size
        self._result = result
        self._part: bytearray | None = None  # the part being filled by ``write``
        self._filled = 0
        self._lent: deque[bytearray] = deque()  # buffers ``lend`` gave out, in order, until ``write_lent``
        self._free: list[bytearray] = []
        self._buffers = 0  # part buffers in existence: free, lent, filling or uploading
        self._handed = 0  # buffers handed out for parts, so the n-th is sized for part n
        self._next_part = 1
        self._inflight: set[asyncio.Task[None]] = set()
        self._completed: dict[int, dict[str, Any]] = {}
        self._sizes: list[int] = []
        self._completed_upload = False

    def _part_size(self, number: int) -> int:
        max_parts = self._store.options.max_parts
        return part_size_for(min(number, max_parts), self._base, max_parts)

    async def _buffer(self) -> bytearray:
        """A buffer for the next part: a free one, a new one while the pool has room, or the first one an
        upload gives back (an upload's failure is raised here)."""
        self._handed += 1
        size = self._part_size(self._handed)
        while not self._free and self._buffers > self._store.options.upload_concurrency and self._inflight:
            await self._reap(asyncio.FIRST_COMPLETED)
        if self._free:
            buffer = self._free.pop()
            if len(buffer) == size:
                return buffer
            self._buffers -= 1  # the part size grew: this one is too small from now on
        self._buffers += 1
        return bytearray(size)

    async def lend(self) -> bytearray:
        """An empty buffer the size of the next part, to fill in place and hand back with ``write_lent``; waits
        while every buffer of the pool holds a part that is still uploading."""
        if self._part is not None:
            raise RuntimeError("lend() after a short part: the stream had ended")
        buffer = await self._buffer()
        self._lent.append(buffer)
        return buffer

    async def write_lent(self, buffer: bytearray, length: int) -> None:
        """Take back the first lent buffer holding ``length`` bytes: uploaded at once when full; a short one
        holds the stream's last bytes (uploaded by ``finish``, or filled further by ``write``)."""
        if not self._lent or self._lent[0] is not buffer:
            raise RuntimeError("write_lent() of a buffer that was not lent, or out of order")
        self._lent.popleft()
        self._result.size += length
        if length == len(buffer):
            await self._submit(buffer, pooled=True)
        elif length == 0:
            self._free.append(buffer)
        else:
            self._part, self._filled = buffer, length

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lent:
            raise RuntimeError("write() while lent buffers are out")
        self._result.size += len(data)
        view = memoryview(data)
        while view:
            if self._part is None:
                self._part = await self._buffer()
                self._filled = 0
            take = min(len(view), len(self._part) - self._filled)
            self._part[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == len(self._part):
                part, self._part = self._part, None
                await self._submit(part, pooled=True)

    async def _submit(self, body: bytes | bytearray, *, pooled: bool) -> None:
        """Start uploading ``body`` as the next part; a ``pooled`` buffer goes back to the pool once stored."""
        opts = self._store.options
        if self._next_part > opts.max_parts:
            raise StoreError(
                f"the dump outgrew {opts.max_parts} parts of up to {self._part_size(opts.max_parts)} bytes; "
                "raise repository.part_size_mib or repository.max_parts"
            )
        while len(self._inflight) >= opts.upload_concurrency:
            await self._reap(asyncio.FIRST_COMPLETED)
        number = self._next_part
        self._next_part += 1
        self._sizes.append(len(body))
        self._inflight.add(asyncio.create_task(self._upload_part(number, body, pooled=pooled)))

    async def _reap(self, when: str) -> None:
        done, _ = await asyncio.wait(self._inflight, return_when=when)
        self._inflight -= done
        # Every finished task's error is retrieved (two parts can fail together); the first one is raised.
        errors = [exc for task in done if (exc := _outcome(task)) is not None]
        if errors:
            raise errors[0]

    async def _upload_part(self, number: int, body: bytes | bytearray, *, pooled: bool) -> None:
        kwargs: dict[str, Any] = {}
        if self._store.options.checksums == "sha256":
            digest = await anyio.to_thread.run_sync(lambda: hashlib.sha256(body).digest())
            kwargs["ChecksumSHA256"] = base64.b64encode(digest).decode()
        response = await self._store.call(
            f"uploading part {number} of {self._key}",
            "upload_part",
            Bucket=self._store.options.bucket,
            Key=self._store.full_key(self._key),
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
            **kwargs,
        )
        if "ETag" not in response:
            raise StoreError(f"{self._store.describe()} answered part {number} of {self._key} without an ETag")
        entry: dict[str, Any] = {"PartNumber": number, "ETag": response["ETag"]}
        if "ChecksumSHA256" in kwargs:
            entry["ChecksumSHA256"] = response.get("ChecksumSHA256", kwargs["ChecksumSHA256"])
        self._completed[number] = entry
        if pooled and isinstance(body, bytearray):
            self._free.append(body)  # stored: every attempt is over, nothing reads it any more

    async def finish(self) -> None:
        if self._lent:
            raise RuntimeError("finish() with lent buffers not given back")
        if self._part is not None:
            part, self._part = self._part, None
            await self._submit(_shrunk(part, self._filled), pooled=False)
        elif self._next_part == 1:
            await self._submit(b"", pooled=False)  # an empty object is one empty part
        while self._inflight:
            await self._reap(asyncio.ALL_COMPLETED)
        self._free.clear()
        parts = [self._completed[n] for n in sorted(self._completed)]
        retried: list[int] = []
        try:
            await self._store.call(
                f"completing the upload of {self._key}",
                "complete_multipart_upload",
                work=self._result.size,
                retried=retried,
                Bucket=self._store.options.bucket,
                Key=self._store.full_key(self._key),
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )
        except NotFound:
            # An earlier attempt may have completed it and only the answer was lost: then the upload is
            # gone because it became the object. The key is this backup's own, so an object there of the
            # right size is this upload.
            if not retried or not await self._store.has_object(self._key, self._result.size):
                raise
            log.info("s3.complete_answer_lost", key=self._key, note="an earlier attempt completed the upload")
        self._completed_upload = True
        self._result.parts = _runs(self._sizes)
        self._result.checksum_algorithm = "SHA256" if self._store.options.checksums == "sha256" else None

    async def abort(self) -> None:
        for task in self._inflight:
            task.cancel()
        if self._inflight:
            await asyncio.wait(self._inflight)
        for task in self._inflight:
            _outcome(task)  # retrieved: the error that is being reported is the one that caused the abort
        self._inflight.clear()
        self._free.clear()
        if self._completed_upload:
            return
        await self._store.abort_upload(self._key, self._upload_id)


def _shrunk(part: bytearray, length: int) -> bytearray:
    """The last part cut to its length: in place (a large buffer gives its tail back to the system), or as a
    copy when a finished request still holds a view of it, which forbids resizing."""
    try:
        del part[length:]
    except BufferError:
        return bytearray(memoryview(part)[:length])
    return part


def _outcome(task: asyncio.Task[None]) -> BaseException | None:
    """A finished task's error, retrieved (so asyncio never reports it as lost); None if it succeeded."""
    if task.cancelled():
        return None
    return task.exception()


def _runs(sizes: list[int]) -> list[PartRun]:
    runs: list[PartRun] = []
    for size in sizes:
        if runs and runs[-1].size == size:
            runs[-1] = PartRun(size=size, count=runs[-1].count + 1)
        else:
            runs.append(PartRun(size=size, count=1))
    return runs
