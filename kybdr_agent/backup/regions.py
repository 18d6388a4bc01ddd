"""Which repository a read goes to: the primary region's, the DR region's copy, or the first that answers.

A restore is wanted most when the primary region is having its worst day, so a read that names no region
tries the primary repository and, when that fails for any reason but "no such backup" (a closed port, a
region's 503s, a bucket gone), reads the DR region's copy instead, and says so: the result carries the
region it came from and a notice the CLI prints. A backup the primary does not hold (retention there ran,
the copy outlived it) is also looked for in the DR bucket. Every object is verified against its manifest
as it streams, so a copy is trusted exactly as much as the original.

What is where is told by listing both repositories' manifest keys (``locations``), not by the replication
record alone: the record says a copy was made, the listing says it is still there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, get_args

from kybdr_agent.backup import catalog
from kybdr_agent.backup.manifest import BACKUP_ID_PATTERN, BACKUPS_PREFIX, MANIFEST_NAME, Manifest
from kybdr_agent.errors import ConfigError, NotFound, StoreError
from kybdr_agent.storage.base import BlobStore

Region = Literal["primary", "dr"]
REGIONS: Final[tuple[Region, ...]] = get_args(Region)


@dataclass(frozen=True)
class Located:
    """A backup found, the store holding it, the region that is, and why it is not the primary (if not)."""

    manifest: Manifest
    store: BlobStore
    region: Region
    note: str | None = None


class RegionStores:
    """The primary repository and, when cross-region copies are configured, the DR region's bucket."""

    def __init__(self, primary: BlobStore, dr: BlobStore | None) -> None:
        self.primary = primary
        self.dr = dr

    def store(self, region: Region) -> BlobStore:
        if region == "primary":
            return self.primary
        if self.dr is None:
            raise ConfigError(
                "--region dr needs the DR region's bucket: set backup.cross_region and backup.cross_region_bucket"
            )
        return self.dr

    def configured(self) -> tuple[Region, ...]:
        return REGIONS if self.dr is not None else ("primary",)

    async def locate(self, backup_id: str, region: Region | None) -> Located:
        """The backup in ``region``, or (``None``) in the primary and else in the DR bucket, with a note."""
        if region is not None:
            store = self.store(region)
            return Located(await catalog.find_backup(store, backup_id), store, region)
        try:
            return Located(await catalog.find_backup(self.primary, backup_id), self.primary, "primary")
        except NotFound:
            if self.dr is None:
                raise
            try:
                found = await catalog.find_backup(self.dr, backup_id)
            except StoreError:
                raise NotFound(f"no backup with id {backup_id} in the repository") from None
            note = (
                f"backup {backup_id} is not in the primary repository; using the DR region's copy in "
                f"{self.dr.describe()}"
            )
            return Located(found, self.dr, "dr", note)
        except StoreError as exc:
            if self.dr is None:
                raise
            try:
                found = await catalog.find_backup(self.dr, backup_id)
            except NotFound:
                raise StoreError(
                    f"{exc}; and backup {backup_id} has no copy in the DR region's {self.dr.describe()}"
                ) from exc
            except StoreError as dr_exc:
                raise StoreError(f"{exc}; the DR region's copy could not be read either: {dr_exc}") from dr_exc
            note = (
                f"the primary repository could not be read ({exc}); using the DR region's copy in {self.dr.describe()}"
            )
            return Located(found, self.dr, "dr", note)


async def manifest_ids(store: BlobStore) -> set[str]:
    """The ids of the backups whose manifest ``store`` holds: a listing, no manifest is read."""
    found: set[str] = set()
    async for info in store.list_objects(f"{BACKUPS_PREFIX}/"):
        parts = info.key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST_NAME and BACKUP_ID_PATTERN.fullmatch(parts[2]):
            found.add(parts[2])
    return found


def locations(backup_id: str, held: dict[Region, set[str]]) -> list[Region]:
    """PURE. The regions whose listing holds ``backup_id``'s manifest, primary first."""
    return [region for region in REGIONS if backup_id in held.get(region, set())]


def backfill_candidates(primary: Iterable[Manifest], in_dr: set[str], limit: int) -> list[Manifest]:
    """PURE. What a backfill pass copies: backups the DR bucket lacks, newest first, at most ``limit``.

    A backup made with ``cross_region: false`` asked not to be copied and is left alone; everything else
    the primary holds and the DR bucket does not was missed by an outage (or made before copies were
    enabled), and the newest are the ones a DR restore would want first."""
    missing = [
        m for m in primary if m.id not in in_dr and m.replication.get("cross_region", {}).get("status") != NOT_REQUESTED
    ]
    missing.sort(key=lambda m: (m.finished_at, m.id), reverse=True)
    return missing[:limit]


NOT_REQUESTED: Final = "not requested"
