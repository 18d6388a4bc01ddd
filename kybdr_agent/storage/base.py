"""The contract every repository backend meets. The backup and restore paths see only this protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from kybdr_agent.storage.parts import PartRun


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime


@dataclass(frozen=True, slots=True)
class IncompleteUpload:
    """A multipart upload that was started and neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: datetime


@dataclass(slots=True)
class UploadResult:
    size: int = 0
    parts: list[PartRun] = field(default_factory=list)
    checksum_algorithm: str | None = None


class BlobWriter(Protocol):
    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes; may wait (backpressure) while earlier bytes are still being stored."""


class BlobStore(Protocol):
    """A repository: keys are '/'-separated relative paths, validated by the caller."""

    kind: str

    def describe(self) -> str:
        """Where this store points, for messages (never credentials)."""

    def open_upload(
        self, key: str, *, size_hint: int | None, result: UploadResult
    ) -> AbstractAsyncContextManager[BlobWriter]:
        """Stream an object in. It becomes visible only if the block exits cleanly; on any exception or
        cancellation nothing is left behind (temp file removed, multipart upload aborted)."""

    async def put_bytes(self, key: str, data: bytes) -> None:
        """Write a small object atomically (manifests)."""

    async def get_bytes(self, key: str, *, max_size: int) -> bytes:
        """Read a small object whole; refuse one larger than ``max_size``."""

    def read(self, key: str, *, start: int = 0, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Stream an object's bytes from ``start``; resumes after transient errors."""

    async def stat(self, key: str) -> ObjectInfo | None: ...

    def list_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]: ...

    async def delete(self, key: str) -> None: ...

    async def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create a small object only if no object exists at ``key`` (S3 ``If-None-Match: *``).

        Returns the new object's etag, or None when one already exists. The check and the write are one
        atomic step in the store, so of several writers racing for the same key exactly one wins: this is
        what the DR lease is built on."""

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace the object at ``key`` only if its etag is still ``etag`` (S3 ``If-Match``).

        Returns the new etag, or None when the object changed since ``etag`` was read or no longer
        exists (compare-and-swap: a writer that read a stale version never overwrites a newer one)."""

    async def get_with_etag(self, key: str, *, max_size: int) -> tuple[bytes, str] | None:
        """Read a small object whole with the etag a later ``put_if_match`` compares against; None when
        it does not exist. Refuses one larger than ``max_size``."""

    async def incomplete_uploads(self, prefix: str) -> list[IncompleteUpload]:
        """Uploads begun and never finished (open multipart uploads; temp files of a folder store)."""

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        """Discard one of them (AbortMultipartUpload; unlink the temp file)."""

    async def aclose(self) -> None: ...


class ReplicaStore(BlobStore, Protocol):
    """A store that can take a copy of another store's object without the bytes passing through this host
    (S3's server-side copy into the DR region's bucket). Only some stores can; the composition root builds
    one only where the configuration asks for cross-region copies, so no caller has to ask what it holds."""

    def location(self) -> dict[str, str]:
        """Where copies land, for the manifest's replication record (bucket, region)."""

    async def copy_from(self, source: BlobStore, key: str, size: int) -> None:
        """Copy ``key`` of ``source`` to the same key here."""
