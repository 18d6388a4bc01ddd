"""Bug 2 of issue 7: the stall deadline is time without bytes moving, not a bound on the whole request.

A link slower than part size / request timeout, but steady, must complete; one where bytes stop moving must
fail within a bounded time, saying so. The stall deadline is 2 s and parts are 5 MiB, so at 1 MB/s each part
takes well over twice the deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kybdr_agent.pgcluster import Cluster
from tests.faultproxy import fault
from tests.faults.s3_helpers import Suite, describe, open_suite, restore_matches, run_backups, tally
from tests.support import MotoServer

STALL_DEADLINE = 2
ATTEMPTS = 2


@pytest.fixture(scope="module")
def suite(pg: Cluster, moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    workdir: Path = tmp_path_factory.mktemp("s3-slow-link")
    with open_suite(pg, moto_server, workdir) as opened:
        yield opened


def test_a_slow_but_steady_link_completes(suite: Suite) -> None:
    runs, injected = run_backups(
        suite,
        "slow",
        1,
        lambda where: [fault("UploadPart", "throttle", every=1, rate=1_000_000, where=where)],
        request_timeout=STALL_DEADLINE,
        attempts=ATTEMPTS,
        deadline=120,
    )
    counted = tally("slow link 1 MB/s on UploadPart (5 MiB parts, 2 s stall deadline)", runs, injected)
    run = runs[0]
    assert run.returncode == 0, run.stderr[-3000:]
    assert injected >= 2
    assert run.events("s3.retry") == [], "bytes kept moving, so no attempt should have been cut"
    assert not run.problems, describe(runs)
    assert run.backup_id is not None
    assert restore_matches(suite, run.repo.direct, run.backup_id) is None
    counted.assert_clean()


@pytest.mark.parametrize(
    "action",
    ["stall_body", "stall"],
    ids=["bytes stop mid-body", "body sent, no answer"],
)
def test_a_stalled_link_fails_saying_no_bytes_moved(suite: Suite, action: str) -> None:
    runs, injected = run_backups(
        suite,
        "stalled",
        1,
        lambda where: [fault("UploadPart", action, every=1, where=where)],  # type: ignore[arg-type]
        request_timeout=STALL_DEADLINE,
        attempts=ATTEMPTS,
        deadline=60,
    )
    counted = tally(
        f"{'stall mid-request body' if action == 'stall_body' else 'stall (no answer)'} on UploadPart, every attempt",
        runs,
        injected,
    )
    run = runs[0]
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"no bytes moved for {STALL_DEADLINE} s" in run.message, run.message
    retries = run.events("s3.retry")
    assert [r["attempt"] for r in retries if "uploading part" in r["operation"]], run.stderr[-3000:]
    # Each attempt ends a stall deadline after the bytes stopped; with backoff, start-up and the abort, far
    # less than this bound (what matters is that it is bounded at all).
    assert run.seconds < 45, run.seconds
    assert not run.problems, describe(runs)
    counted.assert_clean()
