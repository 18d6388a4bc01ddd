"""Sample manifests for tests that need a catalog of backups but no data behind them: one factory, so that
a field the manifest gains is added in one place (tests/unit/test_manifest.py's ``manifest_fields`` is the
full, every-field one for the manifest's own tests)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from kybdr_agent.backup.manifest import Encryption, Manifest

AT = datetime(2026, 11, 24, 21, 52, 26, tzinfo=UTC)


def sample_manifest(
    backup_id: str,
    *,
    database: str = "app",
    at: datetime = AT,
    encryption: Encryption | None = None,
    storage: Literal["file", "s3"] = "file",
    **more: Any,
) -> Manifest:
    """A 10-byte, one-frame backup of ``database`` finished ``at``, unencrypted unless ``encryption`` says;
    ``more`` sets any other field (``replication``, …)."""
    return Manifest(
        id=backup_id,
        database=database,
        agent_version="0.1.0",
        server_version="15.8",
        pg_dump_version="15.8",
        started_at=at,
        finished_at=at,
        duration_seconds=1.0,
        dump_bytes=10,
        compressed_bytes=10,
        stored_bytes=10,
        sha256="a" * 64,
        compression="zstd",
        frame_size=1 << 20,
        frames=1,
        stream_header="00" * 39,
        encryption=encryption or Encryption(cipher="none"),
        storage=storage,
        object_key=f"backups/{database}/{backup_id}/data",
        **more,
    )
