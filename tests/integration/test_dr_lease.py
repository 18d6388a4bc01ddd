"""The DR lease (kybdr_agent/dr/lease.py) and the conditional writes under it, against a folder repository
and against S3 on moto_server over HTTP.

Contention on S3 is exercised in turn (one agent after another) rather than by simultaneous requests:
moto's server checks a precondition and stores the object in two steps without a lock, so two truly
simultaneous conditional PUTs can both pass there (AWS S3 decides them atomically). The folder store's
atomicity is tested with simultaneous contenders in several threads.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from kybdr_agent.dr.lease import DrLease, LeaseRecord
from kybdr_agent.postgres.cluster import free_port
from kybdr_agent.storage.base import BlobStore
from kybdr_agent.storage.local import LocalStore
from kybdr_agent.storage.retry import RetryPolicy
from kybdr_agent.storage.s3 import S3Options, S3Store
from tests.faultproxy import FaultProxy, fault
from tests.support import MotoServer, SteppedClock

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(seconds=30)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _s3(endpoint: str, bucket: str, *, attempts: int = 3, timeout: float = 10.0) -> S3Store:
    """As kybdr_agent/app.py ``_open_store`` opens an s3:// repository (path-style, which the fault
    proxy's request classifier reads)."""
    return await S3Store.open(
        S3Options(
            bucket=bucket,
            prefix="agents",
            region="us-east-1",
            endpoint_url=endpoint,
            addressing_style="path",
            connect_timeout=timeout,
            request_timeout=timeout,
            retry=RetryPolicy(attempts=attempts, base_delay=0.01, attempt_deadline=timeout),
        )
    )


@pytest.fixture(params=["file", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "file":
        yield LocalStore(tmp_path / "repo")
        return
    moto: MotoServer = request.getfixturevalue("moto_server")
    s3 = await _s3(moto.endpoint, request.getfixturevalue("bucket"))
    try:
        yield s3
    finally:
        await s3.aclose()


@pytest.mark.anyio
async def test_conditional_writes(store: BlobStore) -> None:
    assert await store.get_with_etag("dr/x", max_size=100) is None
    first = await store.put_if_absent("dr/x", b"one")
    assert first is not None
    assert await store.put_if_absent("dr/x", b"two") is None
    assert await store.get_with_etag("dr/x", max_size=100) == (b"one", first)
    second = await store.put_if_match("dr/x", b"three", first)
    assert second is not None
    assert second != first
    assert await store.put_if_match("dr/x", b"four", first) is None  # stale etag: not written
    assert await store.put_if_match("dr/missing", b"five", first) is None  # nothing to match
    assert await store.get_with_etag("dr/x", max_size=100) == (b"three", second)
    assert await store.get_with_etag("dr/missing", max_size=100) is None
    assert await store.get_bytes("dr/x", max_size=100) == b"three"


@pytest.mark.anyio
async def test_two_contenders_only_one_holds(store: BlobStore) -> None:
    clock = SteppedClock(T0)
    a = DrLease(store, holder="agent-a", ttl=TTL, clock=clock)
    b = DrLease(store, holder="agent-b", ttl=TTL, clock=clock)
    assert await a.acquire_or_renew()
    assert not await b.acquire_or_renew()
    clock.advance(10)
    assert await a.acquire_or_renew()  # renewing keeps it
    assert a.held_until == clock.now + TTL
    clock.advance(25)  # past the first expiry, within the renewed one
    assert not await b.acquire_or_renew()
    held = await b.holder()
    assert held is not None
    assert held.holder == "agent-a"
    assert held.expires_at == T0 + timedelta(seconds=10) + TTL
    assert held.acquired_at == T0  # a renewal keeps when it was first taken
    assert held.live(clock.now)
    raw = await store.get_bytes("dr/lease", max_size=1 << 16)
    body = json.loads(raw)
    assert set(body) >= {"holder", "host", "pid", "acquired_at", "renewed_at", "expires_at"}


@pytest.mark.anyio
async def test_expired_lease_is_stolen_and_the_old_holder_loses_it(store: BlobStore) -> None:
    clock = SteppedClock(T0)
    a = DrLease(store, holder="agent-a", ttl=TTL, clock=clock)
    b = DrLease(store, holder="agent-b", ttl=TTL, clock=clock)
    assert await a.acquire_or_renew()
    clock.advance(TTL.total_seconds())  # expires_at reached: no longer live
    assert await b.acquire_or_renew()
    assert not await a.acquire_or_renew()  # its renewal finds b's live lease
    assert a.held_until is None
    held = await a.holder()
    assert held is not None
    assert held.holder == "agent-b"
    # a restarted b (a new object, same name) resumes its own lease rather than waiting it out
    b2 = DrLease(store, holder="agent-b", ttl=TTL, clock=clock)
    assert await b2.acquire_or_renew()


@pytest.mark.anyio
async def test_a_stale_read_never_overwrites(store: BlobStore) -> None:
    """The steal is a compare-and-swap on the version read: if the lease changed in between (its holder
    renewed, or a third agent took it), the steal fails."""
    clock = SteppedClock(T0)
    a = DrLease(store, holder="agent-a", ttl=TTL, clock=clock)
    assert await a.acquire_or_renew()
    found = await store.get_with_etag("dr/lease", max_size=1 << 16)
    assert found is not None
    _, read_etag = found
    clock.advance(TTL.total_seconds() - 1)
    assert await a.acquire_or_renew()  # renewed after the read
    stolen = LeaseRecord(holder="agent-c", expires_at=clock.now + TTL, etag=None)
    assert await store.put_if_match("dr/lease", stolen.to_json(), read_etag) is None
    held = await a.holder()
    assert held is not None
    assert held.holder == "agent-a"


@pytest.mark.anyio
async def test_release_lets_the_next_agent_in_at_once(store: BlobStore) -> None:
    clock = SteppedClock(T0)
    a = DrLease(store, holder="agent-a", ttl=TTL, clock=clock)
    b = DrLease(store, holder="agent-b", ttl=TTL, clock=clock)
    assert await a.acquire_or_renew()
    await a.release()
    assert a.held_until is None
    held = await b.holder()
    assert held is not None
    assert not held.live(clock.now)
    assert await b.acquire_or_renew()
    await a.release()  # holds nothing: a no-op, never clobbers b's lease
    held = await b.holder()
    assert held is not None
    assert held.holder == "agent-b"
    assert held.live(clock.now)


@pytest.mark.anyio
async def test_an_unreadable_lease_is_taken_over_conditionally(store: BlobStore) -> None:
    await store.put_bytes("dr/lease", b"{not a lease")
    clock = SteppedClock(T0)
    a = DrLease(store, holder="agent-a", ttl=TTL, clock=clock)
    assert await a.holder() is None
    assert await a.acquire_or_renew()
    held = await a.holder()
    assert held is not None
    assert held.holder == "agent-a"


@pytest.mark.anyio
async def test_a_holder_cut_off_from_the_store_holds_until_its_expiry_only(
    moto_server: MotoServer, bucket: str
) -> None:
    clock = SteppedClock(T0)
    good = await _s3(moto_server.endpoint, bucket)
    dead = await _s3(f"http://127.0.0.1:{free_port()}", bucket, attempts=1, timeout=2)
    try:
        a = DrLease(good, holder="agent-a", ttl=TTL, clock=clock)
        assert await a.acquire_or_renew()
        a.store = dead  # the repository becomes unreachable
        clock.advance(20)
        assert await a.acquire_or_renew()  # cannot renew, but nobody may take it before its expiry
        clock.advance(10)
        assert not await a.acquire_or_renew()  # expired: another agent may have it now
        a.store = good
        b = DrLease(good, holder="agent-b", ttl=TTL, clock=clock)
        assert await b.acquire_or_renew()
    finally:
        await dead.aclose()
        await good.aclose()


@pytest.mark.anyio
async def test_a_lost_answer_to_a_conditional_put_is_recognised(moto_server: MotoServer, bucket: str) -> None:
    """S3 applied the conditional PUT but the answer was lost (connection reset mid-response): the retry
    fails its own precondition, and the store reads back to find the object is ours — the lease is held,
    not wrongly reported lost (and never written twice)."""
    with FaultProxy(moto_server.endpoint, seed=3) as proxy:
        rule = proxy.add(fault("PutObject", "reset_response", every=1, limit=1, where=bucket))
        store = await _s3(proxy.endpoint, bucket)
        try:
            clock = SteppedClock(T0)
            a = DrLease(store, holder="agent-a", ttl=TTL, clock=clock)
            assert await a.acquire_or_renew()  # created through put_if_absent, answer lost once
            assert rule.hits == 1
            clock.advance(5)
            rule.hits = 0  # arm it again
            assert await a.acquire_or_renew()  # renewed through put_if_match, answer lost once
            assert rule.hits == 1
            held = await a.holder()
            assert held is not None
            assert held.etag == (await store.get_with_etag("dr/lease", max_size=1 << 16) or (b"", ""))[1]
            assert held.renewed_at == clock.now
            b = DrLease(store, holder="agent-b", ttl=TTL, clock=clock)
            assert not await b.acquire_or_renew()
        finally:
            await store.aclose()


def test_simultaneous_contenders_on_a_folder_repository(tmp_path: Path) -> None:
    """Eight agents in eight threads, each with its own event loop, start together: exactly one holds."""
    store = LocalStore(tmp_path / "repo")
    clock = SteppedClock(T0)
    barrier = threading.Barrier(8)
    results: dict[str, bool] = {}

    def contend(name: str) -> None:
        async def run() -> None:
            lease = DrLease(store, holder=name, ttl=TTL, clock=clock)
            barrier.wait()
            results[name] = await lease.acquire_or_renew()

        anyio.run(run)

    threads = [threading.Thread(target=contend, args=(f"agent-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [name for name, won in results.items() if won]
    assert len(results) == 8
    assert len(winners) == 1
    # and an expired lease stolen by all at once: again exactly one
    clock.advance(TTL.total_seconds() + 1)
    barrier.reset()
    results.clear()
    threads = [threading.Thread(target=contend, args=(f"thief-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results.values()) == 1
