"""What the probes saw, as plain values: the only input the state machine takes from the world.

Pure types, no I/O: ``probes`` fills them, ``machine`` reads them, tests build them by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Region = Literal["primary", "dr"]
REGIONS: tuple[Region, Region] = ("primary", "dr")


def other(region: Region) -> Region:
    return "dr" if region == "primary" else "primary"


@dataclass(frozen=True)
class HttpProbe:
    """One GET of a health URL or a witness: did an answer arrive within the timeout, and was it 2xx."""

    target: str  # "primary", "dr", or the witness URL
    reachable: bool  # an HTTP answer arrived within the probe timeout (any status)
    ok: bool  # that answer was 2xx
    status: int | None = None
    latency_s: float | None = None
    error: str = ""


@dataclass(frozen=True)
class DbProbe:
    """One short session with a region's database (every field None when it could not be reached)."""

    region: Region
    reachable: bool
    in_recovery: bool | None = None
    read_only: bool | None = None  # default_transaction_read_only: on = fenced
    timeline: int | None = None
    current_lsn: int | None = None  # pg_current_wal_lsn(), when not in recovery
    receive_lsn: int | None = None  # pg_last_wal_receive_lsn(), when in recovery
    replay_lsn: int | None = None  # pg_last_wal_replay_lsn(), when in recovery
    last_receipt: datetime | None = None  # pg_stat_wal_receiver.last_msg_receipt_time (aware, UTC)
    streaming: bool | None = None  # a WAL receiver is running with status 'streaming'
    latency_s: float | None = None
    error: str = ""

    @property
    def writable(self) -> bool:
        """Accepts writes from ordinary sessions: reachable, not in recovery and not fenced read-only."""
        return self.reachable and self.in_recovery is False and self.read_only is False


@dataclass(frozen=True)
class PeerProbe:
    """The other agent's own view (``GET {peer_url}/v1/disaster-recovery/peer``)."""

    reachable: bool
    role: str | None = None  # the peer's dr.role
    db_reachable: bool | None = None  # the peer can reach the database beside it
    db_writable: bool | None = None  # and that database accepts writes
    fenced: bool | None = None  # the peer has fenced its database
    active: Region | None = None  # the region the peer believes is active
    contact: bool | None = None  # the peer itself is in contact (its own peer or a witness majority answers)
    error: str = ""


@dataclass(frozen=True)
class Observations:
    """One round of probes, all started at ``at``. A missing key means nothing is configured to probe."""

    at: datetime
    health: Mapping[Region, HttpProbe] = field(default_factory=dict)
    db: Mapping[Region, DbProbe] = field(default_factory=dict)
    witnesses: tuple[HttpProbe, ...] = ()
    peer: PeerProbe | None = None

    def to_json(self) -> dict[str, Any]:
        """For ``GET /v1/disaster-recovery/health`` and history: every probe as plain JSON."""
        from dataclasses import asdict

        def clean(value: Any) -> Any:
            if isinstance(value, datetime):
                return value.isoformat()
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [clean(v) for v in value]
            return value

        return {
            "at": self.at.isoformat(),
            "health": {region: clean(asdict(probe)) for region, probe in self.health.items()},
            "db": {region: clean({**asdict(probe), "writable": probe.writable}) for region, probe in self.db.items()},
            "witnesses": [clean(asdict(w)) for w in self.witnesses],
            "peer": clean(asdict(self.peer)) if self.peer else None,
        }
