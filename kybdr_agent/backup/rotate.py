"""Key rotation without rewriting data: every backup's data key re-wrapped under the current master key.

A backup's data is sealed with its own data key; the master key only wraps that data key in the manifest.
So moving to a new master key (a new key file, or from a key file to KMS) rewrites manifests, a few KiB
each, never the data: for each manifest not yet under the current key, the data key is opened with
whichever key of the ring wraps it now, wrapped with the current key, the new wrap is unwrapped again and
compared (a manifest is never left holding a key that cannot be opened), and the manifest is replaced by a
compare-and-swap (``put_if_match``: an atomic rename under the folder's lock, or S3's ``If-Match``). That
makes rotation:

- **crash-safe**: each manifest is either the old one or the new one, both valid; a ``kill -9`` mid-way
  leaves some manifests rotated and the rest as they were;
- **resumable and idempotent**: a manifest already under the current key is skipped, so running it again
  finishes the job, and running it once more changes nothing;
- **safe against the agent**: a manifest that changed since it was read (the cross-region copy adding its
  record) is read again, and one deleted meanwhile (retention) is not written back.

The stream header inside the data object keeps the key id it was made with: it is authenticated by every
frame, so it is never rewritten. Readers find the key by the manifest's ``encryption.key_id`` and compare the
header with the manifest's own copy of it (``stream_header``), which rotation leaves alone.

Copies in the DR region's bucket hold the same wrapped key as the primary's manifest, so they are rotated too
(the CLI passes both stores): otherwise retiring the old key would strand exactly the copies meant for the
worst day. ``key_status`` says, per store, how many backups each configured key opens and which backups no
configured key opens — the check to run before an old key file is deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from kybdr_agent.backup import manifest
from kybdr_agent.backup.catalog import MAX_MANIFEST_BYTES, read_catalog
from kybdr_agent.backup.keys import KeyMaterialError, KeyRing, wrap_of
from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.telemetry import get_logger

log = get_logger("kybdr_agent.rotate")
MAX_TRIES: Final = 3  # reads of one manifest that a concurrent writer keeps changing before it is reported

Placement = Literal["unencrypted", "current", "rewrap"]


# --- planning (no I/O) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RingKey:
    """A key of the ring as the plan sees it: how it wraps, its id, and a label for people."""

    label: str
    wrap: str
    key_id: str  # hex
    current: bool


def placement(m: Manifest, current: RingKey) -> Placement:
    """What rotation does with one manifest: nothing (unencrypted, or already under the current key) or re-wrap."""
    enc = m.encryption
    if enc.cipher == "none":
        return "unencrypted"
    if wrap_of(enc) == current.wrap and (enc.key_id or "").lower() == current.key_id:
        return "current"
    return "rewrap"


def owner(m: Manifest, keys: Iterable[RingKey]) -> RingKey | None:
    """The ring key whose wrap and id the manifest names (the key that opens it), or None."""
    enc = m.encryption
    for key in keys:
        if wrap_of(enc) == key.wrap and (enc.key_id or "").lower() == key.key_id:
            return key
    return None


async def ring_keys(ring: KeyRing) -> list[RingKey]:
    """The ring's keys with their ids resolved (a KMS alias asks ``DescribeKey`` once)."""
    found = []
    for index, key in enumerate(ring.keys):
        key_id = (await key.resolve_key_id()).hex()
        found.append(RingKey(key.label, key.wrap_algorithm, key_id, current=index == 0))
    return found


# --- rotation --------------------------------------------------------------------------------------


@dataclass
class RotationReport:
    location: str
    store: str
    current_key: str
    backups: int = 0
    rewrapped: list[str] = field(default_factory=list)
    already_current: int = 0
    unencrypted: int = 0
    gone: list[str] = field(default_factory=list)  # deleted while rotation ran (retention): nothing to do
    failed: list[tuple[str, str]] = field(default_factory=list)  # backup id, why; the manifest is unchanged
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # manifest key, why

    @property
    def ok(self) -> bool:
        return not self.failed


async def rotate(
    store: BlobStore,
    ring: KeyRing,
    *,
    location: str = "primary",
    dry_run: bool = False,
    on_rewrapped: Callable[[Manifest], None] | None = None,
) -> RotationReport:
    """Re-wrap every manifest of ``store`` not yet under the ring's current key, oldest first, one at a time."""
    current = (await ring_keys(ring))[0]
    catalog = await read_catalog(store)
    report = RotationReport(location, store.describe(), current.label, backups=len(catalog.backups))
    report.unreadable = list(catalog.unreadable)
    for m in catalog.backups:
        where = placement(m, current)
        if where == "unencrypted":
            report.unencrypted += 1
        elif where == "current":
            report.already_current += 1
        elif dry_run:
            report.rewrapped.append(m.id)
        else:
            await _rotate_one(store, ring, current, m, report, on_rewrapped)
    return report


async def _rotate_one(
    store: BlobStore,
    ring: KeyRing,
    current: RingKey,
    listed: Manifest,
    report: RotationReport,
    on_rewrapped: Callable[[Manifest], None] | None,
) -> None:
    key = manifest.manifest_key_path(listed.database, listed.id)
    for _ in range(MAX_TRIES):
        got = await store.get_with_etag(key, max_size=MAX_MANIFEST_BYTES)
        if got is None:
            report.gone.append(listed.id)
            return
        raw, etag = got
        try:
            found = Manifest.from_json(raw)
        except ValueError as exc:
            report.failed.append((listed.id, f"the manifest no longer parses: {exc}"))
            return
        if found.id != listed.id or found.object_key != listed.object_key:
            report.failed.append((listed.id, "the manifest no longer matches its location"))
            return
        if placement(found, current) == "current":
            report.already_current += 1
            return
        try:
            encryption = await ring.rewrap(found.id, found.encryption)
        except KeyMaterialError as exc:
            # This backup's data key opens with no key of the ring (or its wrap is damaged): reported, and the
            # others go on. KMS being unreachable is not this: it raises, and running again resumes.
            report.failed.append((found.id, str(exc)))
            return
        rotated = found.model_copy(update={"encryption": encryption})
        if Manifest.from_json(rotated.to_json()) != rotated:  # what is written reads back as what was meant
            report.failed.append((found.id, "the re-wrapped manifest does not read back identically"))
            return
        if await store.put_if_match(key, rotated.to_json(), etag) is not None:
            log.info(
                "key.rewrapped",
                backup_id=found.id,
                database=found.database,
                location=report.location,
                from_key_id=found.encryption.key_id,
                to_key_id=encryption.key_id,
                wrap=encryption.wrap,
            )
            report.rewrapped.append(found.id)
            if on_rewrapped is not None:
                on_rewrapped(rotated)
            return
        # Changed since it was read (or deleted): read it again; a deleted one ends as "gone" above.
    report.failed.append((listed.id, f"the manifest kept changing while it was rotated ({MAX_TRIES} tries)"))


# --- status ----------------------------------------------------------------------------------------


@dataclass
class KeyUse:
    key: RingKey
    backups: int = 0


@dataclass
class Unopened:
    backup_id: str
    database: str
    wrap: str
    key_id: str
    reason: str


@dataclass
class StatusReport:
    location: str
    store: str
    backups: int = 0
    keys: list[KeyUse] = field(default_factory=list)
    unencrypted: int = 0
    unopened: list[Unopened] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    verified: bool = False

    @property
    def ok(self) -> bool:
        return not self.unopened


async def key_status(
    store: BlobStore, ring: KeyRing | None, *, location: str = "primary", verify: bool = False
) -> StatusReport:
    """How many backups each configured key opens, and which backups none does.

    By the manifests' key ids; with ``verify`` every data key is also unwrapped (a KMS ``Decrypt`` each), so
    a tampered or foreign wrapped key counts as unopened too."""
    keys = await ring_keys(ring) if ring is not None else []
    catalog = await read_catalog(store)
    report = StatusReport(location, store.describe(), backups=len(catalog.backups), verified=verify)
    report.keys = [KeyUse(key) for key in keys]
    report.unreadable = list(catalog.unreadable)
    uses = {id(use.key): use for use in report.keys}
    for m in catalog.backups:
        enc = m.encryption
        if enc.cipher == "none":
            report.unencrypted += 1
            continue
        match = owner(m, keys)
        reason = "no configured key has this id" if match is None else None
        if match is not None and verify and ring is not None:
            try:
                await ring.open(m.id, enc)
            except KeyMaterialError as exc:
                reason = str(exc)
        if reason is not None:
            report.unopened.append(Unopened(m.id, m.database, wrap_of(enc), enc.key_id or "", reason))
        elif match is not None:
            uses[id(match)].backups += 1
    return report
