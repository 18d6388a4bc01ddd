"""The backup service, the job manager and the event hub together, in process: a real folder repository, the
session's PostgreSQL cluster and an injected clock, wired by the composition root's own functions.

What is checked is the contract between the pieces, which no unit test sees: a job's outcome reaches the
journal through the event hub (in order, before later subscribers), timestamps come from the injected clock
and nowhere else, an observer's bug never fails the job it observes, and a failed drill's per-database
outcome survives into the job's result and the journal.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from kybdr_agent.backup import verbs
from kybdr_agent.backup.service import BackupOverrides
from kybdr_agent.config import AgentSettings
from kybdr_agent.events import BackupCompleted, DrillResult, Event, JobFinished
from kybdr_agent.jobs import Busy, JobStatus
from tests.component.harness import (
    IDLE_GRACE,
    T0,
    ManualClock,
    Recorder,
    break_backup,
    broken_subscriber,
    last_journal_record,
    running_agent,
)


@pytest.mark.anyio
async def test_a_backup_job_is_announced_journaled_and_stamped_by_the_injected_clock(
    settings: AgentSettings, clock: ManualClock, database: str
) -> None:
    """The daemon's path for one backup, end to end: the service publishes ``BackupCompleted``, the job
    manager's hook turns the finished job into ``JobFinished``, the journal (subscribed first) has appended
    it by the time the next subscriber sees it, and every timestamp is the injected clock's.

    The clock moves from T0 to T0+7 s the moment the backup completes, so a job stamped with the wrong
    reading (its start instead of its end, or the real time) shows up as a mismatch."""
    recorder = Recorder()
    journal_lines_seen: list[dict[str, object]] = []

    def late_subscriber(event: Event) -> None:
        if isinstance(event, BackupCompleted):
            clock.advance(timedelta(seconds=7))
        if isinstance(event, JobFinished):
            journal_lines_seen.append(last_journal_record(agent.journal))

    async with running_agent(settings, clock, [("recorder", recorder), ("late", late_subscriber)]) as agent:
        [job] = verbs.submit_backups(
            agent.jobs, agent.service, [database], BackupOverrides(labels=("manual",)), params={}, bounded=True
        )
        with pytest.raises(Busy, match="already has a job"):  # one job per database, whoever submits
            verbs.submit_backups(agent.jobs, agent.service, [database], BackupOverrides(), params={}, bounded=True)
        assert await agent.jobs.wait_idle(IDLE_GRACE)
        assert job.status is JobStatus.SUCCEEDED, job.error
        manifest = await agent.service.find(job.result["id"])

    assert [type(event) for event in recorder.events] == [BackupCompleted, JobFinished]
    completed, finished = recorder.events
    assert isinstance(completed, BackupCompleted)
    assert isinstance(finished, JobFinished)
    assert completed.backup_id == manifest.id == job.result["id"]
    assert completed.database == database
    assert completed.dump_bytes == manifest.dump_bytes > 0
    assert completed.stored_bytes == manifest.stored_bytes > 0
    assert completed.labels == ("manual",)

    # The record every subscriber got is the journal's last line, and it was already there for the one after it.
    assert finished.record["id"] == job.id
    assert finished.record["status"] == "succeeded"
    assert finished.record["via"] == "test"
    assert finished.record["result"]["id"] == manifest.id
    assert last_journal_record(agent.journal) == dict(finished.record)
    assert journal_lines_seen == [dict(finished.record)]

    later = T0 + timedelta(seconds=7)
    assert (manifest.started_at, manifest.finished_at) == (T0, T0)
    assert (job.created_at, job.started_at, job.finished_at) == (T0, T0, later)
    assert finished.record["created_at"] == T0.isoformat()
    assert finished.record["finished_at"] == later.isoformat()


@pytest.mark.anyio
async def test_a_subscriber_that_raises_neither_fails_the_job_nor_starves_the_next_subscriber(
    settings: AgentSettings, clock: ManualClock, database: str
) -> None:
    """The event hub's contract: an observer's bug (a metrics exporter, a full disk under an audit log) is
    logged and skipped. Subscribed before the journal, so a hub that stopped at the first failure would
    lose the job's record as well as the recorder's events."""
    recorder = Recorder()
    broken = [("broken", broken_subscriber)]
    async with running_agent(settings, clock, [("recorder", recorder)], ahead_of_journal=broken) as agent:
        assert [name for name, _ in agent.events.subscribers] == ["broken", "journal", "recorder"]
        [job] = verbs.submit_backups(agent.jobs, agent.service, [database], BackupOverrides(), params={}, bounded=True)

    assert job.status is JobStatus.SUCCEEDED, job.error
    assert [type(event) for event in recorder.events] == [BackupCompleted, JobFinished]
    assert recorder.of(BackupCompleted)[0].backup_id == job.result["id"]
    assert last_journal_record(agent.journal)["id"] == job.id


@pytest.mark.anyio
async def test_a_failed_drill_fails_its_job_and_keeps_every_databases_outcome(
    settings: AgentSettings, clock: ManualClock, database: str
) -> None:
    """A drill whose restore fails (the data object is gone) fails the job, and the job still answers which
    database failed and why: ``{"drills": [...]}`` in its result and in the journal's record, and a
    ``DrillResult`` event, as the API, ``stats`` and alerting read them."""
    recorder = Recorder()
    async with running_agent(settings, clock, [("recorder", recorder)]) as agent:
        [backup] = verbs.submit_backups(
            agent.jobs, agent.service, [database], BackupOverrides(), params={}, bounded=True
        )
        assert await agent.jobs.wait_idle(IDLE_GRACE)
        assert backup.status is JobStatus.SUCCEEDED, backup.error
        backup_id = backup.result["id"]
        await break_backup(agent.service, backup_id)

        drill = verbs.submit_drill(agent.jobs, agent.service, database, params={"database": database}, bounded=True)
        assert await agent.jobs.wait_idle(IDLE_GRACE)

    assert drill.status is JobStatus.FAILED
    assert drill.error is not None
    assert drill.error.startswith(f"restore drill failed: {database}: ")
    [outcome] = drill.result["drills"]
    assert outcome["database"] == database
    assert outcome["backup_id"] == backup_id
    assert outcome["passed"] is False
    assert outcome["error"]
    assert outcome["scratch_database"].startswith("kybdr_drill_")
    assert "cleanup_error" not in outcome  # the scratch database was dropped even though the restore failed

    [verdict] = recorder.of(DrillResult)
    assert (verdict.database, verdict.backup_id, verdict.passed) == (database, backup_id, False)
    assert verdict.error == outcome["error"]

    record = last_journal_record(agent.journal)
    assert (record["id"], record["kind"], record["status"]) == (drill.id, "test", "failed")
    assert record["result"] == {"drills": [outcome]}
