"""The WAL component: continuous archiving in the daemon, started only when ``[wal] enabled``.

It learns the cluster it archives (system identifier, segment size: ``wal/facts.py``) from the server,
retrying with a bounded backoff while the server cannot be reached — READY=1 does not wait for the database,
as the backup scheduler does not — then runs the shipper (spool → repository) and, in stream mode, the
receiver (pg_receivewal on the slot). In archive_command mode there is no receiver: ``POST /v1/wal/push``
(``wal/routes.py``) fills the spool and wakes the shipper.

Health: unhealthy only when the shipper stops looking at its spool (a hang the watchdog should act on); a
repository or database outage is not a reason to restart the agent, and shows in ``/healthz`` and
``GET /v1/wal/status`` instead, and — once unarchived WAL passes ``max_spool_bytes`` — as an alert.
``[wal]`` changes apply on restart (a reload says so).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus

from kybdr_agent.backup.keys import KeyRing
from kybdr_agent.backup.streamfmt import Compression
from kybdr_agent.clock import Clock
from kybdr_agent.component import Health
from kybdr_agent.config import AgentSettings
from kybdr_agent.errors import KybdrError
from kybdr_agent.postgres.connection import DATABASE_ERRORS, Connection, pg_message
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.telemetry import get_logger
from kybdr_agent.wal.archive import WalArchive
from kybdr_agent.wal.facts import CommitTimeReader, system_facts
from kybdr_agent.wal.receiver import Receiver
from kybdr_agent.wal.shipper import CommitReader, Shipper
from kybdr_agent.wal.status import WalSpoolChecked

FACTS_RETRY_FIRST: Final = 1.0
FACTS_RETRY_MAX: Final = 30.0
FACTS_WAIT_SECONDS: Final = 5.0  # how long a push waits for the facts before it is refused (and retried)
STALE_SHIPPER_SECONDS: Final = 60.0
log = get_logger("kybdr_agent.wal")


@dataclass(frozen=True)
class ClusterFacts:
    system_identifier: str
    timeline: int
    segment_size: int


class WalComponent:
    name = "wal"

    def __init__(
        self,
        settings: AgentSettings,
        *,
        store: BlobStore,
        keyring: KeyRing | None,
        connection: Connection,
        clock: Clock,
        publish: Callable[[WalSpoolChecked], None] | None = None,
        commit_reader: CommitReader | None = None,
    ) -> None:
        self.settings = settings
        self.wal = settings.wal
        self.spool_dir = settings.wal_spool_dir()
        self.store = store
        self.keyring = keyring if settings.backup.encryption else None
        self.connection = connection
        self.database = settings.database.maintenance_database
        self.clock = clock
        self.publish = publish
        self.commit_reader = commit_reader
        self.facts: ClusterFacts | None = None
        self.facts_error: str | None = None
        self._facts_known = anyio.Event()
        self.shipper: Shipper | None = None
        self.receiver: Receiver | None = None
        if self.wal.mode == "stream":
            self.receiver = Receiver(
                connection, database=self.database, spool_dir=self.spool_dir, slot=self.wal.slot_name, clock=clock
            )

    # --- running ------------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            task_status.started()
            facts = await self._learn_facts()
            self.shipper = Shipper(
                self.spool_dir,
                self.archive(facts),
                source="stream" if self.wal.mode == "stream" else "archive_command",
                upload_concurrency=self.wal.upload_concurrency,
                max_partial_age=self.wal.max_partial_age,
                max_spool_bytes=self.wal.max_spool_bytes,
                clock=self.clock,
                commit_reader=self.commit_reader,
                on_report=self.publish,
            )
            await tg.start(self.shipper.run, name="wal:shipper")
            if self.receiver is not None:
                await tg.start(self.receiver.run, name="wal:receiver")
            log.info(
                "wal.archiving",
                mode=self.wal.mode,
                system_identifier=facts.system_identifier,
                segment_size=facts.segment_size,
                spool=str(self.spool_dir),
                repository=self.store.describe(),
            )

    def archive(self, facts: ClusterFacts) -> WalArchive:
        settings = self.settings
        compression = Compression[settings.compression.algorithm.upper()] if settings.backup.compression else None
        return WalArchive(
            self.store,
            system_identifier=facts.system_identifier,
            segment_size=facts.segment_size,
            keyring=self.keyring,
            compression=compression or Compression.NONE,
            compression_level=settings.compression.level,
            frame_size=settings.encryption.frame_size_kib * 1024,
        )

    async def _learn_facts(self) -> ClusterFacts:
        failures = 0
        while True:
            try:
                async with self.connection.connect(self.database) as conn:
                    system_identifier, timeline, segment_size = await system_facts(conn)
                    major = conn.get_server_version().major
            except (KybdrError, *DATABASE_ERRORS) as exc:
                failures += 1
                delay = min(FACTS_RETRY_MAX, FACTS_RETRY_FIRST * 2 ** (failures - 1))
                self.facts_error = str(exc) if isinstance(exc, KybdrError) else pg_message(exc)
                log.warning("wal.facts_unavailable", error=self.facts_error, retry_in=delay)
                await anyio.sleep(delay)
                continue
            self.facts = ClusterFacts(system_identifier, timeline, segment_size)
            self.facts_error = None
            if self.commit_reader is None:
                self.commit_reader = self._waldump(major)
            self._facts_known.set()
            return self.facts

    def _waldump(self, server_major: int) -> CommitReader | None:
        try:
            return CommitTimeReader(self.connection.binary("pg_waldump", server_major), self.spool_dir)
        except KybdrError as exc:
            log.warning("wal.commit_times_off", error=str(exc), note="the recovery window is understated without them")
            return None

    async def segment_size(self) -> int:
        """The cluster's ``wal_segment_size`` for ``POST /v1/wal/push``; KybdrError while it is unknown."""
        with anyio.move_on_after(FACTS_WAIT_SECONDS):
            await self._facts_known.wait()
        if self.facts is None:
            raise KybdrError(f"the cluster's WAL facts are not known yet: {self.facts_error or 'connecting'}")
        return self.facts.segment_size

    def wake(self, name: str | None = None) -> None:
        if self.shipper is not None:
            self.shipper.wake(name)

    # --- what it reports ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``GET /v1/wal/status``."""
        facts = self.facts
        shipper = self.shipper.state.to_json() if self.shipper is not None else None
        return {
            "enabled": True,
            "mode": self.wal.mode,
            "spool_dir": str(self.spool_dir),
            "max_spool_bytes": self.wal.max_spool_bytes,
            "max_partial_age_seconds": self.wal.max_partial_age,
            "repository": self.store.describe(),
            "system_identifier": facts.system_identifier if facts else None,
            "timeline_at_start": facts.timeline if facts else None,
            "wal_segment_size": facts.segment_size if facts else None,
            "facts_error": self.facts_error,
            "shipper": shipper,
            "receiver": self.receiver.state.to_json() if self.receiver is not None else None,
        }

    def metrics(self) -> Mapping[str, float]:
        """The WAL gauges and counters for ``telemetry.metrics`` (read at scrape time)."""
        values: dict[str, float] = {}
        if self.shipper is not None:
            state = self.shipper.state
            values["kybdr_wal_spool_bytes"] = float(state.spool_bytes)
            values["kybdr_wal_files_shipped"] = float(state.files_shipped)
            if state.last_shipped_at is not None:
                values["kybdr_wal_last_shipped_timestamp"] = state.last_shipped_at.timestamp()
        if self.receiver is not None and self.receiver.state.slot_retained_bytes is not None:
            values["kybdr_wal_slot_retained_bytes"] = float(self.receiver.state.slot_retained_bytes)
        return values

    def health(self) -> Health:
        shipper = self.shipper
        fields: dict[str, Any] = {"mode": self.wal.mode}
        ok, reason = True, ""
        if shipper is None:
            fields["state"] = "waiting for the database" if self.facts is None else "starting"
        else:
            state = shipper.state
            fields.update(
                state="archiving",
                spool_bytes=state.spool_bytes,
                spool_files=state.spool_files,
                last_shipped=state.last_shipped,
                last_shipped_at=state.last_shipped_at.isoformat() if state.last_shipped_at else None,
                last_error=state.last_error,
            )
            beat = state.heartbeat
            if beat is not None and anyio.current_time() - beat > STALE_SHIPPER_SECONDS:
                ok, reason = False, f"the WAL shipper has not looked at its spool for {STALE_SHIPPER_SECONDS:g} s"
        if self.receiver is not None:
            fields["receiver_running"] = self.receiver.state.running
            fields["slot_retained_bytes"] = self.receiver.state.slot_retained_bytes
        return Health(ok=ok, fields={"wal": fields}, reason=reason)

    async def reload(self, settings: AgentSettings) -> None:
        if settings.wal != self.wal or settings.wal_spool_dir() != self.spool_dir:
            log.warning("wal.reload_ignored", note="[wal] changes apply when the agent restarts")
