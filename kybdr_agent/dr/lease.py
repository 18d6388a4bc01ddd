"""The DR lease: of several agents watching the primary, only the holder of this lease acts.

One small JSON object in the repository (``dr/lease``: holder, host, pid, acquired_at, renewed_at,
expires_at), changed only by conditional writes, so the store itself decides every race:

* no lease yet → create it with ``put_if_absent`` (S3 ``If-None-Match: *``): of agents racing, one wins;
* our own lease → renew it with ``put_if_match`` on the etag we read: if anyone changed it since (it
  expired and was taken), the write fails and we do not hold it;
* someone else's lease that is still live → leave it alone, never overwritten;
* someone else's lease past ``expires_at`` (or an unreadable one) → take it with ``put_if_match`` on the
  etag just read: if its holder renewed in between, the etag changed and we lose.

Time: a holder's ``expires_at`` comes from its clock and is judged by the others' clocks, so clocks must
agree to well within the ttl (NTP does, by orders of magnitude). A holder that cannot renew (the store
unreachable) still holds the lease until the ``expires_at`` it last wrote — by these rules nobody can
take it earlier — and not a moment longer: ``acquire_or_renew`` answers from that when the store fails,
so a holder cut off from the repository stops acting when its lease runs out, exactly when another agent
may start.

Needs a store with real conditional writes: a folder repository (``link(2)`` and a folder lock) and AWS
S3 (If-None-Match since 2024-08, If-Match on PutObject since 2024-11); moto 5.2.5 implements both. An
S3-compatible store that ignores ``If-Match`` would make a steal an overwrite; such a store should not host
a multi-agent DR lease. Release never deletes (DeleteObject under ``dr/`` is not in the IAM policy): it
rewrites our own lease as expired, conditionally, so the next agent can take it at once.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from kybdr_agent.clock import Clock
from kybdr_agent.errors import StoreError
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.telemetry import get_logger

LEASE_KEY: Final = "dr/lease"
LEASE_FORMAT: Final = 1
MAX_LEASE_BYTES: Final = 64 << 10
log = get_logger("kybdr_agent.dr.lease")


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease object says (``etag`` is the version read, for a conditional write)."""

    holder: str
    expires_at: datetime
    etag: str | None
    host: str = ""
    pid: int | None = None
    acquired_at: datetime | None = None
    renewed_at: datetime | None = None

    def live(self, now: datetime) -> bool:
        return now < self.expires_at

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": LEASE_FORMAT,
                "holder": self.holder,
                "host": self.host,
                "pid": self.pid,
                "acquired_at": self.acquired_at.isoformat() if self.acquired_at else None,
                "renewed_at": self.renewed_at.isoformat() if self.renewed_at else None,
                "expires_at": self.expires_at.isoformat(),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, etag: str) -> LeaseRecord:
        """Parse a lease object; anything malformed is a ``ValueError`` (such a lease protects nothing)."""
        try:
            return _parse_lease(json.loads(raw), etag)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"unreadable DR lease: {exc}") from None


def _when(value: object) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _parse_lease(data: Any, etag: str) -> LeaseRecord:
    if not isinstance(data, dict) or not isinstance(data.get("holder"), str):
        raise TypeError("not a DR lease")
    expires = datetime.fromisoformat(str(data["expires_at"]))
    if expires.tzinfo is None:
        raise ValueError("expires_at has no time zone")
    pid = data.get("pid")
    return LeaseRecord(
        holder=data["holder"],
        expires_at=expires,
        etag=etag,
        host=str(data.get("host") or ""),
        pid=pid if isinstance(pid, int) else None,
        acquired_at=_when(data.get("acquired_at")),
        renewed_at=_when(data.get("renewed_at")),
    )


class DrLease:
    """See the module docstring. ``holder`` must be unique per agent (the lead uses host and role):
    two agents with the same name would each take the other's lease for their own."""

    def __init__(self, store: BlobStore, *, holder: str, ttl: timedelta, clock: Clock, key: str = LEASE_KEY) -> None:
        if ttl <= timedelta(0):
            raise ValueError("the DR lease needs a positive ttl")
        self.store = store
        self.holder_name = holder
        self.ttl = ttl
        self.key = key
        self._clock = clock
        self._etag: str | None = None  # of the lease object we last wrote
        self._held_until: datetime | None = None  # its expires_at
        self._acquired_at: datetime | None = None

    @property
    def held_until(self) -> datetime | None:
        """The expiry of the lease we last wrote (None when we do not hold it)."""
        return self._held_until

    def _body(self, now: datetime, acquired_at: datetime) -> LeaseRecord:
        return LeaseRecord(
            holder=self.holder_name,
            expires_at=now + self.ttl,
            etag=None,
            host=socket.gethostname(),
            pid=os.getpid(),
            acquired_at=acquired_at,
            renewed_at=now,
        )

    async def _read(self) -> tuple[LeaseRecord | None, str | None]:
        """The current lease (None when absent or unreadable) and the etag of what was read."""
        found = await self.store.get_with_etag(self.key, max_size=MAX_LEASE_BYTES)
        if found is None:
            return None, None
        raw, etag = found
        try:
            return LeaseRecord.from_json(raw, etag), etag
        except ValueError as exc:
            log.warning("dr.lease_unreadable", key=self.key, error=str(exc), note="treated as expired")
            return None, etag

    def _lost(self) -> bool:
        self._etag = self._held_until = self._acquired_at = None
        return False

    async def acquire_or_renew(self) -> bool:
        """Take or renew the lease; True when we hold it now (until ``held_until``)."""
        now = self._clock()
        try:
            return await self._acquire_or_renew(now)
        except StoreError as exc:
            still = self._held_until is not None and now < self._held_until
            log.warning(
                "dr.lease_unreachable",
                key=self.key,
                error=str(exc),
                held_until=self._held_until.isoformat() if self._held_until else None,
                holding=still,
            )
            if not still:
                self._lost()
            return still

    async def _acquire_or_renew(self, now: datetime) -> bool:
        current, etag = await self._read()
        if etag is None:  # no lease object at all
            body = self._body(now, now)
            new = await self.store.put_if_absent(self.key, body.to_json())
            return self._took(new, body, "created")
        if current is not None and current.holder == self.holder_name:
            acquired = current.acquired_at or now
            body = self._body(now, acquired)
            new = await self.store.put_if_match(self.key, body.to_json(), etag)
            return self._took(new, body, None)
        if current is not None and current.live(now):
            if self._etag is not None:
                log.warning("dr.lease_lost", key=self.key, holder=current.holder)
            return self._lost()
        body = self._body(now, now)
        new = await self.store.put_if_match(self.key, body.to_json(), etag)
        return self._took(new, body, f"taken over from {current.holder}" if current else "taken over (unreadable)")

    def _took(self, etag: str | None, body: LeaseRecord, how: str | None) -> bool:
        if etag is None:
            return self._lost()
        if how is not None or self._etag is None:
            log.info("dr.lease_acquired", key=self.key, holder=self.holder_name, how=how or "resumed")
        self._etag, self._held_until, self._acquired_at = etag, body.expires_at, body.acquired_at
        return True

    async def holder(self) -> LeaseRecord | None:
        """The lease as stored (live or not: compare ``expires_at``), or None when there is none or it
        cannot be read as a lease."""
        current, _ = await self._read()
        return current

    async def release(self) -> None:
        """Give the lease up now (shutdown, operator): rewrite our own lease as expired, only if it is
        still the version we wrote. Never raises for a store failure: an unreleased lease simply expires."""
        if self._etag is None:
            return
        now = self._clock()
        body = LeaseRecord(
            holder=self.holder_name,
            expires_at=now,
            etag=None,
            host=socket.gethostname(),
            pid=os.getpid(),
            acquired_at=self._acquired_at,
            renewed_at=now,
        )
        etag, self._etag = self._etag, None
        self._held_until = self._acquired_at = None
        try:
            if await self.store.put_if_match(self.key, body.to_json(), etag) is None:
                log.info("dr.lease_release_skipped", key=self.key, note="the lease changed since we wrote it")
        except StoreError as exc:
            log.warning("dr.lease_release_failed", key=self.key, error=str(exc), note="it expires at its ttl")
