"""One multipart upload in flight, for ``S3Store.open_upload``.

Kept apart from the store because it is the part with state: bytes buffered into parts, at most
``upload_concurrency`` part uploads running, their answers collected for the completing request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
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
    """One multipart upload in flight: buffers bytes into parts and keeps at most N part uploads running."""

    def __init__(self, store: S3Store, key: str, upload_id: str, base_part_size: int, result: UploadResult):
        self._store = store
        self._key = key
        self._upload_id = upload_id
        self._base = base_part_size
        self._result = result
        # The part being filled: allocated at its final size and filled in place, then handed to the request
        # as it is. Each byte is copied once (from the pipeline's batch into the part), and a part never
        # exists twice (no pending list joined into a second buffer).
        self._part: bytearray | None = None
        self._filled = 0
        self._next_part = 1
        self._inflight: set[asyncio.Task[None]] = set()
        self._completed: dict[int, dict[str, Any]] = {}
        self._sizes: list[int] = []
        self._completed_upload = False

    def _current_part_size(self) -> int:
        return part_size_for(
            min(self._next_part, self._store.options.max_parts), self._base, self._store.options.max_parts
        )

    async def write(self, data: bytes) -> None:
        self._result.size += len(data)
        view = memoryview(data)
        while view:
            if self._part is None:
                self._part = bytearray(self._current_part_size())
                self._filled = 0
            take = min(len(view), len(self._part) - self._filled)
            self._part[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == len(self._part):
                part, self._part = self._part, None
                await self._submit(part)

    async def _submit(self, part: bytearray) -> None:
        opts = self._store.options
        if self._next_part > opts.max_parts:
            raise StoreError(
                f"the dump outgrew {opts.max_parts} parts of up to {self._current_part_size()} bytes; "
                "raise repository.part_size_mib or repository.max_parts"
            )
        while len(self._inflight) >= opts.upload_concurrency:
            await self._reap(asyncio.FIRST_COMPLETED)
        number = self._next_part
        self._next_part += 1
        self._sizes.append(len(part))
        self._inflight.add(asyncio.create_task(self._upload_part(number, part)))

    async def _reap(self, when: str) -> None:
        done, _ = await asyncio.wait(self._inflight, return_when=when)
        self._inflight -= done
        # Every finished task's error is retrieved (two parts can fail together); the first one is raised.
        errors = [exc for task in done if (exc := _outcome(task)) is not None]
        if errors:
            raise errors[0]

    async def _upload_part(self, number: int, body: bytearray) -> None:
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

    async def finish(self) -> None:
        if self._part is not None or self._next_part == 1:
            part = self._part if self._part is not None else bytearray()
            del part[self._filled :]  # the last part is as long as what it holds
            self._part = None
            await self._submit(part)
        while self._inflight:
            await self._reap(asyncio.ALL_COMPLETED)
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
        if self._completed_upload:
            return
        await self._store.abort_upload(self._key, self._upload_id)


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
