"""End to end: the DR control API, the ``dr`` CLI's management script and their refusals, against real agents.

One world (``tests.dr_support``: a real primary/standby pair, Route53/ELBv2 on moto, both agents as real
processes) serves the first test, in an order where nothing earlier disturbs what comes later:

- the test failover drill (the seed's curl, no body, ``?wait=true``): every check reported, every step timed,
  the test record ``kybdr-failover-test.<domain>`` written and deleted, and nothing else touched — the
  production record, the primary, the standby; a test failback while the primary is active fails clearly;
- the eleven endpoints of the seed with their methods and paths (OpenAPI and a real call of each), the
  status, health and history documents;
- the auto switches, flipped through the API, survive an agent restart;
- TCP with the admin bearer token (401 without it);
- ``scripts/manage-backup-dr.sh`` with the real agent (status works; a wrong ``--dr-region`` is refused);
- last, a real failover made slow by a ``fence_command`` sleeping 3 s: a second failover (and a failback)
  gets 409 while it runs, and ``GET status`` stays fast.

The second test needs no world: an agent without ``[dr]`` answers 503 ``dr-not-configured``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kybdr_agent.postgres.cluster import Cluster
from tests.daemon_support import Response, UnixHTTPConnection, http_request, start_daemon
from tests.dr_aws import DR_REGION, PRIMARY_REGION
from tests.dr_support import AgentSetup, DRWorld, dr_world, wait_until, writable
from tests.support import KYBDR, MotoServer

PREFIX = "/v1/disaster-recovery"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "manage-backup-dr.sh"
# The seed's "Disaster Recovery Endpoints" table: method and path of each of the eleven.
SEED_ENDPOINTS = [
    ("GET", "/status"),
    ("GET", "/health"),
    ("POST", "/failover"),
    ("POST", "/failback"),
    ("POST", "/test-failover"),
    ("POST", "/test-failback"),
    ("POST", "/auto-failover/enable"),
    ("POST", "/auto-failover/disable"),
    ("POST", "/auto-failback/enable"),
    ("POST", "/auto-failback/disable"),
    ("GET", "/history"),
]
SLOW_FENCE_SECONDS = 3


@pytest.fixture
def world(tmp_path: Path, moto_server: MotoServer) -> Iterator[DRWorld]:
    with dr_world(tmp_path, moto_server) as world:
        yield world


def _curl_post(agent: AgentSetup, path: str) -> Response:
    """``curl -X POST <path>`` as the seed shows it: no body and no Content-Type header at all."""
    conn = UnixHTTPConnection(str(agent.socket))
    try:
        conn.request("POST", path)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(data) if data else None)


def _only_job(response: Response) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = response.body["jobs"]
    assert len(jobs) == 1, response.body
    return jobs[0]


def _record_names(world: DRWorld) -> list[str]:
    return [r["Name"].rstrip(".").lower() for r in world.route53.records()]


def _script(*args: str, config_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KYBDR_CONFIG_DIR": str(config_dir),
        "KYBDR_AGENT": f"{sys.executable} -m kybdr_agent",
        "KYBDR_PYTHON": sys.executable,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def _slow_fence_command(tmp: Path) -> list[str]:
    """An operator's fence hook that takes its time (a cloud API call, say) and then reports success."""
    script = tmp / "slow-fence.sh"
    script.write_text(f"#!/bin/sh\nsleep {SLOW_FENCE_SECONDS}\nexit 0\n")
    script.chmod(0o700)
    return [str(script)]


def test_drills_endpoints_switches_tcp_script_and_409(world: DRWorld, tmp_path: Path) -> None:
    # The slow fence hook is configured from the start; it only matters for the failover at the very end.
    world.write_configs(dr={"fence_command": _slow_fence_command(tmp_path)})
    world.start("primary")
    dr = world.start("dr")
    wait_until("steady", lambda: dr.status()["state"] == "steady", timeout=30)
    wait_until("the lease", lambda: dr.status()["holds_lease"], timeout=30)
    test_record = f"kybdr-failover-test.{world.route53.domain}".lower()
    records_before = world.route53.records()

    # --- test failover: the seed's curl (no body), waited for ---------------------------------------------
    response = _curl_post(dr, f"{PREFIX}/test-failover?wait=true")
    assert response.status == 200, response.body
    job = _only_job(response)
    assert job["status"] == "succeeded", job
    drill = job["result"]
    assert drill["operation"] == "test-failover"
    assert drill["outcome"] in ("passed", "passed-with-warnings"), drill
    checks = {c["name"]: c for c in drill["checks"]}
    for check in drill["checks"]:
        assert set(check) >= {"name", "ok", "soft", "detail"}, check
    # Each guard and precondition of a real failover is there, and the hard ones pass.
    for name in (
        "machine",
        "standby",
        "timeline",
        "lag",
        "staleness",
        "cooldown",
        "dr-database-promotable",
        "promote-privilege",
        "fence-privilege",
        "peer-reachable",
        "lease",
        "dns-record",
        "dns-test-record",
    ):
        assert name in checks, (name, sorted(checks))
    assert [c for c in drill["checks"] if not c["ok"] and not c["soft"]] == []
    assert checks["dns-test-record"]["ok"] is True
    assert test_record in checks["dns-test-record"]["detail"].lower()
    assert "deleted" in checks["dns-test-record"]["detail"]
    assert "primary" in checks["dns-record"]["detail"]
    # Every step timed, the test record's write, sync and delete among them.
    for step in ("probe", "privileges", "dns_read", "dns_test_write", "dns_test_insync", "dns_test_delete"):
        assert isinstance(drill["steps"][step], int | float), drill["steps"]
        assert drill["steps"][step] >= 0
    # Nothing touched: the test record is gone, the production record still → primary, roles unchanged.
    assert test_record not in _record_names(world)
    assert world.route53.records() == records_before
    assert world.route53.target() == "primary"
    assert writable(world.primary)
    assert world.standby.in_recovery()
    status = dr.status()
    assert (status["state"], status["active"], status["operation"]) == ("steady", "primary", None)
    drills = [e for e in dr.history(kind="operation") if e.get("operation") == "test-failover"]
    assert len(drills) == 1, drills
    assert drills[0]["outcome"] == drill["outcome"]
    assert drills[0]["steps"] == drill["steps"]

    # --- test failback while the primary region is active: failed, with the reason; nothing changes --------
    response = _curl_post(dr, f"{PREFIX}/test-failback?wait=true")
    assert response.status == 200, response.body
    job = _only_job(response)
    assert job["status"] == "failed", job
    assert "primary region is already active" in job["error"], job["error"]
    assert job["result"]["outcome"] == "failed"
    assert {"name": "machine", "ok": False}.items() <= next(
        c for c in job["result"]["checks"] if c["name"] == "machine"
    ).items()
    status = dr.status()
    assert (status["state"], status["active"], status["operation"]) == ("steady", "primary", None)
    assert world.route53.target() == "primary"
    assert writable(world.primary)
    assert world.standby.in_recovery()
    assert test_record not in _record_names(world)
    failed_drills = [e for e in dr.history(kind="operation") if e.get("operation") == "test-failback"]
    assert [d["outcome"] for d in failed_drills] == ["failed"]

    # --- the eleven endpoints: in the OpenAPI document with the seed's methods, and each one answering ------
    spec = dr.request("GET", "/v1/openapi.json")
    assert spec.status == 200
    for method, path in SEED_ENDPOINTS:
        assert method.lower() in spec.body["paths"].get(PREFIX + path, {}), (method, path)
        # The other method on the same path is not an alias: 405, so the path exists with only its method.
        wrong = "POST" if method == "GET" else "GET"
        assert dr.request(wrong, PREFIX + path).status == 405, (wrong, path)

    status = dr.status()
    assert status["state"] == "steady"
    assert status["active_region"] == PRIMARY_REGION
    assert status["dr_region"] == DR_REGION
    assert status["auto_failover"] is True
    assert status["auto_failback"] is False
    assert isinstance(status["lease_holder"], str)
    assert status["lease_holder"]
    transition = status["last_transition"]
    assert set(transition) >= {"from", "to", "at", "reason"}, transition
    assert transition["to"] == "steady"

    health = dr.request("GET", f"{PREFIX}/health")
    assert health.status == 200, health.body
    for region in ("primary", "dr"):
        view = health.body["regions"][region]
        assert view["healthy"] is (region == "primary"), view  # the DR region's database is a standby
        assert view["health_check"]["reachable"] is True, view
        assert view["health_check"]["status"] == 200, view
        assert view["database"]["reachable"] is True, view
    assert health.body["regions"]["primary"]["name"] == PRIMARY_REGION
    assert health.body["regions"]["dr"]["database"]["in_recovery"] is True
    assert len(health.body["witnesses"]) == 1
    assert health.body["witnesses"][0]["reachable"] is True
    assert health.body["peer"]["reachable"] is True

    history = dr.request("GET", f"{PREFIX}/history")
    assert history.status == 200, history.body
    assert history.body["entries"]
    stats = history.body["statistics"]
    assert stats["count_by_kind"] == {"test-failover": 1, "test-failback": 1}  # operations, by what they were
    assert stats["count_by_outcome"]["test-failback"] == {"failed": 1}
    assert stats["last_drill"]["operation"] == "test-failback"
    assert set(stats["time_to_failover_s"]) >= {"count", "mean", "worst"}
    assert stats["time_to_failover_s"]["count"] == 0  # no real failover yet
    assert dr.request("GET", f"{PREFIX}/history?limit=1").body["entries"][-1] == history.body["entries"][-1]
    assert dr.request("GET", f"{PREFIX}/history?kind=bogus").status == 400

    # A failback while the primary region is active: refused by the guard before any job exists.
    refused = dr.request("POST", f"{PREFIX}/failback", {"force": False})
    assert refused.status == 412, refused.body
    assert "dr-guard-refused" in refused.body["type"]

    # --- the switches flip, and survive a restart of the agent --------------------------------------------
    flipped = dr.request("POST", f"{PREFIX}/auto-failover/disable")
    assert flipped.status == 200, flipped.body
    assert flipped.body["auto_failover"] is False
    flipped = dr.request("POST", f"{PREFIX}/auto-failback/enable")
    assert flipped.status == 200, flipped.body
    assert flipped.body["auto_failback"] is True
    assert dr.request("POST", f"{PREFIX}/auto-failover/enable").body["auto_failover"] is True
    assert dr.request("POST", f"{PREFIX}/auto-failover/disable").body["auto_failover"] is False
    assert dr.request("POST", f"{PREFIX}/auto-failback/disable").body["auto_failback"] is False
    assert dr.request("POST", f"{PREFIX}/auto-failback/enable").body["auto_failback"] is True
    switches = [(e["name"], e["value"]) for e in dr.history(kind="switch")]
    assert switches[-2:] == [("auto_failback", False), ("auto_failback", True)], switches
    world.stop("dr")
    dr = world.start("dr")
    status = dr.status()
    assert (status["auto_failover"], status["auto_failback"]) == (False, True), status
    wait_until("steady after the restart", lambda: dr.status()["state"] == "steady", timeout=30)
    assert (dr.status()["auto_failover"], dr.status()["auto_failback"]) == (False, True)

    # --- TCP with the admin token ---------------------------------------------------------------------------
    assert dr.daemon is not None
    over_tcp = dr.daemon.tcp_request(dr.port, "GET", f"{PREFIX}/status", token=dr.token)
    assert over_tcp.status == 200, over_tcp.body
    assert over_tcp.body["state"] == "steady"
    assert dr.daemon.tcp_request(dr.port, "GET", f"{PREFIX}/status").status == 401
    assert dr.daemon.tcp_request(dr.port, "GET", f"{PREFIX}/status", token="not-" + dr.token).status == 401
    assert dr.daemon.tcp_request(dr.port, "POST", f"{PREFIX}/auto-failover/enable").status == 401
    assert dr.status()["auto_failover"] is False  # the refused request changed nothing
    toggled = dr.daemon.tcp_request(dr.port, "POST", f"{PREFIX}/auto-failback/disable", token=dr.token)
    assert toggled.status == 200, toggled.body
    assert toggled.body["auto_failback"] is False

    # --- scripts/manage-backup-dr.sh with the real agent ----------------------------------------------------
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(dr.config, etc / "production.toml")
    done = _script("status", "-e", "production", config_dir=etc)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "steady" in done.stdout, done.stdout
    assert PRIMARY_REGION in done.stdout, done.stdout
    done = _script("status", "-e", "production", "--json", config_dir=etc)
    assert done.returncode == 0, (done.stdout, done.stderr)
    done = _script("failover", "--dr-region", "us-east-1", "-e", "production", config_dir=etc)
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert "us-east-1" in done.stderr
    assert DR_REGION in done.stderr
    assert "does not match dr.dr_region" in done.stderr, done.stderr
    assert dr.status()["active"] == "primary"  # nothing was failed over
    assert writable(world.primary)

    # --- 409 while a (slow) failover runs; status stays fast ------------------------------------------------
    started = dr.request("POST", f"{PREFIX}/failover", {"force": False, "reason": "api e2e: slow fence"})
    assert started.status == 202, started.body
    failover_job = _only_job(started)
    second = dr.request("POST", f"{PREFIX}/failover", {"force": False})
    assert second.status == 409, second.body
    assert "dr-busy" in second.body["type"]
    assert second.body["status"] == 409
    failback = dr.request("POST", f"{PREFIX}/failback?wait=true", {})
    assert failback.status == 409, failback.body
    assert dr.status()["executing"] == "fence"  # the fence hook is still sleeping
    slowest = 0.0
    for _ in range(5):
        began = time.monotonic()
        status = dr.status()
        slowest = max(slowest, time.monotonic() - began)
        assert status["operation"] is not None
        assert status["operation"]["kind"] == "failover"
        time.sleep(0.2)
    assert slowest < 1.0, slowest
    done_job = dr.daemon.wait_job(failover_job["id"], timeout=60)
    assert done_job["status"] == "succeeded", (done_job, dr.log())
    assert done_job["result"]["steps"]["fence"] >= SLOW_FENCE_SECONDS
    assert writable(world.standby)
    assert not writable(world.primary)
    assert world.route53.target() == "dr"
    status = dr.status()
    assert (status["active"], status["active_region"]) == ("dr", DR_REGION)
    failovers = [e for e in dr.history(kind="operation") if e.get("operation") == "failover"]
    assert [(f["trigger"], f["outcome"]) for f in failovers] == [("manual", "succeeded")]
    stats = dr.request("GET", f"{PREFIX}/history").body["statistics"]
    assert stats["time_to_failover_s"]["count"] == 1
    assert stats["count_by_kind"]["failover"] == 1
    assert stats["time_to_failover_s"]["worst"] >= SLOW_FENCE_SECONDS


def test_without_dr_every_endpoint_answers_503(pg: Cluster, tmp_path: Path) -> None:
    """A plain agent (no ``[dr]`` section): the DR API says it is not configured, and the CLI says so too."""
    socket_path = tmp_path / "control.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[backup]\nbackup_dir = "{tmp_path / "state"}"\nencryption = false\n\n'
        f'[database]\ndsn = "host={pg.socket_dir} port={pg.port} user=postgres"\n\n'
        f'[repository]\nurl = "file://{tmp_path / "repo"}"\n\n'
        f'[control]\nsocket = "{socket_path}"\n\n[drill]\nschedule = ""\n\n'
        "[daemon]\nshutdown_grace_seconds = 2\n"
    )
    agent = start_daemon(config, socket_path, tmp_path)
    try:
        for method, path in SEED_ENDPOINTS:
            body: dict[str, Any] | None = (
                {} if path in ("/failover", "/failback", "/test-failover", "/test-failback") else None
            )
            response = http_request(UnixHTTPConnection(str(socket_path)), method, PREFIX + path, body)
            assert response.status == 503, (method, path, response.body)
            assert "dr-not-configured" in response.body["type"], response.body
            assert response.headers["content-type"].startswith("application/problem+json")
        failover = agent.request("POST", f"{PREFIX}/failover", {"force": False})
        assert failover.status == 503
        assert "[dr]" in failover.body["detail"]
        done = subprocess.run(
            [*KYBDR, "--config", str(config), "dr", "status"], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode != 0, done.stdout
        assert "not configured" in done.stderr, done.stderr
    finally:
        assert agent.stop() == 0, agent.log()


def test_no_split_brain_alarm_after_a_clean_manual_failover(world: DRWorld, tmp_path: Path) -> None:
    """A manual failover (fence slowed to 3 s by the hook) fences the primary before promoting; the agent's
    next rounds must see it fenced, not raise a split-brain alarm from what it saw before the failover."""
    world.write_configs(dr={"fence_command": _slow_fence_command(tmp_path)})
    world.start("primary")
    dr = world.start("dr")
    wait_until("steady", lambda: dr.status()["state"] == "steady", timeout=30)
    wait_until("the lease", lambda: dr.status()["holds_lease"], timeout=30)
    response = dr.request("POST", f"{PREFIX}/failover?wait=true", {"force": False})
    assert response.status == 200, response.body
    assert _only_job(response)["status"] == "succeeded", response.body
    assert not writable(world.primary)
    time.sleep(2.5)  # two more rounds of the agent's loop
    history = dr.history()
    done = next(e for e in history if e["kind"] == "operation" and e.get("operation") == "failover")
    after = [e for e in history if e["seq"] > done["seq"]]
    # What the agent made of its next rounds: the primary fenced, the DR database writable — steady. A view
    # from before the failover shows either the primary writable (a split-brain alarm and a fence) or the DR
    # database still a standby (the active DR region "failing": suspect).
    transitions = [(e["from"], e["to"], e["reason"]) for e in after if e["kind"] == "transition"]
    alarms = [e["message"] for e in after if e["kind"] == "alert" and "split brain" in e["message"]]
    assert [t[:2] for t in transitions] == [("dns_switching", "steady")], transitions
    assert alarms == [], alarms
