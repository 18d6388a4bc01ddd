"""What backups a repository holds: its manifests, read and checked.

A manifest that does not parse is reported, never silently dropped and never listed as a good backup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from kybdr_agent.backup import manifest
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.errors import NotFound
from kybdr_agent.storage.base import BlobStore

MAX_MANIFEST_BYTES: Final = 4 << 20


@dataclass
class Catalog:
    backups: list[Manifest] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def _manifest_keys_prefix(database: str | None) -> str:
    if database is None:
        return f"{manifest.BACKUPS_PREFIX}/"
    return f"{manifest.BACKUPS_PREFIX}/{manifest.database_key(database)}/"


def _matches_location(found: Manifest, database_component: str, backup_id: str) -> bool:
    """A manifest names only its own data: a copied or edited one could otherwise point cleanup or a
    restore at another backup's object."""
    return (
        found.id == backup_id
        and manifest.database_key(found.database) == database_component
        and found.object_key == manifest.data_key_path(found.database, found.id)
    )


async def read_catalog(store: BlobStore, database: str | None = None) -> Catalog:
    catalog = Catalog()
    async for info in store.list_objects(_manifest_keys_prefix(database)):
        parts = info.key.split("/")
        if len(parts) != 4 or parts[3] != manifest.MANIFEST_NAME:
            continue
        if not manifest.BACKUP_ID_PATTERN.fullmatch(parts[2]):
            continue
        try:
            raw = await store.get_bytes(info.key, max_size=MAX_MANIFEST_BYTES)
            found = Manifest.from_json(raw)
        except NotFound:
            continue  # deleted between listing and reading
        except ValueError as exc:
            catalog.unreadable.append((info.key, str(exc)))
            continue
        if not _matches_location(found, parts[1], parts[2]):
            catalog.unreadable.append((info.key, "manifest does not match its location"))
            continue
        catalog.backups.append(found)
    catalog.backups.sort(key=lambda m: (m.finished_at, m.id))
    return catalog


async def find_backup(store: BlobStore, backup_id: str) -> Manifest:
    """The manifest of ``backup_id`` (validated first, so a hostile id never reaches a key)."""
    manifest.check_backup_id(backup_id)
    async for info in store.list_objects(f"{manifest.BACKUPS_PREFIX}/"):
        parts = info.key.split("/")
        if len(parts) == 4 and parts[2] == backup_id and parts[3] == manifest.MANIFEST_NAME:
            try:
                found = Manifest.from_json(await store.get_bytes(info.key, max_size=MAX_MANIFEST_BYTES))
            except ValueError as exc:
                raise NotFound(f"backup {backup_id} has an unreadable manifest: {exc}") from None
            if not _matches_location(found, parts[1], backup_id):
                raise NotFound(f"backup {backup_id}'s manifest does not match its location in the repository")
            return found
    raise NotFound(f"no backup with id {backup_id} in the repository")


def manifest_document(m: Manifest) -> dict[str, Any]:
    """A manifest as the API, the CLI's ``--json`` and job results show it: the one place that shape is made."""
    return {**m.model_dump(mode="json"), "part_count": m.part_count}
