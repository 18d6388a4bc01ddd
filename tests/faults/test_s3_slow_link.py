"""Bug 2 of issue 7: the stall deadline is time without bytes moving, not a bound on the whole request.

A link slower than part size / request timeout, but steady, must complete; one where bytes stop moving must
fail within a bounded time, saying so. The stall deadline is 2 s and parts are 5 MiB, so at 1 MB/s each part
takes well over twice the deadline. The three backups run side by side (``runs``); the tests judge each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kybdr_agent.postgres.cluster import Cluster
from tests.faultproxy import Action, Fault, fault
from tests.faults.s3_helpers import Outcome, Plan, Suite, describe, open_suite, restore_matches, run_backups
from tests.support import MotoServer

STALL_DEADLINE = 2
ATTEMPTS = 2
SLOW = Plan(
    "slow link 1 MB/s on UploadPart (5 MiB parts, 2 s stall deadline)",
    1,
    lambda where: [fault("UploadPart", "throttle", every=1, rate=1_000_000, where=where)],
    request_timeout=STALL_DEADLINE,
    attempts=ATTEMPTS,
    deadline=120,
)


def every_part_attempt(action: Action) -> Callable[[str], list[Fault]]:
    return lambda where: [fault("UploadPart", action, every=1, where=where)]


STALL_ACTIONS: tuple[tuple[str, Action], ...] = (
    ("stall mid-request body", "stall_body"),
    ("stall (no answer)", "stall"),
)


STALLED = [
    Plan(
        f"{name} on UploadPart, every attempt",
        1,
        every_part_attempt(action),
        request_timeout=STALL_DEADLINE,
        attempts=ATTEMPTS,
        deadline=60,
    )
    for name, action in STALL_ACTIONS
]


@pytest.fixture(scope="module")
def suite(pg: Cluster, moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    workdir: Path = tmp_path_factory.mktemp("s3-slow-link")
    with open_suite(pg, moto_server, workdir) as opened:
        yield opened


@pytest.fixture(scope="module")
def runs(suite: Suite) -> dict[str, Outcome]:
    return {outcome.plan.fault: outcome for outcome in run_backups(suite, SLOW, *STALLED)}


def test_a_slow_but_steady_link_completes(suite: Suite, runs: dict[str, Outcome]) -> None:
    outcome = runs[SLOW.fault]
    (run,) = outcome.runs
    assert run.returncode == 0, run.stderr[-3000:]
    assert outcome.injected >= 2
    assert run.events("s3.retry") == [], "bytes kept moving, so no attempt should have been cut"
    assert not run.problems, describe(outcome.runs)
    assert run.backup_id is not None
    assert restore_matches(suite, run.repo.direct, run.backup_id) is None
    outcome.tally().assert_clean()


def test_a_stalled_link_fails_saying_no_bytes_moved(runs: dict[str, Outcome]) -> None:
    """Bytes stop part-way through the body, or the body is taken and no answer ever comes: each attempt
    ends a stall deadline later, the retry is logged, and the backup fails saying so, in bounded time."""
    for plan, phase in zip(STALLED, ("sending the request", "awaiting the answer"), strict=True):
        outcome = runs[plan.fault]
        (run,) = outcome.runs
        assert run.returncode == 1, run.stderr[-3000:]
        assert f"no bytes moved for {STALL_DEADLINE} s ({phase})" in run.message, run.message
        retries = [r for r in run.events("s3.retry") if r["operation"].startswith("uploading part")]
        assert retries, run.stderr[-3000:]
        assert all(f"no bytes moved for {STALL_DEADLINE} s" in r["reason"] for r in retries), retries
        # Each attempt ends a stall deadline after the bytes stopped; with backoff, start-up and the abort
        # that is far below this bound — what matters is that there is one.
        assert run.seconds < 45, run.seconds
        assert not run.problems, describe(outcome.runs)
        outcome.tally().assert_clean()
