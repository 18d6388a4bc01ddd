"""One round of DR probes: both health URLs, both databases, the witnesses and the peer agent, at once.

Every probe is bounded by one hard deadline that includes the TCP connect (``anyio.fail_after`` around the
whole probe, not only the read): a blackholed port, a SIGSTOPped postmaster or a server that accepts and
never answers must turn into ``reachable=False`` within ``timeout``, never into a probe round that hangs and
silently stops the state machine from seeing anything. A probe never raises for an unreachable target; what
went wrong is in ``error``, without passwords or tokens.

HTTP probes use one shared ``aiohttp`` session whose connector never reuses a connection (``force_close``):
a kept-alive socket from the last round would hide exactly what a probe is for — whether a *new* client can
reach the target now (a load balancer draining new connections, a refusing port, a partition).

Database probes open one short session each, run one query and close it. They take the connection
settings from ``postgres.connection.Connection`` but not its ``connect()`` context manager: that one closes
under a shield with a 10 s deadline (right for a backup session, whose server must see a clean goodbye), and
after a timed-out query on a blackholed link asyncpg's close waits for a cancel request that cannot arrive,
so the probe would overrun its bound by that much. Here a session that did not finish in time is dropped
(``terminate``); one that did is closed politely within what is left of the deadline.

Which timeline each side reports, and why (checked on PostgreSQL 15 with a real primary/standby pair):

* not in recovery: the first 8 hex digits of ``pg_walfile_name(pg_current_wal_lsn())``, the timeline WAL is
  being written on now. ``pg_control_checkpoint().timeline_id`` is the timeline of the last checkpoint,
  which lags on a freshly promoted server until its first checkpoint after promotion completes.
* in recovery: ``pg_stat_wal_receiver.received_tli`` while a WAL receiver runs (the timeline of the WAL
  arriving from the primary now); without one (the primary is gone: exactly when a failover is being
  considered) the greater of ``pg_control_checkpoint().timeline_id`` (last restartpoint) and
  ``pg_control_recovery().min_recovery_end_timeline``. ``pg_walfile_name()`` cannot be called in recovery.
  Timelines only grow along a server's history, so the greater is the better lower bound.

The probing role needs ``pg_monitor`` (or superuser) for ``pg_control_*`` and the WAL receiver's columns.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, cast

import aiohttp
import anyio
import asyncpg

from kybdr_agent.clock import Clock
from kybdr_agent.dr.observations import REGIONS, DbProbe, HttpProbe, Observations, PeerProbe, Region
from kybdr_agent.postgres.connection import Connection, pg_message

PEER_PATH: Final = "/v1/disaster-recovery/peer"
# At least this many HTTP connections at once (raised to the number of HTTP targets, see Prober._http).
CONNECTION_LIMIT: Final = 16
# A peer's answer is a few hundred bytes of JSON; anything far larger is not our peer.
MAX_PEER_BODY: Final = 64 * 1024

# One round trip. CASE keeps the primary-only functions (they raise in recovery) from being called on a
# standby; LSNs are bytes since 0/0 as bigints. Every name is pg_catalog-qualified: a probe that decides
# a failover must not be answered by a same-named function some schema on the search_path provides.
DB_PROBE_SQL: Final = """
SELECT pg_catalog.pg_is_in_recovery() AS in_recovery,
       pg_catalog.current_setting('default_transaction_read_only') AS read_only,
       CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL
            ELSE (pg_catalog.pg_current_wal_lsn() OPERATOR(pg_catalog.-) '0/0')::bigint END AS current_lsn,
       CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL
            ELSE pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8)
       END AS wal_timeline,
       (pg_catalog.pg_last_wal_receive_lsn() OPERATOR(pg_catalog.-) '0/0')::bigint AS receive_lsn,
       (pg_catalog.pg_last_wal_replay_lsn() OPERATOR(pg_catalog.-) '0/0')::bigint AS replay_lsn,
       (SELECT timeline_id FROM pg_catalog.pg_control_checkpoint()) AS checkpoint_timeline,
       (SELECT min_recovery_end_timeline FROM pg_catalog.pg_control_recovery()) AS min_recovery_timeline,
       r.status AS receiver_status,
       r.received_tli,
       r.last_msg_receipt_time
FROM (SELECT 1) AS one LEFT JOIN pg_catalog.pg_stat_wal_receiver AS r ON true
"""


@dataclass(frozen=True)
class ProbeTargets:
    """What one round probes, built by the DR component from ``DRSettings``."""

    health: Mapping[Region, str]  # health-check URL per region (a region may have none)
    dbs: Mapping[Region, Connection]  # how to reach each region's database
    witnesses: tuple[str, ...]
    peer_url: str | None
    peer_token: str | None  # the token itself (read from dr.peer_token_file by the caller)
    timeout: float  # hard bound per probe, TCP connect included
    maintenance_database: str = "postgres"


class Prober:
    """Runs every probe of ``targets`` concurrently, each bounded, and returns one ``Observations``."""

    def __init__(self, targets: ProbeTargets, *, clock: Clock) -> None:
        self.targets = targets
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        # Created on first use: a ClientSession belongs to the running event loop, which __init__ may precede.
        # The limit never makes a probe wait for a slot: time queued would count against its deadline and a
        # healthy witness could read as unreachable because there were many of them.
        if self._session is None or self._session.closed:
            wanted = len(self.targets.health) + len(self.targets.witnesses) + 1
            connector = aiohttp.TCPConnector(limit=max(CONNECTION_LIMIT, wanted), force_close=True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.targets.timeout)
            )
        return self._session

    async def observe(self) -> Observations:
        """One round: all probes at once, so a round takes as long as its slowest probe (≤ timeout), not
        the sum. ``at`` is when the round started, from the injected clock.

        Unreachable targets never raise; a bug (an exception no probe expects) does, on purpose: reported
        as "unreachable" it would count as evidence that a region is down."""
        targets = self.targets
        at = self._clock()
        session = self._http()
        health: dict[Region, HttpProbe] = {}
        dbs: dict[Region, DbProbe] = {}
        witnesses: list[HttpProbe | None] = [None] * len(targets.witnesses)
        peer: list[PeerProbe] = []

        async def one_health(region: Region, url: str) -> None:
            health[region] = await probe_http(session, region, url, targets.timeout)

        async def one_db(region: Region, conn: Connection) -> None:
            dbs[region] = await probe_db(region, conn, targets.timeout, targets.maintenance_database)

        async def one_witness(index: int, url: str) -> None:
            witnesses[index] = await probe_http(session, url, url, targets.timeout)

        async def the_peer(url: str) -> None:
            peer.append(await probe_peer(session, url, targets.peer_token, targets.timeout))

        async with anyio.create_task_group() as group:
            for region in REGIONS:
                if region in targets.health:
                    group.start_soon(one_health, region, targets.health[region])
                if region in targets.dbs:
                    group.start_soon(one_db, region, targets.dbs[region])
            for index, url in enumerate(targets.witnesses):
                group.start_soon(one_witness, index, url)
            if targets.peer_url:
                group.start_soon(the_peer, targets.peer_url)
        return Observations(
            at=at,
            health={r: health[r] for r in REGIONS if r in health},
            db={r: dbs[r] for r in REGIONS if r in dbs},
            witnesses=tuple(w for w in witnesses if w is not None),
            peer=peer[0] if peer else None,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _describe(exc: BaseException) -> str:
    """An HTTP failure for people: the OS's reason when there is one. aiohttp's messages name host and
    port, never the request's headers (where the peer token travels)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {_os_reason(exc.os_error)}"
    return str(exc) or type(exc).__name__


def _os_reason(exc: BaseException) -> str:
    """asyncio's failed connect says "Connect call failed ('127.0.0.1', 5432)" where errno says
    "Connection refused": prefer the errno's text. Never the password (see ``pg_message``)."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return pg_message(exc)


async def probe_http(session: aiohttp.ClientSession, target: str, url: str, timeout: float) -> HttpProbe:  # noqa: ASYNC109 - the bound is the probe's own, applied inside with fail_after
    """GET ``url``: reachable if any HTTP answer arrived within ``timeout``, ok if it was 2xx.

    Redirects are not followed: a health check that answers 3xx is not saying "healthy", and following
    one would spend the deadline on a second host."""
    started = time.monotonic()
    try:
        with anyio.fail_after(timeout):
            async with session.get(url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                status = resp.status
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        return HttpProbe(target, reachable=False, ok=False, latency_s=time.monotonic() - started, error=_describe(exc))
    return HttpProbe(
        target,
        reachable=True,
        ok=200 <= status < 300,
        status=status,
        latency_s=time.monotonic() - started,
        error="" if 200 <= status < 300 else f"HTTP {status}",
    )


async def probe_peer(session: aiohttp.ClientSession, url: str, token: str | None, timeout: float) -> PeerProbe:  # noqa: ASYNC109 - the bound is the probe's own, applied inside with fail_after
    """The other agent's own view, from ``GET {url}/v1/disaster-recovery/peer``.

    ``reachable`` means the peer agent answered at all. An answer that is not a valid view (401 for a wrong
    token, 5xx, bad JSON) is ``reachable=True`` with every field None and the reason in ``error``: the
    network path works, so it must not read as "the peer is down" — a mistyped token would otherwise
    corroborate a failover — while the machine still gets no view to lean on."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    target = url.rstrip("/") + PEER_PATH
    try:
        with anyio.fail_after(timeout):
            async with session.get(
                target, headers=headers, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                body = await resp.content.read(MAX_PEER_BODY + 1)
                status = resp.status
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        return PeerProbe(reachable=False, error=_describe(exc))
    if status != 200:
        reason = "the peer refused our token" if status in (401, 403) else "the peer answered"
        return PeerProbe(reachable=True, error=f"{reason} (HTTP {status})")
    if len(body) > MAX_PEER_BODY:
        return PeerProbe(reachable=True, error=f"the peer's answer is over {MAX_PEER_BODY} bytes")
    try:
        return _peer_view(json.loads(body))
    except (ValueError, TypeError) as exc:
        return PeerProbe(reachable=True, error=f"the peer's answer is not a valid view: {exc}")


def _peer_view(data: Any) -> PeerProbe:
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")

    def flag(name: str) -> bool | None:
        value = data.get(name)
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} is not a boolean")
        return value

    role = data.get("role")
    if role is not None and not isinstance(role, str):
        raise TypeError("role is not a string")
    active = data.get("active")
    if active is not None and active not in REGIONS:
        raise ValueError(f"active is {active!r}, not one of {', '.join(REGIONS)}")
    return PeerProbe(
        reachable=True,
        role=role,
        db_reachable=flag("db_reachable"),
        db_writable=flag("db_writable"),
        fenced=flag("fenced"),
        active=cast(Region | None, active),
        contact=flag("contact"),
    )


async def probe_db(region: Region, conn: Connection, timeout: float, database: str) -> DbProbe:  # noqa: ASYNC109 - the bound is the probe's own, applied inside with fail_after
    """One short session with ``region``'s database, connect included in ``timeout``."""
    started = time.monotonic()
    latency = 0.0
    stage = "connect"
    session: asyncpg.Connection | None = None
    row: asyncpg.Record | None = None
    try:
        with anyio.fail_after(timeout):
            session = await asyncpg.connect(**{**conn.asyncpg_kwargs(database), "timeout": timeout})
            stage = "query"
            row = await session.fetchrow(DB_PROBE_SQL)
            latency = time.monotonic() - started
            stage = "close"
            await session.close()
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        if stage != "close":  # a slow or failed goodbye after the answer arrived changes nothing
            why = f"timed out after {timeout:g} s" if isinstance(exc, TimeoutError) else _os_reason(exc)
            return DbProbe(
                region,
                reachable=False,
                latency_s=time.monotonic() - started,
                error=f"{stage} {conn.describe()}: {why}",
            )
    finally:
        if session is not None and not session.is_closed():
            session.terminate()  # timed out or cancelled from outside: drop the socket, never wait on it
    return _db_row(region, row, latency)


def _db_row(region: Region, row: asyncpg.Record | None, latency: float) -> DbProbe:
    if row is None:  # cannot happen (the query always returns one row); unreachable beats a crash
        return DbProbe(region, reachable=False, latency_s=latency, error="the probe query returned nothing")
    in_recovery = bool(row["in_recovery"])
    if in_recovery:
        timeline = row["received_tli"] or max(row["checkpoint_timeline"] or 0, row["min_recovery_timeline"] or 0)
    else:
        timeline = int(row["wal_timeline"], 16)
    receipt: datetime | None = row["last_msg_receipt_time"]
    return DbProbe(
        region,
        reachable=True,
        in_recovery=in_recovery,
        read_only=row["read_only"] == "on",
        timeline=int(timeline) or None,
        current_lsn=None if in_recovery else row["current_lsn"],
        receive_lsn=row["receive_lsn"] if in_recovery else None,
        replay_lsn=row["replay_lsn"] if in_recovery else None,
        last_receipt=receipt.astimezone(UTC) if receipt is not None else None,
        streaming=row["receiver_status"] == "streaming" if in_recovery else None,
        latency_s=latency,
    )
