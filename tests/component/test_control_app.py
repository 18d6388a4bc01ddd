"""The control app in process: ``build_app`` over the backup component's route table, served on 127.0.0.1 by
aiohttp's test server (real HTTP, a real TCP peer, so the bearer token is required), the component over a
real service, folder repository and PostgreSQL cluster. No daemon: the test holds the task group the jobs
run in, and the clock.

What this adds to the service-level tests: the route table is wired to the same verbs (a backup made over
HTTP is the same job, with the same result), a failed drill's outcome is not lost on its way into the
answer, the component's health reaches ``/healthz``, and the OpenAPI document covers every route served.
"""

from __future__ import annotations

from typing import Any, Final

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from kybdr_agent.backup.routes import backup_routes
from kybdr_agent.config import AgentSettings
from kybdr_agent.control.http import ControlContext
from kybdr_agent.control.server import build_app
from tests.component.harness import T0, ManualClock, break_backup, running_agent

TOKEN: Final = "tok"
AUTH: Final = {"Authorization": f"Bearer {TOKEN}"}
CORE_PATHS: Final = ("/v1/jobs", "/v1/jobs/{job_id}", "/healthz", "/v1/openapi.json")


async def _json(response: ClientResponse, status: int) -> Any:
    """The answer's document, after checking its status (the body is in the message when it is wrong)."""
    text = await response.text()
    assert response.status == status, text
    return await response.json(content_type=None)


@pytest.mark.anyio
async def test_the_control_app_serves_the_backup_table_over_the_same_jobs(
    settings: AgentSettings, clock: ManualClock, database: str
) -> None:
    async with running_agent(settings, clock) as agent:
        component = agent.component(clock)
        ctx = ControlContext(jobs=agent.jobs, tokens={TOKEN: "admin"}, health=lambda: dict(component.health().fields))
        table = backup_routes(component)
        client: TestClient[web.Request, web.Application]
        async with TestClient(TestServer(build_app(ctx, [table]))) as client:
            # A TCP peer without a token is refused before anything runs.
            refused = await client.get("/v1/backup")
            assert refused.status == 401
            assert refused.content_type == "application/problem+json"

            # A backup of every covered database (the policy's one), waited for: the verb's job and result.
            made = await _json(await client.post("/v1/backup?wait=true", json={}, headers=AUTH), 200)
            [job] = made["jobs"]
            assert (job["kind"], job["status"], job["database"]) == ("backup", "succeeded", database)
            assert job["created_at"] == T0.isoformat()
            backup_id = job["result"]["id"]
            assert job["result"]["labels"] == ["manual"]
            assert made["job_id"] == job["id"]

            listed = await _json(await client.get("/v1/backup", headers=AUTH), 200)
            assert [b["id"] for b in listed["backups"]] == [backup_id]
            assert listed["unreadable"] == []
            jobs = await _json(await client.get("/v1/jobs", headers=AUTH), 200)
            assert [j["id"] for j in jobs["jobs"]] == [job["id"]]

            bad = await client.get("/v1/backup/not-an-id", headers=AUTH)
            assert bad.status == 400
            assert bad.content_type == "application/problem+json"
            assert (await bad.json(content_type=None))["type"].endswith("/invalid-backup-id")

            # The component's health is merged into /healthz: the last housekeeping sweep, stamped by our clock.
            await component.sweep_once()
            health = await _json(await client.get("/healthz", headers=AUTH), 200)
            assert health["status"] == "ok"
            assert health["housekeeping"]["at"] == T0.isoformat()
            assert "error" not in health["housekeeping"], health["housekeeping"]

            # A drill of a backup whose data is gone: the job fails, and the answer still says what failed.
            await break_backup(agent.service, backup_id)
            drilled = await _json(await client.post("/v1/backup/test?wait=true", json={}, headers=AUTH), 200)
            [drill] = drilled["jobs"]
            assert (drill["kind"], drill["status"]) == ("test", "failed")
            [outcome] = drill["result"]["drills"]
            assert (outcome["database"], outcome["backup_id"], outcome["passed"]) == (database, backup_id, False)
            assert outcome["error"]
            assert drill["error"].startswith("restore drill failed")

            document = await _json(await client.get("/v1/openapi.json", headers=AUTH), 200)
            served = {route.spec.path for route in table.routes} | set(CORE_PATHS)
            assert set(document["paths"]) == served
            for route in table.routes:
                assert route.spec.method.lower() in document["paths"][route.spec.path], route.spec.name
