"""Hostile and malformed requests against the real agent: everything a request carries (path, query, body,
auth) is checked before anything happens, a refusal is a 4xx problem document that names what was wrong,
and a refused request leaves nothing behind — no job, no database, no backup.

Each test records its tally (tests/faults/report.py): API faults start no backup, so ``attempted`` and
``restorable`` are 0, ``injected`` counts the hostile requests and ``left_behind`` counts what they created.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kybdr_agent.postgres.cluster import Cluster
from tests.daemon_support import Response, http_request
from tests.faults.report import FaultTally
from tests.faults.test_api_common import (
    Agent,
    body_of,
    databases,
    raw_request,
    read_response,
    start_agent,
    status_of,
)
from tests.support import create_mixed_database, unique_db


@pytest.fixture(scope="module")
def app_db(pg: Cluster) -> str:
    name = unique_db("apireq")
    create_mixed_database(pg, name, rows=300)
    return name


@pytest.fixture
def agent(pg: Cluster, tmp_path: Path, key_file: Path, app_db: str) -> Iterator[Agent]:
    running = start_agent(tmp_path, pg, key_file, databases=[app_db], tcp=True)
    yield running
    running.stop()


def _backup(agent: Agent) -> str:
    made = agent.request("POST", "/v1/backup?wait=true", {})
    assert made.status == 200, made.body
    backup_id: str = made.body["jobs"][0]["result"]["id"]
    return backup_id


def _is_problem(resp: Response, status: int | tuple[int, ...]) -> bool:
    wanted = status if isinstance(status, tuple) else (status,)
    return resp.status in wanted and resp.headers.get("content-type", "").startswith("application/problem+json")


def _left_behind(agent: Agent, pg: Cluster, jobs: int, dbs: set[str], backups: list[str]) -> int:
    """Jobs, databases and backups that appeared since the snapshot (after a moment for a stray job)."""
    time.sleep(1.0)
    return (len(agent.jobs()) - jobs) + len(databases(pg) - dbs) + len(set(agent.backup_ids()) - set(backups))


def test_query_is_checked_before_any_job_starts(agent: Agent, pg: Cluster) -> None:
    """Issue 7: a 400 for a bad ``timeout`` used to come after the restore or backup had been started."""
    backup_id = _backup(agent)
    target = unique_db("never")
    restore = f"/v1/backup/{backup_id}/restore"
    cases: list[tuple[str, str, Any, str]] = [
        ("POST", f"{restore}?wait=1&timeout=x", {"target_database": target}, "wait"),
        ("POST", f"{restore}?wait=true&timeout=x", {"target_database": target}, "timeout"),
        ("POST", "/v1/backup?wait=true&timeout=abc", {}, "timeout"),
        ("POST", "/v1/backup?wait=true&timeout=nan", {}, "timeout"),
        ("POST", "/v1/backup?wait=true&timeout=inf", {}, "timeout"),
        ("POST", "/v1/backup?wait=true&timeout=-1", {}, "timeout"),
        ("POST", "/v1/backup?wait=null", {}, "wait"),
        ("POST", "/v1/backup?wait=yes", {}, "wait"),
        ("POST", "/v1/backup?wait=true&wait=false", {}, "wait"),
        ("POST", "/v1/backup?compression=false", {}, "compression"),
        ("POST", f"/v1/backup/{backup_id}/validate?level=full", {}, "level"),
        ("POST", "/v1/backup/cleanup?dry_run=true", {"dry_run": False}, "dry_run"),
        ("POST", "/v1/backup/test?database=x", {}, "database"),
        ("GET", "/v1/jobs/job-000000000000?wait=maybe", None, "wait"),
        ("GET", "/v1/backup?database=", None, "database"),
        ("GET", "/healthz?verbose=1", None, "verbose"),
    ]
    jobs, dbs, backups = len(agent.jobs()), databases(pg), agent.backup_ids()
    wrong = []
    for method, path, body, named in cases:
        resp = agent.request(method, path, body)
        if not (_is_problem(resp, 400) and named in json.dumps(resp.body)):
            wrong.append((path, resp.status, resp.body))
    tally = FaultTally(
        fault="api: bad query parameters",
        injected=len(cases),
        failed_cleanly=0,
        left_behind=_left_behind(agent, pg, jobs, dbs, backups),
    )
    assert target not in databases(pg)
    assert wrong == []
    tally.assert_clean()


def test_hostile_json_bodies_are_refused_naming_the_field(agent: Agent, pg: Cluster) -> None:
    """Issue 11: deep nesting and huge numbers were 500s; duplicate keys and lax booleans were obeyed."""
    backup_id = _backup(agent)
    restore = f"/v1/backup/{backup_id}/restore"
    deep = b'{"dry_run": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    deeper = b'{"dry_run": ' + b"[" * 30000 + b"]" * 30000 + b"}"
    huge = b'{"dry_run": ' + b"7" * 5000 + b"}"
    cases: list[tuple[str, bytes, tuple[int, ...], str]] = [
        ("/v1/backup/cleanup", deep, (400, 422), "dry_run"),
        ("/v1/backup/cleanup", deeper, (400, 422), ""),
        ("/v1/backup/cleanup", huge, (400, 422), "dry_run"),
        ("/v1/backup/cleanup", b'{"dry_run": true, "dry_run": false}', (400, 422), "dry_run"),
        ("/v1/backup/cleanup", b'{"dry_run": "yes"}', (422,), "dry_run"),
        ("/v1/backup/cleanup", b'{"dry_run": "true"}', (422,), "dry_run"),
        ("/v1/backup/cleanup", b'{"dry_run": 1}', (422,), "dry_run"),
        ("/v1/backup/cleanup", b'{"dry_run": 0}', (422,), "dry_run"),
        ("/v1/backup/cleanup", b'{"dry_run": NaN}', (400, 422), ""),
        ("/v1/backup", b'{"compression": 1e999}', (400, 422), "compression"),
        ("/v1/backup", b'{"compression": "false"}', (422,), "compression"),
        ("/v1/backup", b'{"description": "\\ud800"}', (400, 422), "description"),
        ("/v1/backup", b'{"database": "a\\u0000b"}', (400, 422), "database"),
        ("/v1/backup", b'{"database": "x", "database": "y"}', (400, 422), "database"),
        (restore, b'{"target_database": "t", "force": 1}', (422,), "force"),
        (restore, b'{"target_database": "t", "force": "false"}', (422,), "force"),
        (restore, b'{"target_database": "t", "target_database": "u"}', (400, 422), "target_database"),
        (restore, b'{"target_database": ["t"]}', (422,), "target_database"),
        (f"/v1/backup/{backup_id}/validate", b'{"level": "full", "level": "quick"}', (400, 422), "level"),
        ("/v1/backup/test", b'{"database": 5}', (422,), "database"),
        ("/v1/backup", b"\xff\xfe{}", (400,), ""),
        ("/v1/backup", b'{"a": "\xff"}', (400,), ""),
    ]
    jobs, dbs, backups = len(agent.jobs()), databases(pg), agent.backup_ids()
    wrong = []
    for path, raw, statuses, named in cases:
        resp = agent.request("POST", path, raw=raw)
        if not (_is_problem(resp, statuses) and named in json.dumps(resp.body)):
            wrong.append((path, raw[:60], resp.status, resp.body))
    tally = FaultTally(
        fault="api: hostile JSON bodies",
        injected=len(cases),
        left_behind=_left_behind(agent, pg, jobs, dbs, backups),
    )
    assert wrong == []
    assert agent.healthy()
    tally.assert_clean()


def test_bodies_need_a_json_content_type_and_a_bounded_size(agent: Agent, pg: Cluster) -> None:
    """Oversize and mislabelled bodies: 413 and 415, before anything is read or started."""
    jobs, dbs, backups = len(agent.jobs()), databases(pg), agent.backup_ids()
    results: list[tuple[str, int]] = []

    def post(raw: bytes, headers: dict[str, str]) -> int:
        resp = agent.request("POST", "/v1/backup/cleanup", raw=raw, headers=headers)
        assert resp.headers["content-type"].startswith("application/problem+json"), resp.body
        return resp.status

    results.append(("text/plain", post(b'{"dry_run": true}', {"Content-Type": "text/plain"})))
    results.append(("form", post(b"dry_run=true", {"Content-Type": "application/x-www-form-urlencoded"})))
    results.append(("xml", post(b"<dry_run/>", {"Content-Type": "application/xml"})))
    results.append(("oversize", post(b'{"dry_run": "' + b"x" * 200_000 + b'"}', {})))
    # A Content-Length far beyond the limit is refused from the header alone.
    raw = raw_request(
        agent,
        b"POST /v1/backup/cleanup HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000000\r\nConnection: close\r\n\r\n{}",
    )
    results.append(("huge content-length", status_of(raw)))
    # A chunked body that grows past the limit.
    chunk = b'{"dry_run": "' + b"y" * 70_000
    raw = raw_request(
        agent,
        b"POST /v1/backup/cleanup HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + f"{len(chunk):x}\r\n".encode()
        + chunk
        + b"\r\n0\r\n\r\n",
    )
    results.append(("chunked oversize", status_of(raw)))
    expected = {
        "text/plain": 415,
        "form": 415,
        "xml": 415,
        "oversize": 413,
        "huge content-length": 413,
        "chunked oversize": 413,
    }
    tally = FaultTally(
        fault="api: oversize or mislabelled bodies",
        injected=len(results),
        left_behind=_left_behind(agent, pg, jobs, dbs, backups),
    )
    assert dict(results) == expected
    tally.assert_clean()


def test_malformed_http_and_huge_headers_are_refused_and_the_agent_stays_up(agent: Agent) -> None:
    jobs = len(agent.jobs())
    payloads = [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"h" * 100_000 + b"\r\nConnection: close\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(2000))
        + b"Connection: close\r\n\r\n",
        b"GET /" + b"p" * 100_000 + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"POST /v1/backup HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 7\r\nConnection: close\r\n\r\n{}",
        b"POST /v1/backup HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\nConnection: close\r\n\r\n",
        b"GET /v1/backup/%ff%fe HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"GET /v1/jobs/%00 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    ]
    statuses = []
    for payload in payloads:
        try:
            statuses.append(status_of(raw_request(agent, payload, timeout=30)))
        except ConnectionResetError:
            statuses.append(-1)  # the server may also just drop a connection it cannot parse
    # Undecodable percent-escapes in the query are decoded leniently by aiohttp: no database has that name.
    odd = status_of(raw_request(agent, b"GET /v1/backup?database=%ff HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    tally = FaultTally(
        fault="api: malformed HTTP, huge headers",
        injected=len(payloads) + 1,
        hung=0 if agent.healthy() else 1,
        left_behind=len(agent.jobs()) - jobs,
    )
    bad = [
        (payload[:40], status) for payload, status in zip(payloads, statuses, strict=True) if not 400 <= status < 500
    ]
    assert all(status == -1 for _, status in bad), bad
    assert odd in (200, 400), odd
    # Refused, and logged as one line each: a flood of garbage must not fill the log with tracebacks.
    assert "Traceback" not in agent.daemon.log()
    tally.assert_clean()


def test_a_slow_partial_body_is_timed_out_and_the_agent_stays_responsive(agent: Agent) -> None:
    """Slowloris: connections that send half a body and hold it open are answered 408 and closed."""
    held: list[socket.socket] = []
    jobs = len(agent.jobs())
    try:
        for _ in range(20):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(120)
            sock.connect(str(agent.daemon.socket_path))
            sock.sendall(
                b"POST /v1/backup/cleanup HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"dry_run": '
            )
            held.append(sock)
        assert agent.healthy(timeout=10), "the agent stopped answering while bodies were held open"
        answers = []
        hung = 0
        for sock in held:
            try:
                answers.append(read_response(sock))  # the agent must answer and close; 120 s is a hang guard
            except TimeoutError:
                hung += 1
    finally:
        for sock in held:
            sock.close()
    statuses = [status_of(a) for a in answers]
    tally = FaultTally(
        fault="api: slow partial body (slowloris)",
        injected=len(held),
        hung=hung,
        left_behind=len(agent.jobs()) - jobs,
    )
    assert statuses == [408] * len(held), statuses
    assert body_of(answers[0])["type"].endswith("/request-timeout")
    assert agent.healthy()
    assert "Traceback" not in agent.daemon.log()
    tally.assert_clean()


def test_bearer_scheme_is_exact_over_tcp(agent: Agent) -> None:
    """Issue 12: exactly ``Bearer <token>`` (scheme case-insensitive, RFC 6750), one space, nothing else."""
    assert agent.port is not None
    token = agent.tokens["viewer"]
    accepted = [f"Bearer {token}", f"bearer {token}", f"BEARER {token}"]
    refused = [
        f"Bearer  {token}",
        f"Bearer   {token}",
        f"Bearer\t{token}",
        f"Bearer {token} extra",
        f"Bearer {token}x",
        f"Token {token}",
        f"Basic {token}",
        token,
        "Bearer",
        "Bearer ",
    ]
    wrong = []
    for header in accepted + refused:
        resp = http_request(_tcp(agent), "GET", "/healthz", headers={"Authorization": header})
        want = 200 if header in accepted else 401
        if resp.status != want:
            wrong.append((header.replace(token, "<token>"), resp.status))
    FaultTally(fault="api: loose bearer headers", injected=len(refused)).assert_clean()
    assert wrong == []


def _tcp(agent: Agent) -> Any:
    import http.client

    assert agent.port is not None
    return http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)


def test_openapi_document_says_what_the_server_enforces(agent: Agent) -> None:
    """Issue 12: the restore body is required, ``wait`` is a strict boolean, every refusal is documented."""
    spec = agent.request("GET", "/v1/openapi.json").body
    restore = spec["paths"]["/v1/backup/{backup_id}/restore"]["post"]
    assert restore["requestBody"]["required"] is True
    assert spec["paths"]["/v1/backup/cleanup"]["post"]["requestBody"]["required"] is False
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            for code in ("400", "401", "403"):
                assert code in responses, (method, path, code)
            if "requestBody" in op:
                for code in ("408", "413", "415", "422"):
                    assert code in responses, (method, path, code)
            if method == "post" and "202" in responses:  # every job route documents the retry refusals
                for code in ("409", "429"):
                    assert "Retry-After" in responses[code].get("headers", {}), (path, code)
            for param in op.get("parameters", []):
                if param["name"] == "wait":
                    assert param["schema"] == {"type": "boolean"}
    assert "case-insensitive" in json.dumps(spec["components"]["securitySchemes"]).lower()
    assert _is_problem(agent.request("POST", "/v1/backup?wait=null", {}), 400)
