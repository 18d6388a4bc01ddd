"""Backups and restores through a faulty S3: errors, resets, lost answers, stalls and a random mix (issue 7).

Every run is the real CLI against moto behind the fault proxy, with a 2 s stall deadline and 5 MiB parts.
A backup must end one of two ways: completed, with the stored object exactly what its manifest records, or
failed with one clear line on stderr, exit 1 and no traceback; either way nothing is left in the bucket
beyond the completed backup, nothing outlives its deadline, and every retry is a bounded, logged
``s3.retry`` line. Backups that survived the most faults are then restored through the proxy under read
faults, and each restored database must equal the source. Each fault type's outcome goes to the fault
report (``python -m tests.faults.report``).

All backups of the module run side by side in one pool (``written``) and all restores in another
(``restored``): most faults are waits, so this keeps the module's wall time near its CPU time. The tests
then judge their own group of fault types.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kybdr_agent.postgres.cluster import Cluster
from tests.faultproxy import fault
from tests.faults.s3_helpers import Outcome, Plan, Suite, describe, open_suite, run_backups, run_restores
from tests.support import MotoServer

# How many runs each plan gets: a plan that picks its requests by position (every n-th, the first) injects
# the same faults into every run of it, so one run shows what it shows; a plan that picks by chance runs
# several times. (Each run is a real CLI backup through the proxy: the module's cost is their number.)
LISTINGS = ("ListObjectsV2", "ListMultipartUploads")
LOST_ANSWER_KINDS = ("CreateMultipartUpload", "CompleteMultipartUpload", "PutObject", "DeleteObject")

HTTP_ERRORS = [
    Plan(
        "503 SlowDown on UploadPart (p=0.4)",
        2,
        lambda where: [fault("UploadPart", "error", probability=0.4, where=where)],
        attempts=4,
    ),
    Plan(
        "500 InternalError on Create/CompleteMultipartUpload, PutObject, HeadObject (every 2nd)",
        1,
        lambda where: [
            fault(
                ("CreateMultipartUpload", "CompleteMultipartUpload", "PutObject", "HeadObject"),
                "error",
                every=2,
                status=500,
                code="InternalError",
                where=where,
            )
        ],
    ),
    Plan(
        "429 SlowDown on listings, HeadObject, DeleteObject (every 2nd)",
        1,
        lambda where: [fault((*LISTINGS, "HeadObject", "DeleteObject"), "error", every=2, status=429, where=where)],
    ),
]
PERMANENT = [
    Plan(
        "503 ServiceUnavailable on UploadPart (every attempt)",
        1,
        lambda where: [fault("UploadPart", "error", every=1, code="ServiceUnavailable", where=where)],
    ),
    Plan(
        "503 on UploadPart and AbortMultipartUpload (every attempt; next command sweeps)",
        1,
        lambda where: [fault(("UploadPart", "AbortMultipartUpload"), "error", every=1, where=where)],
        sweep_after=True,
    ),
]
RESETS = [
    Plan(
        "reset mid-request on UploadPart (every 2nd)",
        1,
        lambda where: [fault("UploadPart", "reset_request", every=2, where=where)],
    ),
    Plan(
        "reset mid-response on UploadPart (every 2nd)",
        1,
        lambda where: [fault("UploadPart", "reset_response", every=2, where=where)],
    ),
    Plan(
        "reset mid-response on the first Create/CompleteMultipartUpload, PutObject, DeleteObject",
        1,
        lambda where: [fault(kind, "reset_response", every=1, limit=1, where=where) for kind in LOST_ANSWER_KINDS],
    ),
    Plan(
        "reset mid-response on the first CompleteMultipartUpload, its retry answered NoSuchUpload",
        1,
        # What S3 may say to a retried completion of an upload that already became the object (moto
        # answers 200 again, so the proxy plays S3's part).
        lambda where: [
            fault("CompleteMultipartUpload", "reset_response", every=1, limit=1, where=where),
            fault("CompleteMultipartUpload", "error", every=2, limit=1, status=404, code="NoSuchUpload", where=where),
        ],
    ),
]
STALLS = [
    Plan(
        "stall (no answer) on UploadPart, CompleteMultipartUpload, PutObject (every 2nd, twice)",
        1,
        lambda where: [
            fault(("UploadPart", "CompleteMultipartUpload", "PutObject"), "stall", every=2, limit=2, where=where)
        ],
    ),
    Plan(
        "stall mid-request body on UploadPart (first attempt)",
        1,
        lambda where: [fault("UploadPart", "stall_body", every=1, limit=1, where=where)],
    ),
    Plan(
        "stall (no answer) on the first listing of each kind and the first HeadObject",
        1,
        lambda where: [fault(kind, "stall", every=1, limit=1, where=where) for kind in (*LISTINGS, "HeadObject")],
    ),
]
RANDOM = [
    Plan(
        "random mix on every request (503, 500, reset either way; p=0.05 each)",
        3,
        lambda where: [
            fault("*", "error", probability=0.05, where=where),
            fault("*", "error", probability=0.05, status=500, code="InternalError", where=where),
            fault("*", "reset_request", probability=0.05, where=where),
            fault("*", "reset_response", probability=0.05, where=where),
        ],
        attempts=4,
    ),
]
READS = [
    Plan(
        "reset mid-response on GetObject (every 2nd), restore",
        1,
        lambda where: [fault("GetObject", "reset_response", every=2, where=where)],
    ),
    Plan(
        "503 SlowDown on GetObject, HeadObject, listings (every 2nd), restore",
        1,
        lambda where: [fault(("GetObject", "HeadObject", *LISTINGS), "error", every=2, where=where)],
    ),
    Plan(
        "stall mid-response on GetObject (first two), restore",
        1,
        lambda where: [fault("GetObject", "stall_response", every=1, limit=2, where=where)],
    ),
    Plan(
        "throttled to 1000 kB/s on GetObject (6 MB, 2 s stall deadline), restore",
        1,
        lambda where: [fault("GetObject", "throttle", every=1, rate=1_000_000, where=where)],
    ),
]


READ_PERMANENT = [
    Plan(
        "503 SlowDown on GetObject (every attempt), restore",
        1,
        lambda where: [fault("GetObject", "error", every=1, where=where)],
    ),
]


@pytest.fixture(scope="module")
def suite(pg: Cluster, moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    workdir: Path = tmp_path_factory.mktemp("s3-faults")
    with open_suite(pg, moto_server, workdir) as opened:
        yield opened


@pytest.fixture(scope="module")
def written(suite: Suite) -> dict[str, Outcome]:
    outcomes = run_backups(suite, *HTTP_ERRORS, *PERMANENT, *RESETS, *STALLS, *RANDOM)
    return {outcome.plan.fault: outcome for outcome in outcomes}


@pytest.fixture(scope="module")
def restored(suite: Suite, written: dict[str, Outcome]) -> dict[str, Outcome]:
    """The completed backups that survived the most retries, restored under read faults."""
    survivors = sorted(
        (run for outcome in written.values() for run in outcome.runs if run.backup_id and not run.problems),
        key=lambda run: -len(run.events("s3.retry")),
    )
    plans = [*READS, *READ_PERMANENT]
    assert len(survivors) >= sum(plan.count for plan in plans), describe(r for o in written.values() for r in o.runs)
    outcomes = run_restores(suite, survivors, *plans)
    return {outcome.plan.fault: outcome for outcome in outcomes}


def check(outcomes: dict[str, Outcome], plans: list[Plan], *, all_complete: bool = True) -> list[Outcome]:
    """Every run ended cleanly; with ``all_complete``, every one completed; each tally is recorded."""
    mine = [outcomes[plan.fault] for plan in plans]
    problems = describe(run for outcome in mine for run in outcome.runs)
    for outcome in mine:
        counted = outcome.tally()
        counted.record()
        assert counted.hung == 0, f"{counted}\n{problems}"
        assert counted.left_behind == 0, f"{counted}\n{problems}"
        assert outcome.injected > 0, f"{outcome.plan.fault}: the proxy injected nothing"
        if all_complete:
            assert counted.restorable == counted.attempted, f"{counted}\n{problems}"
    assert not problems, problems
    return mine


def test_http_errors_are_retried(written: dict[str, Outcome]) -> None:
    # p=0.4 over 4 attempts can, rarely, fail a part for good: that must be a clean failure, not a completion.
    check(written, HTTP_ERRORS[:1], all_complete=False)
    for outcome in check(written, HTTP_ERRORS[1:]):
        for run in outcome.runs:
            assert run.events("s3.retry"), run.stderr[-2000:]


def test_permanent_errors_fail_cleanly_and_leave_nothing(written: dict[str, Outcome]) -> None:
    outcomes = check(written, PERMANENT, all_complete=False)
    for outcome, code in zip(outcomes, ("ServiceUnavailable", "SlowDown"), strict=True):
        (run,) = outcome.runs
        assert run.returncode == 1, run.stderr[-2000:]
        assert "uploading part" in run.message, run.message
        assert f"after 3 attempts: {code}" in run.message, run.message
        assert len([r for r in run.events("s3.retry") if "uploading part 1 " in r["operation"]]) == 2
    (abort_failed,) = outcomes[1].runs
    warnings = abort_failed.events("s3.abort_failed")
    assert warnings, abort_failed.stderr[-2000:]
    assert warnings[0]["note"].startswith("the next sweep (the agent's next housekeeping tick, or the next")


def test_resets_and_lost_answers_leave_one_backup_or_nothing(written: dict[str, Outcome]) -> None:
    """A reset while the request goes out, or after the store acted on it (the client cannot tell which):
    a retried create must not leave an upload behind, a retried complete must find the object it made."""
    outcomes = check(written, RESETS)
    for outcome in outcomes[2:]:
        for run in outcome.runs:
            retried = [r["operation"] for r in run.events("s3.retry")]
            assert any(op.startswith("starting the upload") for op in retried) or outcome is outcomes[3], retried
            assert any(op.startswith("completing the upload") for op in retried), retried
    (answered_no_such_upload,) = outcomes[3].runs
    assert answered_no_such_upload.events("s3.complete_answer_lost"), answered_no_such_upload.stderr[-2000:]


def test_stalls_are_cut_after_the_stall_deadline_and_retried(written: dict[str, Outcome]) -> None:
    for outcome in check(written, STALLS):
        for run in outcome.runs:
            reasons = [r["reason"] for r in run.events("s3.retry")]
            assert reasons, run.stderr[-2000:]
            assert all("no bytes moved for 2 s" in reason for reason in reasons), reasons


def test_a_random_mix_of_faults(written: dict[str, Outcome]) -> None:
    """Seeded chaos on every request kind; a backup may fail, but only cleanly."""
    check(written, RANDOM, all_complete=False)


def test_restores_through_read_faults_equal_the_source(restored: dict[str, Outcome]) -> None:
    """Ranged reads resume where a reset or stalled answer stopped; a slow but steady read is never cut."""
    outcomes = check(restored, READS)
    resumed = [r for outcome in outcomes[:3] for run in outcome.runs for r in run.events("s3.retry")]
    assert resumed, describe(run for outcome in outcomes for run in outcome.runs)
    (throttled,) = outcomes[3].runs
    assert throttled.events("s3.retry") == [], throttled.stderr[-2000:]


def test_a_restore_that_cannot_read_fails_cleanly(restored: dict[str, Outcome]) -> None:
    """No traceback, one line, and no target database (nor a scratch one) left behind."""
    (outcome,) = check(restored, READ_PERMANENT, all_complete=False)
    (run,) = outcome.runs
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.message.startswith("kybdr-agent: restore failed: "), run.message
    # The restore reads through the repository its source backup was written to (the survivor with the most
    # retries, so which one is a matter of timing), with that repository's max_attempts.
    assert f"after {run.repo.attempts} attempts: SlowDown" in run.message, run.message
