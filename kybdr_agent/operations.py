"""The CLI's verbs, done either by a running agent (over its control socket) or in this process.

When an agent listens on ``control.socket`` the CLI asks it. Without one, the verbs run here — built by the
same composition root (``app.in_process``) and submitted as jobs through the same ``backup.verbs`` the API
uses — so the one-shot commands keep working on a host where the agent is not installed as a service, and
their jobs are limited and journaled like the agent's. Both backends return the same JSON-shaped results.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any, Protocol

import anyio

from kybdr_agent import app
from kybdr_agent.app import LocalAgent
from kybdr_agent.backup import verbs
from kybdr_agent.backup.regions import Region
from kybdr_agent.backup.selection import Selection
from kybdr_agent.backup.service import BackupOverrides
from kybdr_agent.backup.verify import Level
from kybdr_agent.config import AgentSettings
from kybdr_agent.control.client import ControlClient
from kybdr_agent.errors import ConfigError, KybdrError
from kybdr_agent.jobs import Job, JobStatus
from kybdr_agent.telemetry.logs import WARNING, stderr_line


class Operations(Protocol):
    async def __aenter__(self) -> Operations: ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def backup(
        self, databases: list[str] | None, description: str | None, physical: bool = False
    ) -> list[dict[str, Any]]: ...
    async def list(self, database: str | None, region: Region | None = None) -> dict[str, Any]: ...
    async def show(self, backup_id: str, region: Region | None = None) -> dict[str, Any]: ...
    async def restore(
        self,
        backup_id: str,
        target: str,
        force: bool,
        no_owner: bool,
        with_globals: bool = False,
        jobs: int = 1,
        region: Region | None = None,
        selection: Selection | None = None,
        rename_to: str | None = None,
    ) -> dict[str, Any]: ...
    async def contents(self, backup_id: str, region: Region | None = None) -> dict[str, Any]: ...
    async def validate(self, backup_id: str, level: Level, region: Region | None = None) -> dict[str, Any]: ...
    async def backfill(self, limit: int) -> dict[str, Any]: ...
    async def cleanup(self, dry_run: bool) -> dict[str, Any]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def test(self, database: str | None) -> dict[str, Any]: ...
    async def status(self) -> dict[str, Any]: ...


class LocalOperations:
    """In this process: the same service, jobs and journal the agent would use (``app.in_process``), the same
    verbs the API submits (``backup.verbs``), so results, limits and the journal record are the agent's.

    Each command first sweeps the repository of what dead backups left (``backup/sweep.py``): a host where
    no daemon runs still never keeps an orphaned upload. A sweep that fails is reported and the command
    goes on, since the command itself may be how the operator finds out what is wrong.
    """

    def __init__(self, settings: AgentSettings, notice: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.notice = notice or _to_stderr
        self._stack = AsyncExitStack()
        self._local: LocalAgent | None = None
        self._swept = False

    async def __aenter__(self) -> LocalOperations:
        self._local = await self._stack.enter_async_context(app.in_process(self.settings))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.__aexit__(*exc)  # type: ignore[arg-type]

    @property
    def local(self) -> LocalAgent:
        assert self._local is not None, "use LocalOperations as an async context manager"
        return self._local

    async def _sweep_first(self) -> None:
        if self._swept:
            return
        self._swept = True
        try:
            swept = await self.local.service.sweep(self.local.service.config.sweep_older_than)
        except KybdrError as exc:
            self.notice(f"could not sweep the repository of leftovers first: {exc}")
            return
        gone = len(swept["aborted_uploads"]) + len(swept["removed_orphans"])
        if gone:
            self.notice(f"removed {gone} leftover(s) of backups that did not finish")

    async def _finish(self, jobs: list[Job], *, keep_failed_result: bool = False) -> list[dict[str, Any]]:
        """Wait for the jobs; a failure is raised as the error that ended it (so the exit status says
        configuration error, bad input or failure as it would without jobs), unless the job kept a result
        worth showing (a failed validation's checks, every database's drill outcome)."""
        for job in jobs:
            await job.done.wait()
        for job in jobs:
            if job.status is JobStatus.SUCCEEDED:
                continue
            if keep_failed_result and isinstance(job.result, dict):
                continue
            if job.exception is not None:
                raise job.exception
            raise KybdrError(f"{job.kind} {job.id} {job.status}: {job.error}")
        return [job.to_json() for job in jobs]

    async def backup(
        self, databases: list[str] | None, description: str | None, physical: bool = False
    ) -> list[dict[str, Any]]:
        """``physical``: one base backup of the whole cluster (``databases`` is then None)."""
        await self._sweep_first()
        service = self.local.service
        if physical:
            overrides = BackupOverrides(description=description, labels=("manual",))
            asked: dict[str, Any] = {"physical": True, **({"description": description} if description else {})}
            job = verbs.submit_physical_backup(self.local.jobs, service, overrides, params=asked, bounded=False)
            return [done["result"] for done in await self._finish([job])]
        chosen = databases or service.covered_databases()
        if not chosen:
            raise ConfigError("no database to back up: pass --database NAME or set database.databases")
        overrides = BackupOverrides(description=description, labels=("manual",))
        params: dict[str, Any] = {"description": description} if description else {}
        results: list[dict[str, Any]] = []
        for database in chosen:  # one at a time, as before: the first failure stops the rest
            jobs = verbs.submit_backups(
                self.local.jobs, service, [database], overrides, params={**params, "database": database}, bounded=False
            )
            results += [job["result"] for job in await self._finish(jobs)]
        return results

    async def list(self, database: str | None, region: Region | None = None) -> dict[str, Any]:
        await self._sweep_first()
        return await self.local.service.list_backups(database, region)

    async def show(self, backup_id: str, region: Region | None = None) -> dict[str, Any]:
        await self._sweep_first()
        return await self.local.service.show(backup_id, region)

    async def restore(
        self,
        backup_id: str,
        target: str,
        force: bool,
        no_owner: bool,
        with_globals: bool = False,
        jobs: int = 1,
        region: Region | None = None,
        selection: Selection | None = None,
        rename_to: str | None = None,
    ) -> dict[str, Any]:
        """``rename_to`` set: the one table of ``selection`` is added to the existing ``target`` under it."""
        await self._sweep_first()
        service = self.local.service
        await service.find(backup_id, region)
        job = verbs.submit_restore(
            self.local.jobs,
            service,
            backup_id,
            target,
            force=force,
            no_owner=no_owner,
            with_globals=with_globals,
            restore_jobs=jobs,
            spool_dir=self.settings.restore_spool_dir(),
            notice=self.notice,
            region=region,
            selection=selection,
            into_existing=rename_to is not None,
            rename_to=rename_to,
        )
        result: dict[str, Any] = (await self._finish([job]))[0]["result"]
        return result

    async def contents(self, backup_id: str, region: Region | None = None) -> dict[str, Any]:
        await self._sweep_first()
        return (await self.local.service.contents(backup_id, region)).as_dict()

    async def validate(self, backup_id: str, level: Level, region: Region | None = None) -> dict[str, Any]:
        await self._sweep_first()
        service = self.local.service
        await service.find(backup_id, region)
        job = verbs.submit_validate(self.local.jobs, service, backup_id, level, region)
        result: dict[str, Any] = (await self._finish([job], keep_failed_result=True))[0]["result"]
        return result

    async def cleanup(self, dry_run: bool) -> dict[str, Any]:
        await self._sweep_first()
        job = verbs.submit_cleanup(self.local.jobs, self.local.service, dry_run=dry_run)
        result: dict[str, Any] = (await self._finish([job]))[0]["result"]
        return result

    async def backfill(self, limit: int) -> dict[str, Any]:
        await self._sweep_first()
        job = verbs.submit_backfill(self.local.jobs, self.local.service, limit=limit)
        result: dict[str, Any] = (await self._finish([job], keep_failed_result=True))[0]["result"]
        return result

    async def stats(self) -> dict[str, Any]:
        await self._sweep_first()
        return await self.local.service.stats()

    async def test(self, database: str | None) -> dict[str, Any]:
        await self._sweep_first()
        params: dict[str, Any] = {"database": database} if database else {}
        job = verbs.submit_drill(self.local.jobs, self.local.service, database, params=params, bounded=True)
        result: dict[str, Any] = (await self._finish([job], keep_failed_result=True))[0]["result"]
        return result

    async def status(self) -> dict[str, Any]:
        raise KybdrError("the agent is not running: `status` needs `kybdr-agent run` (systemctl start kybdr-agent)")


def _to_stderr(message: str) -> None:
    stderr_line(f"kybdr-agent: {message}", WARNING)


class RemoteOperations:
    """Through the agent's control API; long work waits for its jobs (with progress on a terminal)."""

    def __init__(self, client: ControlClient, progress: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.progress = progress

    async def __aenter__(self) -> RemoteOperations:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def _jobs(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        if self.progress is None:
            answer = await self.client.request("POST", path, body, params={"wait": "true"})
            jobs: list[dict[str, Any]] = answer["jobs"]
        else:
            answer = await self.client.request("POST", path, body)
            jobs = [await self._follow(job["id"]) for job in answer["jobs"]]
        failed = [job for job in jobs if job["status"] != "succeeded"]
        if failed:
            raise KybdrError("; ".join(f"{job['kind']} {job['id']} {job['status']}: {job['error']}" for job in failed))
        return jobs

    async def _follow(self, job_id: str) -> dict[str, Any]:
        assert self.progress is not None
        while True:
            job: dict[str, Any] = await self.client.request("GET", f"/v1/jobs/{job_id}")
            done = job["progress"]["bytes_done"]
            self.progress(f"{job['kind']} {job_id}: {job['status']} {done / 2**20:,.1f} MiB")
            if job["status"] in ("succeeded", "failed", "cancelled"):
                self.progress("")
                return job
            await anyio.sleep(0.5)

    async def backup(
        self, databases: list[str] | None, description: str | None, physical: bool = False
    ) -> list[dict[str, Any]]:
        if physical:
            asked: dict[str, Any] = {"physical": True, **({"description": description} if description else {})}
            return [job["result"] for job in await self._jobs("/v1/backup", asked)]
        results: list[dict[str, Any]] = []
        for database in databases or [None]:  # type: ignore[list-item]
            body: dict[str, Any] = {"description": description} if description else {}
            if database:
                body["database"] = database
            results += [job["result"] for job in await self._jobs("/v1/backup", body)]
        return results

    async def list(self, database: str | None, region: Region | None = None) -> dict[str, Any]:
        params = {"database": database} if database else {}
        if region is not None:
            params["region"] = region
        answer: dict[str, Any] = await self.client.request("GET", "/v1/backup", params=params or None)
        return answer

    async def show(self, backup_id: str, region: Region | None = None) -> dict[str, Any]:
        params: dict[str, str] | None = {"region": region} if region is not None else None
        answer: dict[str, Any] = await self.client.request("GET", f"/v1/backup/{backup_id}", params=params)
        return answer

    async def restore(
        self,
        backup_id: str,
        target: str,
        force: bool,
        no_owner: bool,
        with_globals: bool = False,
        jobs: int = 1,
        region: Region | None = None,
        selection: Selection | None = None,
        rename_to: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"target_database": target, "force": force, "no_owner": no_owner}
        if selection is not None:
            body.update(tables=list(selection.tables), schemas=list(selection.schemas))
        if rename_to is not None:
            body.update(into_existing=True, rename_to=rename_to)
        if region is not None:
            body["region"] = region
        if with_globals:  # only when asked: an agent of an older version refuses fields it does not know
            body["with_globals"] = True
        if jobs != 1:  # likewise
            body["jobs"] = jobs
        finished = await self._jobs(f"/v1/backup/{backup_id}/restore", body)
        result: dict[str, Any] = finished[0]["result"]
        for message in result.get("notices", []):
            _to_stderr(str(message))
        return result

    async def contents(self, backup_id: str, region: Region | None = None) -> dict[str, Any]:
        params: dict[str, str] | None = {"region": region} if region is not None else None
        answer: dict[str, Any] = await self.client.request("GET", f"/v1/backup/{backup_id}/contents", params=params)
        return answer

    async def validate(self, backup_id: str, level: Level, region: Region | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"level": level}
        if region is not None:
            body["region"] = region
        answer = await self.client.request("POST", f"/v1/backup/{backup_id}/validate", body, params={"wait": "true"})
        job = answer["jobs"][0]
        if job["status"] == "succeeded" or isinstance(job.get("result"), dict):
            result: dict[str, Any] = job["result"]
            return result
        raise KybdrError(f"validate job {job['id']} {job['status']}: {job['error']}")

    async def cleanup(self, dry_run: bool) -> dict[str, Any]:
        result: dict[str, Any] = (await self._jobs("/v1/backup/cleanup", {"dry_run": dry_run}))[0]["result"]
        return result

    async def backfill(self, limit: int) -> dict[str, Any]:
        answer = await self.client.request("POST", "/v1/backup/backfill", {"limit": limit}, params={"wait": "true"})
        job = answer["jobs"][0]
        if job["status"] == "succeeded" or isinstance(job.get("result"), dict):
            result: dict[str, Any] = job["result"]  # a failed pass keeps what it copied and what failed
            return result
        raise KybdrError(f"backfill job {job['id']} {job['status']}: {job['error']}")

    async def stats(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self.client.request("GET", "/v1/backup/stats")
        return answer

    async def test(self, database: str | None) -> dict[str, Any]:
        answer = await self.client.request(
            "POST", "/v1/backup/test", {"database": database} if database else {}, params={"wait": "true"}
        )
        job = answer["jobs"][0]
        if job["status"] == "succeeded" or isinstance(job.get("result"), dict):
            result: dict[str, Any] = job["result"]  # a failed drill keeps every database's outcome
            return result
        raise KybdrError(f"test job {job['id']} {job['status']}: {job['error']}")

    async def status(self) -> dict[str, Any]:
        health = await self.client.request("GET", "/healthz")
        jobs = await self.client.request("GET", "/v1/jobs")
        return {"agent": health, "jobs": jobs["jobs"][:20]}


def terminal_progress() -> Callable[[str], None] | None:
    """A one-line progress display when a person is watching (stdout and stderr are a terminal).

    It goes to stderr and erases itself, so stdout carries only the result even on a terminal; scripts
    (no terminal) get neither progress nor escape codes and wait for the job in one request."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        return None

    def show(line: str) -> None:
        sys.stderr.write("\r\033[K" + line)
        sys.stderr.flush()

    return show
