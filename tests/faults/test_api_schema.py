"""The control API against its own OpenAPI document, with schemathesis (property-based, from PyPI).

The real agent runs over TCP with an admin token; schemathesis reads ``/v1/openapi.json`` from it and sends
generated requests — valid ones, and ones the document says are invalid — to every operation. The checks:
no 5xx, every status code and content type is one the document lists, every response body matches its
schema (the 202/200 job answers and every problem document included), and invalid input is refused.

Examples are capped (and a time budget set) so the run stays within about half a minute; the seed is fixed so
a failure reproduces.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from kybdr_agent.journal import Journal
from kybdr_agent.postgres.cluster import Cluster
from tests.faults.report import FaultTally
from tests.faults.test_api_common import Agent, databases, start_agent, wait_until_idle
from tests.support import create_mixed_database, unique_db

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    ]
)
MAX_EXAMPLES = 15
MAX_SECONDS = 20


@pytest.fixture(scope="module")
def app_db(pg: Cluster) -> str:
    name = unique_db("apischema")
    create_mixed_database(pg, name, rows=100)
    return name


@pytest.fixture
def agent(pg: Cluster, tmp_path: Path, key_file: Path, app_db: str) -> Iterator[Agent]:
    running = start_agent(tmp_path, pg, key_file, databases=[app_db], tcp=True)
    yield running
    running.stop()


def test_the_api_keeps_to_its_openapi_document(agent: Agent, pg: Cluster, tmp_path: Path) -> None:
    made = agent.request("POST", "/v1/backup?wait=true", {})  # so listings and stats have something in them
    assert made.status == 200, made.body
    before = databases(pg)
    report = tmp_path / "schemathesis.ndjson"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"http://127.0.0.1:{agent.port}/v1/openapi.json",
            "--header",
            f"Authorization: Bearer {agent.tokens['admin']}",
            "--checks",
            CHECKS,
            "--max-examples",
            str(MAX_EXAMPLES),
            "--max-time",
            str(MAX_SECONDS),
            "--seed",
            "7",
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--no-shrink",
            "--report",
            "ndjson",
            "--report-ndjson-path",
            str(report),
            # This agent runs without [dr]: every DR route answers 503 (documented), which not_a_server_error
            # flags by design. The DR routes are exercised against real DR agents in tests/dr/.
            "--exclude-path-regex",
            "^/v1/disaster-recovery/",
        ],
        capture_output=True,
        text=True,
        timeout=MAX_SECONDS + 120,
        check=False,
        cwd=tmp_path,
    )
    statuses = _statuses(report)
    # Accepted work is fine (admin may restore into any name it likes: schemathesis finds the backup id by
    # following the API's own answers); what no accepted job explains was left behind by a refused request.
    wait_until_idle(agent)  # jobs still running would not be in the journal yet
    journal = list(Journal(agent.tmp_path / "state" / "journal.jsonl").records())
    restored = {str((r.get("params") or {}).get("target_database")) for r in journal if r.get("kind") == "restore"}
    backed_up = {str((r.get("result") or {}).get("id")) for r in journal if r.get("kind") == "backup"}
    created = databases(pg) - before
    unexplained = (created - restored) | (set(agent.backup_ids()) - backed_up)
    for name in created:
        pg.psql("postgres", 'drop database if exists "{}" with (force)'.format(name.replace('"', '""')))
    tally = FaultTally(
        fault="api: schemathesis against the OpenAPI document",
        injected=sum(sum(by.values()) for by in statuses.values()),
        left_behind=len(unexplained),
    )
    assert not unexplained, sorted(unexplained)
    assert proc.returncode == 0, proc.stdout[-12000:] + proc.stderr[-4000:]
    assert not any(code >= 500 for by in statuses.values() for code in by), dict(statuses)
    assert sum(by[202] + by[200] for label, by in statuses.items() if label.startswith("POST")), dict(statuses)
    assert agent.healthy()
    assert "Traceback" not in agent.daemon.log(), agent.daemon.log()[-4000:]
    tally.assert_clean()


def _statuses(report: Path) -> dict[str, Counter[int]]:
    """Status codes per operation, from schemathesis's NDJSON event stream (for the failure message)."""
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    if not report.exists():
        return statuses
    for line in report.read_text().splitlines():
        event = json.loads(line).get("ScenarioFinished")
        if not event:
            continue
        for interaction in event["recorder"].get("interactions", {}).values():
            response = interaction.get("response") or {}
            statuses[event["recorder"]["label"]][int(response.get("status_code") or 0)] += 1
    return statuses
