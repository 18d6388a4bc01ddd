"""Backup statistics: one rendering for the CLI and the API, and the daemon's in-memory sources for it.

Statistics combine two things: the repository's manifests (what backups exist, their sizes and durations)
and the journal (outcomes, including failures, which leave no manifest). ``BackupService.stats`` builds
both from scratch on each call, which suits a one-shot CLI. The daemon must not: the journal grows by a line
per job forever (it is rotated, but still megabytes), and re-parsing it on every ``GET /v1/backup/stats``
let 200 parallel calls push /healthz to seconds. So the daemon keeps an ``OutcomeTally`` in memory — built
once at start from the journal (its summary and every live generation), then updated as each job finishes —
and caches the catalog for a short time, dropping the cache whenever a backup or cleanup of this agent
finishes (another agent sharing the repository is seen within ``CATALOG_TTL_SECONDS``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import anyio

from kybdr_agent.backup.catalog import Catalog
from kybdr_agent.events import Event, JobFinished
from kybdr_agent.journal import Journal

if TYPE_CHECKING:
    from kybdr_agent.backup.service import BackupService

CATALOG_TTL_SECONDS: Final = 30.0
OUTCOMES: Final = ("succeeded", "failed", "cancelled")
# Jobs whose end changes what the repository holds, so the cached catalog is stale once they finish.
CATALOG_CHANGING_KINDS: Final = frozenset({"backup", "cleanup"})


@dataclass
class OutcomeTally:
    """What statistics need from the journal, folded one record at a time (oldest first)."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    last_failure: dict[str, Any] | None = None
    last_drill: dict[str, Any] | None = None

    def observe(self, record: dict[str, Any], *, count: bool = True) -> None:
        """Fold one journal record in; ``count=False`` for a carried record the summary already counted."""
        kind = record.get("kind")
        if kind == "backup":
            status = str(record.get("status"))
            if count and status in self.outcomes:
                self.outcomes[status] += 1
            if status == "failed":
                self.last_failure = {
                    "at": record.get("finished_at"),
                    "database": record.get("database"),
                    "error": record.get("error"),
                }
        elif kind == "test":
            self.last_drill = record

    @classmethod
    def from_journal(cls, journal: Journal | None) -> OutcomeTally:
        """The tally of every outcome the journal remembers, rotated-out generations included (blocking I/O)."""
        tally = cls()
        if journal is None:
            return tally
        scan = journal.scan()
        folded = scan.summary.counts.get("backup", {})
        for status in OUTCOMES:
            tally.outcomes[status] += folded.get(status, 0)
        for record in scan.summary.carried:
            tally.observe(record, count=False)
        for record in scan.live:
            tally.observe(record)
        return tally


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def render_stats(found: Catalog, tally: OutcomeTally, now: datetime) -> dict[str, Any]:
    """The statistics document (its shape is the API's and the CLI's ``stats``)."""
    per_db: dict[str, dict[str, Any]] = {}
    for m in found.backups:
        entry = per_db.setdefault(m.database, {"count": 0, "stored_bytes": 0})
        entry["count"] += 1
        entry["stored_bytes"] += m.stored_bytes
        entry["last_good_id"] = m.id
        entry["last_good_at"] = m.finished_at.isoformat()
        entry["last_good_age_seconds"] = round((now - m.finished_at).total_seconds(), 1)
    outcomes = dict(tally.outcomes)
    attempts = sum(outcomes.values())
    return {
        "generated_at": now.isoformat(),
        "backups": {
            "count": len(found.backups),
            "stored_bytes": sum(m.stored_bytes for m in found.backups),
            "dump_bytes": sum(m.dump_bytes for m in found.backups),
        },
        "by_outcome": outcomes,
        "success_rate": round(outcomes["succeeded"] / attempts, 4) if attempts else None,
        "duration_seconds": percentiles([m.duration_seconds for m in found.backups]),
        "stored_bytes": percentiles([float(m.stored_bytes) for m in found.backups]),
        "databases": per_db,
        "last_failure": tally.last_failure,
        "last_drill": tally.last_drill,
        "unreadable_manifests": len(found.unreadable),
    }


class CatalogCache:
    """The repository's catalog, read once for many callers and kept for ``ttl`` seconds at most.

    One read at a time (callers arriving meanwhile share its result). ``invalidate`` drops the cache; a read
    that was under way when it was called is still returned to its callers but not kept.
    """

    def __init__(self, ttl: float = CATALOG_TTL_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = anyio.Lock()
        self._generation = 0
        self._cached: tuple[object, float, Catalog] | None = None  # (service, read at, catalog)

    def invalidate(self) -> None:
        self._generation += 1
        self._cached = None

    async def get(self, service: BackupService) -> Catalog:
        async with self._lock:
            cached = self._cached
            # A reload swaps the service (and maybe the repository): a catalog of the old one is no answer.
            if cached is not None and cached[0] is service and self._clock() - cached[1] < self.ttl:
                return cached[2]
            generation, started = self._generation, self._clock()
            found = await service.catalog()
            if generation == self._generation:
                self._cached = (service, started, found)
            return found


class DaemonStats:
    """The daemon's statistics: outcomes from memory, the catalog from ``CatalogCache``."""

    def __init__(self, tally: OutcomeTally, catalog: CatalogCache | None = None) -> None:
        self.tally = tally
        self.catalog = catalog or CatalogCache()

    @classmethod
    async def load(cls, journal: Journal | None) -> DaemonStats:
        """Built from the journal once, off the event loop (it may be tens of megabytes)."""
        return cls(await anyio.to_thread.run_sync(OutcomeTally.from_journal, journal))

    def on_event(self, event: Event) -> None:
        """An event subscriber: a finished job's record, folded in as the journal would read it back."""
        if not isinstance(event, JobFinished):
            return
        self.tally.observe(dict(event.record))
        if event.kind in CATALOG_CHANGING_KINDS:
            self.catalog.invalidate()

    async def stats(self, service: BackupService, now: datetime | None = None) -> dict[str, Any]:
        found = await self.catalog.get(service)
        return render_stats(found, self.tally, now or datetime.now(UTC))
