"""Floods against the real agent: every kind of job has a concurrency limit and a bounded queue, beyond
which requests are refused (429, or 409 when the same work is already queued or running) with
``Retry-After``; /healthz answers throughout; the agent's memory returns after the work is done; and
``GET /v1/backup/stats`` is answered from memory, not by re-reading the whole journal on every call.

Memory is read from /proc/<pid>/status (VmRSS) with a generous bound; nothing here asserts a speed.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kybdr_agent.postgres.cluster import Cluster
from tests.daemon_support import Response
from tests.faults.report import FaultTally
from tests.faults.test_api_common import Agent, databases, rss_kib, start_agent, wait_until_idle
from tests.support import create_incompressible_database, create_mixed_database, unique_db

FLOOD: int = 60


@pytest.fixture(scope="module")
def big_db(pg: Cluster) -> str:
    name = unique_db("flood")
    create_incompressible_database(pg, name, megabytes=24)
    return name


@pytest.fixture(scope="module")
def small_db(pg: Cluster) -> str:
    name = unique_db("floodsmall")
    create_mixed_database(pg, name, rows=200)
    return name


@pytest.fixture
def agent(pg: Cluster, tmp_path: Path, key_file: Path, big_db: str) -> Iterator[Agent]:
    running = start_agent(tmp_path, pg, key_file, databases=[big_db])
    yield running
    running.stop()


def _flood(agent: Agent, count: int, send: Callable[[int], Response]) -> tuple[list[Response], int]:
    """``count`` requests at once (released together by a barrier) while /healthz is polled alongside;
    returns the answers and how many health probes failed to answer."""
    barrier = threading.Barrier(count)
    health_failures = 0
    stop = threading.Event()

    def one(i: int) -> Response:
        barrier.wait(timeout=60)
        return send(i)

    def probe() -> None:
        nonlocal health_failures
        while not stop.is_set():
            if not agent.healthy(timeout=30):
                health_failures += 1
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        with ThreadPoolExecutor(max_workers=count) as pool:
            answers = list(pool.map(one, range(count)))
    finally:
        stop.set()
        prober.join(60)
    return answers, health_failures


def _steady(stats: dict[str, object]) -> dict[str, object]:
    """A stats answer without what moves by itself (the clock, and ages computed from it)."""
    steady = {k: v for k, v in stats.items() if k != "generated_at"}
    steady["databases"] = {
        db: {k: v for k, v in entry.items() if k != "last_good_age_seconds"}
        for db, entry in stats["databases"].items()  # type: ignore[attr-defined]
    }
    return steady


def _refused_properly(resp: Response) -> bool:
    retry = resp.headers.get("retry-after", "")
    return (
        resp.status in (409, 429)
        and resp.headers.get("content-type", "").startswith("application/problem+json")
        and retry.isdigit()
        and int(retry) > 0
    )


def test_a_flood_of_full_validations_is_bounded_and_memory_returns(agent: Agent) -> None:
    """Issue 8: 60 concurrent full validations ran at once (65 MB to 908 MB, and it stayed there)."""
    ids = []
    for _ in range(8):  # more distinct validations than may run and wait: some 429s, some 409s (repeats)
        made = agent.request("POST", "/v1/backup?wait=true", {})
        assert made.status == 200, made.body
        ids.append(made.body["jobs"][0]["result"]["id"])
    warm = agent.request("POST", f"/v1/backup/{ids[0]}/validate?wait=true", {"level": "full"})
    assert warm.body["jobs"][0]["status"] == "succeeded", warm.body
    baseline = rss_kib(agent.pid)
    before = len(agent.jobs())

    answers, health_failures = _flood(
        agent,
        FLOOD,
        lambda i: agent.request("POST", f"/v1/backup/{ids[i % len(ids)]}/validate", {"level": "full"}),
    )
    statuses = Counter(a.status for a in answers)
    accepted = [a.body["job_id"] for a in answers if a.status == 202]
    refused = [a for a in answers if a.status != 202]
    jobs = wait_until_idle(agent)
    after = rss_kib(agent.pid)
    finished = {j["id"]: j["status"] for j in jobs}

    tally = FaultTally(
        fault="api: flood of full validations",
        injected=FLOOD,
        failed_cleanly=0,
        hung=health_failures,
        left_behind=len(jobs) - before - len(accepted),  # a refused request that still made a job
    )
    assert all(_refused_properly(r) for r in refused), [(r.status, r.headers, r.body) for r in refused[:3]]
    assert statuses[202] <= 6, statuses  # 2 running + 4 queued at most, and one per backup and level
    assert statuses[429], statuses
    assert statuses[409], statuses
    assert all(finished[job_id] == "succeeded" for job_id in accepted), jobs[:3]
    # Memory returns near where it was: a generous bound (allocator slack), not the flood's peak.
    assert after <= baseline + 96 * 1024, (baseline, after)
    tally.assert_clean()


def test_a_flood_of_cleanups_runs_one_and_refuses_the_rest(agent: Agent) -> None:
    """Issue 8: 3,416 cleanup jobs were accepted in 90 s; a second cleanup does the same work: 409."""
    made = agent.request("POST", "/v1/backup?wait=true", {})
    assert made.status == 200, made.body
    before = len(agent.jobs())
    answers, health_failures = _flood(
        agent, FLOOD, lambda i: agent.request("POST", "/v1/backup/cleanup", {"dry_run": True})
    )
    accepted = [a for a in answers if a.status == 202]
    refused = [a for a in answers if a.status != 202]
    jobs = wait_until_idle(agent)
    tally = FaultTally(
        fault="api: flood of cleanups",
        injected=FLOOD,
        hung=health_failures,
        left_behind=len(jobs) - before - len(accepted),
    )
    assert refused, Counter(a.status for a in answers)
    assert all(r.status == 409 and _refused_properly(r) for r in refused), refused[0]
    assert refused[0].body["type"].endswith("/conflict")
    tally.assert_clean()


def test_floods_of_other_kinds_are_refused_beyond_their_bounds(
    pg: Cluster, tmp_path: Path, key_file: Path, small_db: str
) -> None:
    """Backups of made-up databases, restore drills and restores: each kind is bounded; the total queue too."""
    agent = start_agent(tmp_path, pg, key_file, databases=[small_db])
    try:
        made = agent.request("POST", "/v1/backup?wait=true", {})
        assert made.status == 200, made.body
        backup_id = made.body["jobs"][0]["result"]["id"]
        before = len(agent.jobs())
        targets = [unique_db("floodrestore") for _ in range(FLOOD)]
        sends: list[Callable[[int], Response]] = [
            lambda i: agent.request("POST", "/v1/backup", {"database": f"nope_{i}"}),
            lambda i: agent.request("POST", "/v1/backup/test", {}),
            lambda i: agent.request("POST", f"/v1/backup/{backup_id}/restore", {"target_database": targets[i]}),
        ]
        accepted = 0
        refused: list[Response] = []
        hung = 0
        for send in sends:
            answers, failures = _flood(agent, FLOOD, send)
            hung += failures
            accepted += sum(a.status == 202 for a in answers)
            refused += [a for a in answers if a.status != 202]
            wait_until_idle(agent)
        jobs = agent.jobs()
        restored = [t for t in targets if t in databases(pg)]
        tally = FaultTally(
            fault="api: floods of backups, drills, restores",
            injected=3 * FLOOD,
            hung=hung,
            left_behind=len(jobs) - before - accepted,
        )
        assert all(_refused_properly(r) for r in refused), [(r.status, r.body) for r in refused[:3]]
        assert accepted <= 3 * 16, accepted
        assert {r.status for r in refused} == {409, 429}, Counter(r.status for r in refused)
        assert len(restored) == sum(1 for j in jobs if j["kind"] == "restore" and j["status"] == "succeeded")
        for name in restored:
            pg.psql("postgres", f'drop database "{name}"')
        tally.assert_clean()
    finally:
        agent.stop()


def test_stats_come_from_memory_and_survive_the_journal_going_away(agent: Agent, big_db: str) -> None:
    """Issue 8: every stats call re-parsed the whole journal. The daemon keeps the aggregate in memory
    (rebuilt from the journal at start, updated as jobs finish), so removing the journal file under a
    running agent changes no answer, and 200 parallel stats calls leave /healthz answering."""
    made = agent.request("POST", "/v1/backup?wait=true", {})
    assert made.status == 200
    failed = agent.request("POST", "/v1/backup?wait=true", {"database": "no_such_database_here"})
    assert failed.body["jobs"][0]["status"] == "failed"
    drill = agent.request("POST", "/v1/backup/test?wait=true", {})
    assert drill.body["jobs"][0]["status"] == "succeeded", drill.body
    first = agent.request("GET", "/v1/backup/stats").body
    assert first["by_outcome"] == {"succeeded": 1, "failed": 1, "cancelled": 0}
    assert first["backups"]["count"] == 1
    assert first["last_failure"]["database"] == "no_such_database_here"
    assert first["last_drill"]["status"] == "succeeded"

    journal = agent.tmp_path / "state" / "journal.jsonl"
    journal.rename(journal.with_name("moved-away.jsonl"))
    answers, health_failures = _flood(agent, 200, lambda i: agent.request("GET", "/v1/backup/stats"))
    assert health_failures == 0
    assert {a.status for a in answers} == {200}
    second = answers[0].body
    assert _steady(second) == _steady(first)
    assert second["databases"][big_db]["last_good_id"] == made.body["jobs"][0]["result"]["id"]

    # A new outcome updates the aggregate (and the catalog cache) at once.
    again = agent.request("POST", "/v1/backup?wait=true", {})
    assert again.status == 200
    third = agent.request("GET", "/v1/backup/stats").body
    assert third["by_outcome"]["succeeded"] == 2
    assert third["backups"]["count"] == 2
    assert json.loads(journal.read_text().splitlines()[-1])["kind"] == "backup"
