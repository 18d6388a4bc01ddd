"""Validation levels: how sure we are that a backup will restore, at a known cost.

``quick``  the manifest parses and the object agrees with it: present, the right size, the right header.
``full``   every byte: SHA-256 of the object, every frame's authentication tag, decompression to the end
           (with the codec's own content checksum) and the dump's size, and ``pg_restore --list`` reading the
           archive's table of
           contents. The plaintext only ever flows through memory and a pipe; nothing is written to disk.
The globals object (``globals.py``), when a backup has one, gets the same checks at each level, and at
``full`` is read as a restore would read it. A physical base backup gets the same object checks, then its
own (``physical_verify``): its tar read whole instead of ``pg_restore --list``, and the WAL it needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from kybdr_agent.asyncutil import TailBuffer, task_group
from kybdr_agent.backup.decode import data_key_for, stream_backup
from kybdr_agent.backup.globals import check_globals_object, verify_globals
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.pgdump import child_process, drain_into, failure_message
from kybdr_agent.backup.physical_verify import WalNotHere, validate_physical
from kybdr_agent.backup.streamfmt import HEADER_SIZE
from kybdr_agent.errors import DumpError, IntegrityError, KeyUnavailable
from kybdr_agent.postgres.connection import Connection
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.wal.archive import WalArchive

Level = Literal["quick", "full"]


@dataclass
class ValidationResult:
    backup_id: str
    level: Level
    ok: bool
    checks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    toc_entries: int | None = None
    error: str | None = None
    corrupt: bool = False  # True only when the backup itself failed a check (not a missing key or tool)
    region: str = "primary"  # the repository it was read from (backup.regions)
    notices: list[str] = field(default_factory=list)  # e.g. that the primary could not be read
    wal: dict[str, Any] | None = None  # a physical backup's WAL at full level: how far recovery reaches


async def validate_backup(
    backup: Manifest,
    *,
    store: BlobStore,
    keyring: KeyRing | None,
    connection: Connection,
    level: Level,
    wal_archive: Callable[[Manifest], WalArchive] | None = None,
) -> ValidationResult:
    """Never raises for a backup that fails validation: the failure is the result. Store errors do raise.

    ``wal_archive`` gives a physical backup's cluster's WAL archive; None where the repository holds none (the
    DR region's): its tar is checked, and the validation fails without a verdict on the backup."""
    started = time.monotonic()
    result = ValidationResult(backup_id=backup.id, level=level, ok=False)
    try:
        await _quick(backup, store, result)
        if backup.kind == "physical":
            await _physical(backup, store, keyring, wal_archive, result)
        elif level == "full":
            await _full(backup, store, keyring, connection, result)
        result.ok = True
    except IntegrityError as exc:
        result.error = str(exc)
        result.corrupt = True
    except (KeyUnavailable, DumpError, WalNotHere) as exc:
        # The check could not be done (no key, no usable pg_restore): a failure, but no verdict on the
        # backup, so retention must not treat it as invalid.
        result.error = str(exc)
    result.seconds = round(time.monotonic() - started, 3)
    return result


async def _physical(
    backup: Manifest,
    store: BlobStore,
    keyring: KeyRing | None,
    wal_archive: Callable[[Manifest], WalArchive] | None,
    result: ValidationResult,
) -> None:
    result.wal = await validate_physical(
        backup,
        store=store,
        keyring=keyring,
        archive=wal_archive(backup) if wal_archive is not None else None,
        full=result.level == "full",
        checks=result.checks,
        notices=result.notices,
    )


async def _quick(backup: Manifest, store: BlobStore, result: ValidationResult) -> None:
    info = await store.stat(backup.object_key)
    if info is None:
        raise IntegrityError(f"backup {backup.id}: data object {backup.object_key} is missing")
    if info.size != backup.stored_bytes:
        raise IntegrityError(
            f"backup {backup.id}: data object has {info.size} bytes, manifest says {backup.stored_bytes}"
        )
    result.checks.append("object present with the manifest's size")
    head = b""
    async for chunk in store.read(backup.object_key, chunk_size=HEADER_SIZE):
        head += chunk
        if len(head) >= HEADER_SIZE:
            break
    if head[:HEADER_SIZE].hex() != backup.stream_header:
        raise IntegrityError(f"backup {backup.id}: stream header differs from the manifest's")
    result.checks.append("stream header matches the manifest")
    if checked := await check_globals_object(backup, store):
        result.checks.append(checked)


async def _full(
    backup: Manifest,
    store: BlobStore,
    keyring: KeyRing | None,
    connection: Connection,
    result: ValidationResult,
) -> None:
    await data_key_for(backup, keyring)  # fail fast on a missing or wrong key, before reading gigabytes
    pg_restore = connection.binary("pg_restore", _server_major(backup))
    stderr = TailBuffer()
    toc_lines = 0
    async with child_process(
        [pg_restore, "--list"],
        env=connection.child_env("postgres"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout
        listening = True

        async def count_toc() -> None:
            nonlocal toc_lines
            while line := await stdout.readline():
                if line.strip() and not line.startswith(b";"):
                    toc_lines += 1

        async def feed(data: bytes) -> None:
            # pg_restore --list stops reading once it has the table of contents; the rest of the stream
            # is still decoded and verified, just no longer handed to it.
            nonlocal listening
            if not listening:
                return
            stdin.write(data)
            try:
                await stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                listening = False

        async with task_group() as tg:
            tg.start_soon(drain_into, proc.stderr, stderr)
            tg.start_soon(count_toc)
            await stream_backup(lambda: store.read(backup.object_key), backup, keyring, feed)
            if listening:
                stdin.close()
            returncode = await proc.wait()
    result.checks.append("SHA-256 of the object, every frame's tag, and the decompressed size verified")
    if returncode != 0:
        raise DumpError(failure_message("pg_restore --list", returncode, stderr))
    if toc_lines == 0:
        raise IntegrityError(f"backup {backup.id}: pg_restore --list found no table of contents entries")
    result.toc_entries = toc_lines
    result.checks.append(f"pg_restore --list read the archive ({toc_lines} entries)")
    if checked := await verify_globals(backup, store, keyring):
        result.checks.append(checked)


def _server_major(backup: Manifest) -> int | None:
    head = backup.server_version.split(".")[0].split()[0]
    return int(head) if head.isdigit() else None
