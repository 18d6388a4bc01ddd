"""Validating a physical base backup: the tar it stored, and the WAL it cannot be restored without.

``quick``  (after ``verify``'s object checks) every segment from the start to the stop LSN has its record in
           the WAL archive.
``full``   every frame of the tar opened, decompressed and read as a tar (``basetar``): whole, its
           ``backup_manifest`` matching its own checksum, and ``backup_label``, the manifest's WAL range and
           ``pg_control`` saying what the backup's manifest says; then each segment needed for consistency read
           back and verified end to end (``WalArchive.read_bytes``: stored SHA-256, frames, plaintext SHA-256,
           page header) in memory, one 16 MiB segment at a time, nothing written to disk; and how far recovery
           can go from this backup along the archive (``wal.window``): a gap in the archive is reported as
           the end of its recovery window.

A missing or corrupt consistency segment makes the backup fail (``IntegrityError``: it cannot be restored).
A problem further on — a gap, a damaged timeline history — shortens the window but leaves the backup valid,
so it is reported, never held against the backup (retention must not delete a restorable backup over WAL
that came after it). A copy in the DR region has no WAL archive beside it (WAL is archived to the primary
repository only): its tar is checked and the validation then fails with ``WalNotHere``, a failure that is no
verdict on the backup, so the journal never marks the backup (whose id the primary's copy shares) corrupt.
"""

from __future__ import annotations

from typing import Any

import anyio

from kybdr_agent.backup.basetar import BaseTarError, BaseTarFacts, BaseTarReader
from kybdr_agent.backup.decode import data_key_for, stream_backup
from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.manifest import Manifest, PhysicalInfo
from kybdr_agent.backup.physical_manifest import base_backup, consistency_segments, physical_info
from kybdr_agent.errors import IntegrityError, KybdrError
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.wal.archive import WalArchive
from kybdr_agent.wal.names import PartialSegment, Segment, TimelineHistoryFile, WalError, format_lsn, parse_lsn
from kybdr_agent.wal.records import WalRecord
from kybdr_agent.wal.timeline import TimelineHistory, parse_history
from kybdr_agent.wal.window import Reach, recovery_window


class WalNotHere(KybdrError):
    """The repository the backup was read from holds no WAL archive for it; nothing is said about the backup."""


async def check_tar(backup: Manifest, store: BlobStore, keyring: KeyRing | None) -> BaseTarFacts:
    """Decode the whole data object through the tar reader; the facts must be the manifest's."""
    info = physical_info(backup)
    await data_key_for(backup, keyring)  # fail fast on a missing or wrong key, before reading gigabytes
    reader = BaseTarReader()

    async def feed(chunk: bytes) -> None:
        await anyio.to_thread.run_sync(reader.feed, chunk)

    try:
        await stream_backup(lambda: store.read(backup.object_key), backup, keyring, feed)
        facts = reader.finish()
    except BaseTarError as exc:
        raise IntegrityError(f"backup {backup.id}: the stored tar is not a whole base backup: {exc}") from None
    _agrees(backup.id, info, facts)
    return facts


def _agrees(backup_id: str, info: PhysicalInfo, facts: BaseTarFacts) -> None:
    differ = [
        what
        for what, ours, theirs in (
            ("system identifier", info.system_identifier, facts.system_identifier),
            ("timeline", info.timeline, facts.timeline),
            ("start LSN", parse_lsn(info.start_lsn), facts.start_lsn),
            ("stop LSN", parse_lsn(info.stop_lsn), facts.stop_lsn),
            ("tar size", info.tar_bytes, facts.tar_bytes),
        )
        if ours != theirs
    ]
    if differ:
        raise IntegrityError(f"backup {backup_id}: the tar's {', '.join(differ)} differ from the manifest's")


async def check_consistency_wal(backup: Manifest, archive: WalArchive, *, read: bool) -> list[WalRecord]:
    """Every segment from the start to the stop LSN archived (and, ``read``, read back and verified)."""
    info = physical_info(backup)
    found: list[WalRecord] = []
    for segment in consistency_segments(info):
        record = await archive.stat(segment.name, segment.timeline)
        if record is None:
            raise IntegrityError(
                f"backup {backup.id} cannot be restored: WAL segment {segment.name}, needed to make it consistent "
                f"(LSN {info.start_lsn} to {info.stop_lsn}), is not in the archive {archive.describe()}"
            )
        if read:
            await archive.read_bytes(record)  # verified end to end; WalIntegrityError names the segment
        found.append(record)
    return found


async def recovery_reach(backup: Manifest, archive: WalArchive) -> tuple[Reach, int]:
    """How far recovery gets from ``backup`` along the archive: along the newest timeline its own leads to, or
    along its own when a later timeline branched off before it. Every history file is read (they are small)."""
    records = await archive.records()
    histories: dict[int, TimelineHistory] = {}
    segments = []
    for record in records:
        file = record.wal_file()
        if isinstance(file, TimelineHistoryFile):
            histories[file.timeline] = parse_history(file.timeline, await archive.read_bytes(record))
        elif isinstance(file, Segment | PartialSegment):
            segments.append(record.archived_segment())
    base = base_backup(backup)
    size = physical_info(backup).wal_segment_size
    window = recovery_window([base], segments, histories, size)
    if not window.reaches or not window.reaches[0].on_lineage:
        window = recovery_window([base], segments, histories, size, timeline=base.timeline)
    if not window.reaches or not window.reaches[0].usable:
        raise KybdrError("; ".join(window.problems) or f"timeline {base.timeline}'s lineage is unknown")
    return window.reaches[0], window.timeline


def describe_reach(reach: Reach, timeline: int) -> tuple[dict[str, Any], str, str | None]:
    """The ``wal`` document, the check line and (for a gap) the notice of a backup's recovery reach."""
    last = reach.last
    assert last is not None  # the consistency segments were found, so the reach is usable
    end_name = last.segment.partial_name if last.partial else last.segment.name
    document: dict[str, Any] = {
        "timeline": timeline,
        "consistency": [reach.consistency[0].name, reach.consistency[-1].name],
        "archived_to": end_name,
        "end_lsn": format_lsn(reach.end_lsn),
        "gap": reach.gap.name if reach.gap is not None else None,
        "earliest_recovery_time": reach.earliest.isoformat(),
        "latest_recovery_time": reach.latest.isoformat(),
        "commit_times_known": not reach.commits_unknown,
    }
    check = (
        f"recoverable on timeline {timeline} from {reach.earliest.isoformat()} to {reach.latest.isoformat()}"
        f"{' or later (some segments carry no commit times)' if reach.commits_unknown else ''}: WAL archived "
        f"without a break to {end_name} (LSN {format_lsn(reach.end_lsn)})"
    )
    notice = None
    if reach.gap is not None:
        notice = (
            f"the WAL archive has a gap at {reach.gap.name}: WAL archived after it cannot be replayed from this "
            f"backup, so its recovery window ends at LSN {format_lsn(reach.end_lsn)}"
        )
    return document, check, notice


async def validate_physical(
    backup: Manifest,
    *,
    store: BlobStore,
    keyring: KeyRing | None,
    archive: WalArchive | None,
    full: bool,
    checks: list[str],
    notices: list[str],
) -> dict[str, Any] | None:
    """The physical checks after the object checks; appends what passed, raises ``IntegrityError`` for what the
    backup cannot be restored without, and returns the ``wal`` document (``full`` only)."""
    if full:
        facts = await check_tar(backup, store, keyring)
        checks.append("SHA-256 of the object, every frame's tag, and the decompressed size verified")
        checks.append(
            f"the tar is a whole base backup ({facts.members} members): backup_label, backup_manifest (matching its "
            "own checksum) and pg_control agree with the manifest"
        )
    if archive is None:
        raise WalNotHere(
            f"backup {backup.id}: this copy's repository has no WAL archive (WAL is archived to the primary "
            "repository only), so the WAL it needs could not be checked; validate the primary's copy"
        )
    records = await check_consistency_wal(backup, archive, read=full)
    names = f"{records[0].name}" + (f" to {records[-1].name}" if len(records) > 1 else "")
    checks.append(
        f"the WAL needed for consistency ({names}) is archived" + (" and verified end to end" if full else "")
    )
    if not full:
        return None
    try:
        reach, timeline = await recovery_reach(backup, archive)
    except (KybdrError, WalError) as exc:
        notices.append(f"the recovery window could not be worked out: {exc}")
        return {"problem": str(exc)}
    document, check, notice = describe_reach(reach, timeline)
    checks.append(check)
    if notice is not None:
        notices.append(notice)
    return document
