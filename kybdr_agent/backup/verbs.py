"""Each backup verb as a job, in one place: the scheduler, the control API and the in-process CLI all submit
work through these functions, so a backup, a restore or a drill is the same job — the same limits, the same
result document, the same record in the journal — whoever asked for it.

The service is passed at submit time (a reload swaps it; a job keeps the one it started with). Every result
is JSON-shaped (``catalog.manifest_document`` for manifests). A failed validation or drill keeps its result
(``JobFailed``): the checks that failed, and every database's drill outcome, are part of the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kybdr_agent.backup.catalog import manifest_document
from kybdr_agent.backup.physical import PHYSICAL_JOB_DATABASE
from kybdr_agent.backup.regions import Region
from kybdr_agent.backup.selection import Selection
from kybdr_agent.backup.service import BackupOverrides, BackupService
from kybdr_agent.backup.verify import Level
from kybdr_agent.jobs import Job, JobFailed, JobManager, Submission


def submit_backups(
    jobs: JobManager,
    service: BackupService,
    databases: Sequence[str],
    overrides: BackupOverrides,
    *,
    params: dict[str, Any],
    bounded: bool,
) -> list[Job]:
    """One backup job per database, admitted all together or not at all."""

    def work_for(database: str) -> Callable[[Job], Any]:
        async def work(job: Job) -> Any:
            made = await service.backup(database, overrides, progress=job.progress)
            return manifest_document(made)

        return work

    items = [Submission(work_for(database), params, database) for database in databases]
    return jobs.submit_all("backup", items, bounded=bounded)


def submit_physical_backup(
    jobs: JobManager, service: BackupService, overrides: BackupOverrides, *, params: dict[str, Any], bounded: bool
) -> Job:
    """A physical base backup of the cluster the DSN reaches; one at a time (its job's database is the cluster)."""

    async def work(job: Job) -> Any:
        made = await service.backup_physical(overrides, progress=job.progress)
        return manifest_document(made)

    return jobs.submit("backup", work, params=params, database=PHYSICAL_JOB_DATABASE, bounded=bounded)


def submit_restore(
    jobs: JobManager,
    service: BackupService,
    backup_id: str,
    target: str,
    *,
    force: bool,
    no_owner: bool,
    with_globals: bool = False,
    restore_jobs: int = 1,
    spool_dir: Path | None = None,
    notice: Callable[[str], None] | None = None,
    region: Region | None = None,
    selection: Selection | None = None,
    into_existing: bool = False,
    rename_to: str | None = None,
) -> Job:
    """Restore into ``target``; each notice (what ``--force`` will do) shows as the job's stage as it happens."""

    async def work(job: Job) -> Any:
        job.progress.stage = "restoring"

        def on_notice(message: str) -> None:
            job.progress.stage = message
            if notice is not None:
                notice(message)

        result = await service.restore(
            backup_id,
            target,
            force=force,
            no_owner=no_owner,
            with_globals=with_globals,
            jobs=restore_jobs,
            spool_dir=spool_dir,
            notice=on_notice,
            region=region,
            selection=selection,
            into_existing=into_existing,
            rename_to=rename_to,
        )
        return dict(result.__dict__)

    params = {
        "backup_id": backup_id,
        "target_database": target,
        "force": force,
        "no_owner": no_owner,
        "with_globals": with_globals,
        "jobs": restore_jobs,
    }
    if region is not None:
        params["region"] = region
    if selection is not None:
        params.update(tables=list(selection.tables), schemas=list(selection.schemas))
        if into_existing:
            params.update(into_existing=True, rename_to=rename_to)
    return jobs.submit("restore", work, params=params, database=target, bounded=True)


def submit_validate(
    jobs: JobManager, service: BackupService, backup_id: str, level: Level, region: Region | None = None
) -> Job:
    async def work(job: Job) -> Any:
        result = await service.validate(backup_id, level, region)
        if not result.ok:
            raise JobFailed(result.error or "validation failed", dict(result.__dict__))
        return dict(result.__dict__)

    params = {"backup_id": backup_id, "level": level}
    if region is not None:
        params["region"] = region
    return jobs.submit("validate", work, params=params, key=(backup_id, level, region), bounded=True)


def submit_cleanup(jobs: JobManager, service: BackupService, *, dry_run: bool) -> Job:
    async def work(job: Job) -> Any:
        return await service.cleanup(dry_run=dry_run)

    return jobs.submit("cleanup", work, params={"dry_run": dry_run}, bounded=True)


def busy_databases(jobs: JobManager) -> frozenset[str]:
    """Databases with a backup running: its own copy to DR is under way, a backfill leaves them alone."""
    return frozenset(job.database for job in jobs.running() if job.kind == "backup" and job.database)


def submit_backfill(jobs: JobManager, service: BackupService, *, limit: int) -> Job:
    """Copy to the DR bucket what an outage left uncopied (the pass housekeeping also runs)."""

    async def work(job: Job) -> Any:
        result = await service.backfill(limit=limit, skip_databases=busy_databases(jobs))
        if result["failed"]:
            raise JobFailed("; ".join(result["failed"].values()), result)
        return result

    return jobs.submit("backfill", work, params={"limit": limit}, key=("backfill",), bounded=True)


def submit_drill(
    jobs: JobManager, service: BackupService, database: str | None, *, params: dict[str, Any], bounded: bool
) -> Job:
    """A restore drill of each database's newest backup (or one database's)."""

    async def work(job: Job) -> Any:
        results = await service.drill(database)
        failed = [r for r in results if not r.get("passed")]
        if failed:
            message = "restore drill failed: " + "; ".join(f"{r['database']}: {r.get('error')}" for r in failed)
            raise JobFailed(message, {"drills": results})
        return {"drills": results}

    return jobs.submit("test", work, params=params, bounded=bounded)
