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
    async def write(self, data: bytes) -> None:
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
