"""Listing backups across regions: which repository the list comes from, and where each backup lives.

Without a region the primary's catalog is the list, and backups only the DR bucket still holds are added;
if the primary cannot be read the DR region's catalog is the list, and a notice says so. Every configured
region is reported as reachable or not, so a partial answer never looks whole. Where a backup lives comes
from listing manifest keys (``regions.manifest_ids``), not from its replication record.
"""

from __future__ import annotations

from typing import Any

from kybdr_agent.backup import catalog
from kybdr_agent.backup.catalog import manifest_document
from kybdr_agent.backup.manifest import manifest_key_path
from kybdr_agent.backup.regions import Region, RegionStores, locations, manifest_ids
from kybdr_agent.errors import StoreError


async def show_backup(regions: RegionStores, backup_id: str, region: Region | None = None) -> dict[str, Any]:
    """One backup's manifest document, with the regions that hold it and how it was found."""
    found = await regions.locate(backup_id, region)
    held: dict[Region, set[str]] = {found.region: {found.manifest.id}}
    for other in regions.configured():
        if other == found.region:
            continue
        try:
            info = await regions.store(other).stat(manifest_key_path(found.manifest.database, backup_id))
        except StoreError:
            continue  # unknown: not listed as a location
        if info is not None:
            held[other] = {backup_id}
    document = {**manifest_document(found.manifest), "locations": locations(backup_id, held)}
    if found.note:
        document["notices"] = [found.note]
    return document


async def list_backups(
    regions: RegionStores, database: str | None = None, region: Region | None = None
) -> dict[str, Any]:
    """The backups (of ``database``) with where each lives, read from ``region`` or, with none, from both.

    Without a region the primary's catalog is the list, and backups only the DR bucket still holds are
    added; if the primary cannot be read the DR region's catalog is the list, and a notice says so. Every
    configured region is reported as reachable or not, so a partial answer never looks whole."""
    configured = regions.configured()
    sources: tuple[Region, ...] = (region,) if region is not None else configured
    regions.store(sources[0])  # a clear error for --region dr without a DR bucket
    status: dict[str, dict[str, Any]] = {}
    held: dict[Region, set[str]] = {}
    listed: tuple[Region, catalog.Catalog] | None = None
    for name in configured:
        store = regions.store(name)
        try:
            if listed is None and name in sources:
                listed = (name, await catalog.read_catalog(store, database))
            held[name] = await manifest_ids(store)
            status[name] = {"location": store.describe(), "reachable": True}
        except StoreError as exc:
            if listed is not None and listed[0] == name:
                listed = None
            status[name] = {"location": store.describe(), "reachable": False, "error": str(exc)}
    if listed is None:
        raise StoreError("; ".join(str(status[name]["error"]) for name in sources))
    source, found = listed
    notices: list[str] = []
    if region is None and source != "primary":
        notices.append(
            f"the primary repository could not be read ({status['primary']['error']}); listing the DR region's copies"
        )
    backups = list(found.backups)
    unreadable = list(found.unreadable)
    others = [name for name in configured if region is None and name != source and name in held]
    for other in others:  # backups only another region still holds
        extra = held[other] - {m.id for m in backups}
        if extra:
            more = await catalog.read_catalog(regions.store(other), database)
            backups += [m for m in more.backups if m.id in extra]
            unreadable += more.unreadable
    backups.sort(key=lambda m: (m.finished_at, m.id))
    return {
        "backups": [{**manifest_document(m), "locations": locations(m.id, held)} for m in backups],
        "unreadable": [{"key": key, "problem": problem} for key, problem in unreadable],
        "regions": status,
        "notices": notices,
    }
