"""Composition: from validated settings to the concrete adapters. The only place that picks implementations."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from kybdr_agent import secret_files
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.pipeline import BackupOptions
from kybdr_agent.backup.streamfmt import Compression
from kybdr_agent.config import AgentSettings, RepositorySettings
from kybdr_agent.errors import ConfigError
from kybdr_agent.pathutil import NothingExists, nearest_existing
from kybdr_agent.postgres.connection import Connection
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.storage.local import LocalStore
from kybdr_agent.storage.parts import MIB
from kybdr_agent.storage.retry import RetryPolicy

if TYPE_CHECKING:
    from kybdr_agent.storage.s3 import S3Store


@asynccontextmanager
async def open_cross_region_store(settings: AgentSettings) -> AsyncIterator[S3Store]:
    """The DR bucket: same prefix, endpoint and transfer settings as the repository, its own bucket/region."""
    from kybdr_agent.storage.s3 import S3Store

    backup = settings.backup
    if not backup.cross_region_bucket or settings.repository.scheme != "s3":
        raise ConfigError("cross-region copies need backup.cross_region_bucket and an s3:// repository")
    repo = settings.repository.model_copy(
        update={
            "url": f"s3://{backup.cross_region_bucket}/{settings.repository.prefix}".rstrip("/"),
            "region": backup.cross_region_region or settings.repository.region,
        }
    )
    async with open_store(repo) as store:
        assert isinstance(store, S3Store)
        yield store


@asynccontextmanager
async def open_store(repo: RepositorySettings) -> AsyncIterator[BlobStore]:
    store: BlobStore
    if repo.scheme == "file":
        store = LocalStore(repo.local_path)
    else:
        # Imported here: aiobotocore costs ~0.2 s and ~30 MiB, which a folder repository never needs.
        from kybdr_agent.storage.s3 import S3Options, S3Store

        store = await S3Store.open(
            S3Options(
                bucket=repo.bucket,
                prefix=repo.prefix,
                region=repo.region,
                endpoint_url=repo.endpoint_url,
                addressing_style=repo.addressing_style,
                checksums=repo.checksums,
                part_size=repo.part_size_mib * MIB or None,
                min_part_size=repo.min_part_size_mib * MIB,
                max_parts=repo.max_parts,
                upload_concurrency=repo.upload_concurrency,
                connect_timeout=repo.connect_timeout_seconds,
                request_timeout=repo.request_timeout_seconds,
                retry=RetryPolicy(attempts=repo.max_attempts, attempt_deadline=repo.request_timeout_seconds),
            )
        )
    try:
        yield store
    finally:
        await store.aclose()


def keyring(settings: AgentSettings) -> KeyRing | None:
    """The configured key ring, or None when no key file is set (unencrypted backups only).

    Every key file is checked as ``config check`` and ``run`` check it (``secret_files``: regular file,
    trusted owner, mode 0600/0640, 32 bytes), so a one-shot command refuses exactly what the agent would.
    """
    return secret_files.load_keyring(settings)


def check_state_dir(settings: AgentSettings) -> None:
    """``backup.backup_dir`` is (or can become) a directory this user may write: checked by ``run`` before
    it says it is ready, since the journal of every job and the scheduler's state go there. Nothing is
    created here; the directory that exists (it, or the nearest parent) is what must be writable."""
    wanted = settings.backup.backup_dir
    try:
        probe, info = nearest_existing(wanted)
    except NothingExists:
        raise ConfigError(f"backup.backup_dir {wanted}: no directory of it exists") from None
    except OSError as exc:
        raise ConfigError(f"backup.backup_dir {wanted}: cannot inspect {exc.filename}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"backup.backup_dir {wanted}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"backup.backup_dir {wanted}: {probe} is not writable by this user")


def connection(settings: AgentSettings) -> Connection:
    """How to reach the database; ``database.password_file`` is checked like every secret file first."""
    db = settings.database
    secret_files.check_password_files(settings, drill=False)
    return Connection.from_settings(db.dsn, db.password_file, db.pg_bin_dir, db.connect_timeout_seconds)


def backup_options(settings: AgentSettings, *, description: str | None = None) -> BackupOptions:
    comp = settings.compression
    kind = Compression[comp.algorithm.upper()] if settings.backup.compression else Compression.NONE
    return BackupOptions(
        compression=kind,
        compression_level=comp.level,
        compression_threads=comp.threads,
        keyring=keyring(settings) if settings.backup.encryption else None,
        frame_size=settings.encryption.frame_size_kib * 1024,
        description=description,
    )
