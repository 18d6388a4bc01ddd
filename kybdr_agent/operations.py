"""The CLI's verbs, done either by a running agent (over its control socket) or in this process.

When an agent listens on ``control.socket`` the CLI asks it, so a backup started from a shell is
scheduled, limited and journaled like any other. Without one, the verbs that need no daemon run here
directly — the same ``BackupService`` code — so the one-shot commands keep working on a host where the
agent is not installed as a service. Both backends return the same JSON-shaped results.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

import anyio

from kybdr_agent.backup.service import BackupOverrides, BackupService
from kybdr_agent.backup.verify import Level
from kybdr_agent.config import AgentSettings
from kybdr_agent.control.client import ControlClient
from kybdr_agent.errors import ConfigError, KybdrError
from kybdr_agent.journal import Journal


def manifest_json(m: Any) -> dict[str, Any]:
    return {**m.model_dump(mode="json"), "part_count": m.part_count}


class Operations(Protocol):
    async def backup(self, databases: list[str] | None, description: str | None) -> list[dict[str, Any]]: ...
    async def list(self, database: str | None) -> dict[str, Any]: ...
    async def show(self, backup_id: str) -> dict[str, Any]: ...
    async def restore(self, backup_id: str, target: str, force: bool, no_owner: bool) -> dict[str, Any]: ...
    async def validate(self, backup_id: str, level: Level) -> dict[str, Any]: ...
    async def cleanup(self, dry_run: bool) -> dict[str, Any]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def test(self, database: str | None) -> dict[str, Any]: ...
    async def status(self) -> dict[str, Any]: ...


class LocalOperations:
    """In this process, with the journal the agent would use (so stats and cleanup see the same history).

    Each command first sweeps the repository of what dead backups left (``backup/sweep.py``): a host where
    no daemon runs still never keeps an orphaned upload. A sweep that fails is reported and the command
    goes on, since the command itself may be how the operator finds out what is wrong.
    """

    def __init__(self, settings: AgentSettings, notice: Callable[[str], None] | None = None) -> None:
        journal = Journal(settings.backup.backup_dir / "journal.jsonl")
        self.service = BackupService(settings, journal=journal if _writable(journal) else None)
        self.settings = settings
        self.notice = notice or _to_stderr
        self._swept = False

    async def _sweep_first(self) -> None:
        if self._swept:
            return
        self._swept = True
        try:
            swept = await self.service.sweep(self.settings.daemon.sweep_older_than)
        except KybdrError as exc:
            self.notice(f"could not sweep the repository of leftovers first: {exc}")
            return
        gone = len(swept["aborted_uploads"]) + len(swept["removed_orphans"])
        if gone:
            self.notice(f"removed {gone} leftover(s) of backups that did not finish")

    async def backup(self, databases: list[str] | None, description: str | None) -> list[dict[str, Any]]:
        await self._sweep_first()
        chosen = databases or self.service.covered_databases()
        if not chosen:
            raise ConfigError("no database to back up: pass --database NAME or set database.databases")
        overrides = BackupOverrides(description=description, labels=("manual",))
        return [manifest_json(await self.service.backup(db, overrides)) for db in chosen]

    async def list(self, database: str | None) -> dict[str, Any]:
        await self._sweep_first()
        found = await self.service.catalog(database)
        return {
            "backups": [manifest_json(m) for m in found.backups],
            "unreadable": [{"key": key, "problem": problem} for key, problem in found.unreadable],
        }

    async def show(self, backup_id: str) -> dict[str, Any]:
        await self._sweep_first()
        return manifest_json(await self.service.find(backup_id))

    async def restore(self, backup_id: str, target: str, force: bool, no_owner: bool) -> dict[str, Any]:
        await self._sweep_first()
        result = await self.service.restore(backup_id, target, force=force, no_owner=no_owner, notice=self.notice)
        return dict(result.__dict__)

    async def validate(self, backup_id: str, level: Level) -> dict[str, Any]:
        await self._sweep_first()
        result = dict((await self.service.validate(backup_id, level)).__dict__)
        self.service.record("validate", "succeeded" if result["ok"] else "failed", result, result["error"])
        return result

    async def cleanup(self, dry_run: bool) -> dict[str, Any]:
        await self._sweep_first()
        return await self.service.cleanup(dry_run=dry_run)

    async def stats(self) -> dict[str, Any]:
        await self._sweep_first()
        return await self.service.stats()

    async def test(self, database: str | None) -> dict[str, Any]:
        await self._sweep_first()
        return {"drills": await self.service.drill(database)}

    async def status(self) -> dict[str, Any]:
        raise KybdrError("the agent is not running: `status` needs `kybdr-agent run` (systemctl start kybdr-agent)")


def _to_stderr(message: str) -> None:
    print(f"kybdr-agent: {message}", file=sys.stderr, flush=True)


def _writable(journal: Journal) -> bool:
    parent = journal.path.parent
    return parent.is_dir() and (not journal.path.exists() or journal.path.is_file())


class RemoteOperations:
    """Through the agent's control API; long work waits for its jobs (with progress on a terminal)."""

    def __init__(self, client: ControlClient, progress: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.progress = progress

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

    async def backup(self, databases: list[str] | None, description: str | None) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for database in databases or [None]:  # type: ignore[list-item]
            body: dict[str, Any] = {"description": description} if description else {}
            if database:
                body["database"] = database
            results += [job["result"] for job in await self._jobs("/v1/backup", body)]
        return results

    async def list(self, database: str | None) -> dict[str, Any]:
        params = {"database": database} if database else None
        answer: dict[str, Any] = await self.client.request("GET", "/v1/backup", params=params)
        return answer

    async def show(self, backup_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self.client.request("GET", f"/v1/backup/{backup_id}")
        return answer

    async def restore(self, backup_id: str, target: str, force: bool, no_owner: bool) -> dict[str, Any]:
        body = {"target_database": target, "force": force, "no_owner": no_owner}
        jobs = await self._jobs(f"/v1/backup/{backup_id}/restore", body)
        result: dict[str, Any] = jobs[0]["result"]
        for message in result.get("notices", []):
            _to_stderr(str(message))
        return result

    async def validate(self, backup_id: str, level: Level) -> dict[str, Any]:
        answer = await self.client.request(
            "POST", f"/v1/backup/{backup_id}/validate", {"level": level}, params={"wait": "true"}
        )
        job = answer["jobs"][0]
        if job["status"] == "succeeded" or isinstance(job.get("result"), dict):
            result: dict[str, Any] = job["result"]
            return result
        raise KybdrError(f"validate job {job['id']} {job['status']}: {job['error']}")

    async def cleanup(self, dry_run: bool) -> dict[str, Any]:
        result: dict[str, Any] = (await self._jobs("/v1/backup/cleanup", {"dry_run": dry_run}))[0]["result"]
        return result

    async def stats(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self.client.request("GET", "/v1/backup/stats")
        return answer

    async def test(self, database: str | None) -> dict[str, Any]:
        result: dict[str, Any] = (await self._jobs("/v1/backup/test", {"database": database} if database else {}))[0][
            "result"
        ]
        return result

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
