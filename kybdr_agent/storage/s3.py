"""An S3 (or S3-compatible) repository on aiobotocore.

Uploads are multipart with bounded concurrency from a pool of part buffers, so memory is at most
(concurrency + 1) × part size whatever the dump's size. Each part carries its own SHA-256 where the store
supports additional checksums; ``checksums = "when_required"`` sends none beyond what the API demands, for
compatible stores that reject botocore's default CRCs. Retries, backoff and the stall deadline are ours
(botocore's own retries are off, so the two never multiply): a request is cut only when no byte moved for
``request_timeout`` seconds — bodies go out through ``s3_body``, which reports each chunk the socket
takes, and answers are timed per read by aiohttp — never because a big part on a slow link takes long.
Any failure or cancellation aborts the multipart upload, shielded and time-bounded, so no orphaned parts
accrue storage charges; a lost answer to a create, complete or abort is recognised rather than left behind.
Every failure leaves this module as a ``StoreError`` (or ``NotFound``) with a one-line reason. This module
is the store and its retry classification; a multipart upload in flight is ``s3_upload``'s.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import aiohttp
import anyio
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

from kybdr_agent.errors import NotFound, StoreError
from kybdr_agent.storage.base import BlobStore, BlobWriter, IncompleteUpload, ObjectInfo, UploadResult
from kybdr_agent.storage.parts import S3_MAX_PARTS, initial_part_size
from kybdr_agent.storage.retry import AttemptTimeout, RetryPolicy, call_with_retries
from kybdr_agent.storage.s3_body import watch_request
from kybdr_agent.storage.s3_session import drop_documentation, s3_session
from kybdr_agent.storage.s3_upload import MultipartUpload
from kybdr_agent.telemetry import get_logger

ABORT_DEADLINE: Final = 60.0
_NOT_FOUND_CODES: Final = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchUpload"})
_SWEEP_NOTE: Final = "the next sweep (the agent's next housekeeping tick, or the next kybdr-agent command) aborts it"
_CONDITION_FAILED_CODES: Final = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})
_COPY_SINGLE_LIMIT: Final = 5 << 30
_COPY_PART: Final = 1 << 30
log = get_logger("kybdr_agent.s3")
_JITTER: Final = random.Random()  # noqa: S311 - backoff jitter needs no cryptographic randomness
_RETRYABLE_CODES: Final = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "503",
        "500",
        "502",
        "504",
    }
)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in _RETRYABLE_CODES or status >= 500 or status == 429
    return isinstance(exc, BotoCoreError | aiohttp.ClientError | OSError | AttemptTimeout)


def _describe(exc: BaseException, options: S3Options) -> str:
    """One line an operator can act on; timeouts say what did not move, and for how long."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": ")
    if isinstance(exc, AttemptTimeout):
        return str(exc)
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return f"no bytes moved for {options.request_timeout:g} s (awaiting the answer)"
    if isinstance(exc, ConnectTimeoutError):
        return f"could not connect within {options.connect_timeout:g} s"
    if isinstance(exc, BotoCoreError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


@dataclass(frozen=True, slots=True)
class S3Options:
    bucket: str
    prefix: str
    region: str | None = None
    endpoint_url: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    checksums: Literal["sha256", "when_required"] = "sha256"
    part_size: int | None = None
    min_part_size: int = 8 << 20
    max_parts: int = S3_MAX_PARTS
    upload_concurrency: int = 2
    connect_timeout: float = 10.0
    request_timeout: float = 120.0  # seconds without a byte moving, either way, before an attempt is cut
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Told the S3 API operation (``put_object``, ``upload_part`` …) of every retried attempt: the
    # ``kybdr_storage_retries_total{operation}`` counter, without the store knowing of metrics.
    on_retry: Callable[[str], None] | None = field(default=None, compare=False)


class S3Store:
    kind = "s3"

    def __init__(self, options: S3Options) -> None:
        self.options = options
        self._exit = AsyncExitStack()
        self._client: Any = None

    @classmethod
    async def open(cls, options: S3Options) -> S3Store:
        store = cls(options)
        config = AioConfig(
            connect_timeout=options.connect_timeout,
            read_timeout=options.request_timeout,
            retries={"total_max_attempts": 1},
            # With a SHA-256 checksum on every part (and on every small object) S3 verifies each body
            # itself, and the signature covers that checksum header; signing the payload too would hash
            # every part a second time, on the event loop, in botocore's signer (it always does over plain
            # HTTP). Without our checksums botocore keeps its default (signed payloads over HTTP).
            s3={
                "addressing_style": options.addressing_style,
                **({"payload_signing_enabled": False} if options.checksums == "sha256" else {}),
            },
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=max(10, options.upload_concurrency * 2),
        )
        store._client = await store._exit.enter_async_context(
            s3_session().create_client(
                "s3", region_name=options.region, endpoint_url=options.endpoint_url, config=config
            )
        )
        drop_documentation(store._client)
        store._client.meta.events.register("before-send.s3", watch_request)
        return store

    def describe(self) -> str:
        where = f"s3://{self.options.bucket}/{self.options.prefix}".rstrip("/")
        return f"{where} at {self.options.endpoint_url}" if self.options.endpoint_url else where

    def full_key(self, key: str) -> str:
        return f"{self.options.prefix}/{key}" if self.options.prefix else key

    async def call(
        self, what: str, method: str, *, work: int | None = None, retried: list[int] | None = None, **kwargs: Any
    ) -> Any:
        """One S3 operation with our retries, as a ``StoreError`` (``NotFound``) when it fails for good.

        ``work`` is the bytes the attempt's total cap is sized for (default: the body's); ``retried``, when
        given, collects the numbers of the attempts that failed and were retried.
        """
        operation = getattr(self._client, method)
        body = kwargs.get("Body")
        size = work if work is not None else len(body) if isinstance(body, bytes | bytearray) else 0
        failed = retried if retried is not None else []
        policy = self.options.retry

        def on_retry(attempt: int, error: BaseException, delay: float) -> None:
            failed.append(attempt)
            if self.options.on_retry is not None:
                self.options.on_retry(method)
            log.info(
                "s3.retry",
                operation=what,
                attempt=attempt,
                attempts=policy.attempts,
                reason=_describe(error, self.options),
                backoff_seconds=round(delay, 3),
            )

        try:
            return await call_with_retries(
                lambda: operation(**kwargs), policy=policy, retryable=is_retryable, size=size, on_retry=on_retry
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND_CODES:
                raise NotFound(f"{what}: not found in {self.describe()}") from exc
            raise StoreError(self._failure(what, exc, len(failed) + 1)) from exc
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise StoreError(self._failure(what, exc, len(failed) + 1)) from exc

    def _failure(self, what: str, exc: BaseException, tries: int) -> str:
        after = f" after {tries} attempts" if tries > 1 else ""
        return f"{what} in {self.describe()} failed{after}: {_describe(exc, self.options)}"

    async def has_object(self, key: str, size: int) -> bool:
        info = await self.stat(key)
        return info is not None and info.size == size

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort one multipart upload. One already gone counts as aborted: an earlier attempt may have
        aborted it and only its answer was lost."""
        with contextlib.suppress(NotFound):
            await self.call(
                f"aborting the upload of {key}",
                "abort_multipart_upload",
                Bucket=self.options.bucket,
                Key=self.full_key(key),
                UploadId=upload_id,
            )

    async def _create_upload(self, key: str, **extra: Any) -> str:
        """Start a multipart upload. When an attempt's answer was lost, the store may hold an upload we
        never learned the id of: the key is ours alone, so any other open upload on it is aborted."""
        retried: list[int] = []
        created = await self.call(
            f"starting the upload of {key}",
            "create_multipart_upload",
            retried=retried,
            Bucket=self.options.bucket,
            Key=self.full_key(key),
            **extra,
        )
        upload_id = str(created["UploadId"])
        if retried:
            try:
                for stray in await self.incomplete_uploads(key):
                    if stray.key == key and stray.upload_id != upload_id:
                        await self.abort_upload(key, stray.upload_id)
            except StoreError as exc:
                log.warning("s3.abort_failed", key=key, error=str(exc), note=_SWEEP_NOTE)
        return upload_id

    @asynccontextmanager
    async def open_upload(self, key: str, *, size_hint: int | None, result: UploadResult) -> AsyncIterator[BlobWriter]:
        opts = self.options
        base = opts.part_size or initial_part_size(size_hint, opts.max_parts, opts.min_part_size)
        extra: dict[str, Any] = {"ChecksumAlgorithm": "SHA256"} if opts.checksums == "sha256" else {}
        upload = MultipartUpload(self, key, await self._create_upload(key, **extra), base, result)
        try:
            yield upload
            await upload.finish()
        except BaseException:
            with anyio.move_on_after(ABORT_DEADLINE, shield=True) as scope:
                try:
                    await upload.abort()
                except Exception as exc:  # noqa: BLE001 - the original error is the one to report
                    log.warning("s3.abort_failed", key=key, error=str(exc), note=_SWEEP_NOTE)
            if scope.cancelled_caught:
                log.warning("s3.abort_failed", key=key, error=f"not done within {ABORT_DEADLINE:g} s", note=_SWEEP_NOTE)
            raise

    def location(self) -> dict[str, str]:
        return {"bucket": self.options.bucket, "region": self.options.region or ""}

    async def copy_from(self, source: BlobStore, key: str, size: int) -> None:
        """Server-side copy of ``key`` from another bucket (a DR region's) to the same key here.

        Objects up to 5 GiB are one CopyObject; larger ones a multipart copy in 1 GiB ranges, aborted on
        any failure like an upload. No byte passes through this host.
        """
        if not isinstance(source, S3Store):
            raise StoreError(f"a server-side copy into {self.describe()} needs an S3 source, not {source.describe()}")
        src = {"Bucket": source.options.bucket, "Key": source.full_key(key)}
        dest: dict[str, Any] = {"Bucket": self.options.bucket, "Key": self.full_key(key)}
        if size <= _COPY_SINGLE_LIMIT:
            await self.call(f"copying {key} to {self.describe()}", "copy_object", work=size, CopySource=src, **dest)
            return
        upload_id = await self._create_upload(key)
        try:
            parts = []
            for number, start in enumerate(range(0, size, _COPY_PART), start=1):
                end = min(start + _COPY_PART, size) - 1
                answer = await self.call(
                    f"copying part {number} of {key}",
                    "upload_part_copy",
                    work=end + 1 - start,
                    CopySource=src,
                    CopySourceRange=f"bytes={start}-{end}",
                    UploadId=upload_id,
                    PartNumber=number,
                    **dest,
                )
                parts.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})
            await self.call(
                f"completing the copy of {key}",
                "complete_multipart_upload",
                work=size,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **dest,
            )
        except BaseException:
            with anyio.move_on_after(ABORT_DEADLINE, shield=True):
                try:
                    await self.abort_upload(key, upload_id)
                except Exception as exc:  # noqa: BLE001 - the original error is the one to report
                    log.warning("s3.abort_failed", key=key, error=str(exc), note=_SWEEP_NOTE)
            raise

    async def put_bytes(self, key: str, data: bytes) -> None:
        extra: dict[str, Any] = {}
        if self.options.checksums == "sha256":
            extra["ChecksumSHA256"] = base64.b64encode(hashlib.sha256(data).digest()).decode()
        await self.call(
            f"writing {key}",
            "put_object",
            Bucket=self.options.bucket,
            Key=self.full_key(key),
            Body=data,
            **extra,
        )

    async def _conditional_put(self, what: str, key: str, data: bytes, **condition: str) -> str | None:
        """PutObject with a precondition: the new etag, or None when the precondition does not hold.

        412 PreconditionFailed (the object exists / changed) and 409 ConditionalRequestConflict (another
        conditional write to the key is in flight; AWS suggests retrying, but for a lease the loser of a
        race simply loses this round) are answers, not failures; a missing object under ``If-Match``
        (404) is a mismatch too. Other failures are retried as every call is. One retry case needs care:
        when an attempt's answer was lost after the store applied it, the retry fails its own
        precondition (the object is now ours). Such a retry may happen below us too (aiohttp resends an
        idempotent PUT once when a kept-alive connection drops), so every precondition failure reads the
        object back: content identical to ours means the write was ours (a lease body names its holder,
        host, pid and times, so nobody else writes the same bytes).
        """
        extra: dict[str, Any] = dict(condition)
        if self.options.checksums == "sha256":
            extra["ChecksumSHA256"] = base64.b64encode(hashlib.sha256(data).digest()).decode()
        try:
            answer = await self.call(
                what,
                "put_object",
                Bucket=self.options.bucket,
                Key=self.full_key(key),
                Body=data,
                **extra,
            )
        except NotFound:
            return None
        except StoreError as exc:
            cause = exc.__cause__
            if not isinstance(cause, ClientError):
                raise
            code = str(cause.response.get("Error", {}).get("Code", ""))
            status = str(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code not in _CONDITION_FAILED_CODES and status not in _CONDITION_FAILED_CODES:
                raise
            try:  # bounded by our own size: a larger object is not ours
                current = await self.get_with_etag(key, max_size=len(data))
            except StoreError as read_error:
                log.info("s3.conditional_put_not_ours", key=key, reason=str(read_error))
                return None
            if current is not None and current[0] == data:
                log.info("s3.conditional_put_was_ours", key=key, note="an earlier attempt's answer was lost")
                return current[1]
            return None
        return str(answer["ETag"])

    async def put_if_absent(self, key: str, data: bytes) -> str | None:
        """PutObject with ``If-None-Match: *`` (AWS S3 since August 2024; moto 5 honours it)."""
        return await self._conditional_put(f"creating {key} if absent", key, data, IfNoneMatch="*")

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """PutObject with ``If-Match: etag`` (AWS S3 since November 2024; moto 5.2.5 honours it on
        PutObject: 412 on a mismatch, 404 when the object is gone). A store that ignores the header would
        make this an unconditional overwrite, so it is only for stores known to support it; the DR lease
        says in its docs which ones those are."""
        return await self._conditional_put(f"replacing {key} if unchanged", key, data, IfMatch=etag)

    async def get_with_etag(self, key: str, *, max_size: int) -> tuple[bytes, str] | None:
        """One GetObject read whole, with its ETag. Not resumed with ranged reads like ``read``: a resumed
        range could come from a newer version than the etag names; a failed body read repeats the GET."""
        policy = self.options.retry
        failures = 0
        while True:
            try:
                response = await self.call(
                    f"reading {key}", "get_object", Bucket=self.options.bucket, Key=self.full_key(key)
                )
            except NotFound:
                return None
            body = response["Body"]
            chunks: list[bytes] = []
            total = 0
            try:
                while True:
                    with anyio.fail_after(self.options.request_timeout):
                        chunk = await body.read(1 << 16)
                    if not chunk:
                        return b"".join(chunks), str(response["ETag"])
                    total += len(chunk)
                    if total > max_size:
                        raise StoreError(f"{key} in {self.describe()} is larger than {max_size} bytes")
                    chunks.append(chunk)
            except (TimeoutError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
                failures += 1
                if failures >= policy.attempts:
                    raise StoreError(self._failure(f"reading {key}", exc, failures)) from exc
                await anyio.sleep(policy.delay(failures, _JITTER))
            finally:
                body.close()

    async def get_bytes(self, key: str, *, max_size: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        async for chunk in self.read(key):
            total += len(chunk)
            if total > max_size:
                raise StoreError(f"{key} is larger than {max_size} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read(self, key: str, *, start: int = 0, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Stream with ranged GETs, resuming at the last byte received when a read fails or stalls.

        Each read waits at most ``request_timeout`` for *some* bytes (a read returns what has arrived, up
        to ``chunk_size``), so a slow but steady stream is never cut; failures in a row are bounded by the
        retry policy and every resume is logged.
        """
        offset = start
        failures = 0
        policy = self.options.retry
        while True:
            extra: dict[str, Any] = {"Range": f"bytes={offset}-"} if offset else {}
            response = await self.call(
                f"reading {key}", "get_object", Bucket=self.options.bucket, Key=self.full_key(key), **extra
            )
            body = response["Body"]
            try:
                while True:
                    with anyio.fail_after(self.options.request_timeout):
                        chunk = await body.read(chunk_size)
                    if not chunk:
                        return
                    offset += len(chunk)
                    failures = 0
                    yield chunk
            except (TimeoutError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
                failures += 1
                reason = _describe(exc, self.options)
                if failures >= policy.attempts:
                    raise StoreError(
                        f"reading {key} from {self.describe()} failed at byte {offset} after {failures} attempts: "
                        f"{reason}"
                    ) from exc
                delay = policy.delay(failures, _JITTER)
                if self.options.on_retry is not None:
                    self.options.on_retry("get_object")
                log.info(
                    "s3.retry",
                    operation=f"reading {key} from byte {offset}",
                    attempt=failures,
                    attempts=policy.attempts,
                    reason=reason,
                    backoff_seconds=round(delay, 3),
                )
                await anyio.sleep(delay)
            finally:
                body.close()

    async def stat(self, key: str) -> ObjectInfo | None:
        try:
            head = await self.call(
                f"looking up {key}", "head_object", Bucket=self.options.bucket, Key=self.full_key(key)
            )
        except NotFound:
            return None
        return ObjectInfo(key=key, size=int(head["ContentLength"]), modified=head["LastModified"])

    async def list_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        token: str | None = None
        strip = len(self.full_key(""))
        while True:
            extra: dict[str, Any] = {"ContinuationToken": token} if token else {}
            page = await self.call(
                f"listing {prefix or '/'}",
                "list_objects_v2",
                Bucket=self.options.bucket,
                Prefix=self.full_key(prefix),
                **extra,
            )
            for item in page.get("Contents", []):
                yield ObjectInfo(key=item["Key"][strip:], size=int(item["Size"]), modified=item["LastModified"])
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    async def delete(self, key: str) -> None:
        await self.call(f"deleting {key}", "delete_object", Bucket=self.options.bucket, Key=self.full_key(key))

    async def incomplete_uploads(self, prefix: str) -> list[IncompleteUpload]:
        found: list[IncompleteUpload] = []
        strip = len(self.full_key(""))
        markers: dict[str, Any] = {}
        while True:
            page = await self.call(
                "listing open multipart uploads",
                "list_multipart_uploads",
                Bucket=self.options.bucket,
                Prefix=self.full_key(prefix),
                **markers,
            )
            for item in page.get("Uploads", []):
                initiated: datetime = item["Initiated"]
                found.append(IncompleteUpload(item["Key"][strip:], item["UploadId"], initiated))
            if not page.get("IsTruncated"):
                return found
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        await self.abort_upload(upload.key, upload.upload_id)

    async def aclose(self) -> None:
        await self._exit.aclose()
