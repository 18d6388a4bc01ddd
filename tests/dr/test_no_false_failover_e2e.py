"""End to end: the failovers that must NOT happen, and the manual ones that must still work.

Each test is a real two-agent world (``tests.dr_support.dr_world``): a primary/standby pair, the region link
as a TCP proxy, scripted health URLs and witness, Route53/ELBv2 on moto, both agents as processes. The
scenarios are the issue's "never when it must not" list:

* a flapping primary (never ``failover_threshold`` failures in a row) never reaches ``confirming``;
* a primary whose health URL fails while its WAL still reaches the standby is alive: the WAL-progress veto
  holds, and it is the only thing holding (the peer's view is cut off, the witness denies);
* with ``auto_failover`` off a dead primary only raises an alert, and an operator's failover then works;
* a standby whose replication stalled longer than ``max_staleness`` before the primary died is not promoted
  automatically nor by a plain manual request (412 with the guards), only by a forced one, recorded as such —
  and the CLI shows the same (status table and JSON, the auto-failover switch, a refusal with its guards).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dr_net import HttpMode, TcpProxy, WriteProber
from tests.dr_support import AgentSetup, DRWorld, _aws_env, dr_world, route_standby_through, wait_until, writable
from tests.support import MotoServer, run_cli

FAILOVER = "/v1/disaster-recovery/failover"


@pytest.fixture
def world(tmp_path: Path, moto_server: MotoServer) -> Iterator[DRWorld]:
    with dr_world(tmp_path, moto_server) as world:
        yield world


def start_both(world: DRWorld) -> AgentSetup:
    """Both agents running and the DR agent steady with the primary region active; returns the DR agent."""
    world.start("primary")
    dr = world.start("dr")
    wait_until("steady", lambda: dr.status()["state"] == "steady", timeout=30)
    assert dr.status()["active"] == "primary"
    assert world.route53.target() == "primary"
    return dr


def transitions(agent: AgentSetup) -> list[tuple[str, str]]:
    return [(e["from"], e["to"]) for e in agent.history(kind="transition")]


def alerts(agent: AgentSetup) -> list[str]:
    return [str(e.get("message", "")) for e in agent.history(kind="alert")]


def guard(status_or_problem: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((g for g in status_or_problem.get("guards") or [] if g["name"] == name), None)


def guard_ok(status_or_problem: dict[str, Any], name: str) -> bool:
    found = guard(status_or_problem, name)
    assert found is not None, f"no guard {name} in {status_or_problem.get('guards')}"
    return bool(found["ok"])


def primary_region_dies(world: DRWorld) -> None:
    """As in test_failover_e2e: its agent, its database and its health URL die; the witness stops seeing it."""
    world.kill("primary")
    world.pair.crash(world.primary)
    world.health["primary"].set("fail")
    world.witness.set("fail")


def assert_no_failover(world: DRWorld, dr: AgentSetup) -> None:
    """Nothing changed roles: the standby still replays, the record still points at the primary, no
    operation and no fencing in the history, the operation slot empty."""
    assert world.standby.in_recovery(), "the standby was promoted"
    assert world.route53.target() == "primary"
    status = dr.status()
    assert status["active"] == "primary", status
    assert status["operation"] is None, status
    assert dr.history(kind="operation") == []
    assert not [t for t in transitions(dr) if t[1] in ("fencing", "promoting", "dns_switching")], transitions(dr)
    assert dr.history(kind="intent") == []


class Flapper:
    """Alternates health URL and witness between "fail" and "ok" on a fixed schedule, in its own thread.

    A fail window shorter than two probe intervals holds at most two probes in a row, and an ok window
    longer than one interval holds at least one: the failure count reaches 2 (threshold - 1) at most, then
    resets — never the threshold of 3.
    """

    def __init__(self, world: DRWorld, *, fail_s: float, ok_s: float) -> None:
        self.world = world
        self.fail_s = fail_s
        self.ok_s = ok_s
        self.stop = threading.Event()
        self.cycles = 0
        self.thread = threading.Thread(target=self._run, name="flapper", daemon=True)

    def _set(self, mode: HttpMode) -> None:
        self.world.health["primary"].set(mode)
        self.world.witness.set(mode)

    def _run(self) -> None:
        while not self.stop.is_set():
            self._set("fail")
            if self.stop.wait(self.fail_s):
                break
            self._set("ok")
            self.cycles += 1
            self.stop.wait(self.ok_s)
        self._set("ok")

    def __enter__(self) -> Flapper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def test_flapping_primary_never_reaches_the_threshold_and_never_fails_over(world: DRWorld) -> None:
    dr = start_both(world)
    phases: set[str] = set()
    most_failures = 0
    with Flapper(world, fail_s=1.2, ok_s=1.8) as flapper:
        deadline = time.monotonic() + 9.5
        while time.monotonic() < deadline:
            status = dr.status()
            phases.add(status["state"])
            most_failures = max(most_failures, status["failures"])
            time.sleep(0.1)
    assert flapper.cycles >= 3

    # The failures were counted (the checks did fail) but never reached the threshold.
    assert most_failures >= 1, "no failed check was ever counted: the flapping did not reach the agent"
    assert most_failures < 3, most_failures
    assert phases <= {"steady", "suspect"}, phases
    assert ("steady", "suspect") in transitions(dr)
    assert not [t for t in transitions(dr) if t[1] == "confirming"], transitions(dr)
    assert_no_failover(world, dr)
    assert writable(world.primary)
    wait_until("steady again", lambda: dr.status()["state"] == "steady", timeout=15)


def test_health_url_down_while_wal_flows_is_vetoed_by_wal_progress(world: DRWorld) -> None:
    dr = start_both(world)
    # Only the WAL may speak for the primary: the DR agent cannot hear its peer (which would report its
    # database writable), and the witness denies. The primary agent still hears the DR agent, so it does not
    # fence itself.
    world.peer_links["dr"].set("refuse")
    dsns = {"primary": world.pair.dsn(world.primary), "standby": world.pair.dsn(world.standby)}
    vetoed_by_wal: list[dict[str, Any]] = []
    phases: set[str] = set()
    with WriteProber(dsns, password_file=world.pair.password_file, interval=0.1, timeout=2.0) as prober:
        wait_until("the writer's first row", lambda: prober.accepted("primary") > 0, timeout=15)
        world.health["primary"].set("fail")
        world.witness.set("fail")
        # Until the veto has held for four rounds past the threshold (a bound, not a timing assertion).
        deadline = time.monotonic() + 30
        while len({s["last_probe_at"] for s in vetoed_by_wal}) < 4 and time.monotonic() < deadline:
            status = dr.status()
            phases.add(status["state"])
            wal = guard(status, "wal_progress")
            if status["state"] == "confirming" and wal is not None and not wal["ok"]:
                vetoed_by_wal.append(status)
            time.sleep(0.2)
        written = prober.accepted("primary")
        assert prober.both_writable_moments() == []
    assert written > 20, written

    # The checks failed long enough to confirm — and the veto was the WAL, nothing else.
    assert "confirming" in phases, phases
    vetoed_rounds = len({s["last_probe_at"] for s in vetoed_by_wal})
    assert vetoed_rounds >= 4, f"the wal_progress veto showed in {vetoed_rounds} round(s); phases {phases}"
    last = vetoed_by_wal[-1]
    assert guard_ok(last, "witness_view"), last["guards"]
    assert guard_ok(last, "peer_view"), last["guards"]
    assert guard_ok(last, "confirmation"), last["guards"]
    assert any("WAL still arriving" in message for message in alerts(dr)), alerts(dr)
    assert_no_failover(world, dr)
    assert writable(world.primary)
    # Every row the primary acknowledged reached the standby through the link.
    rows = world.primary.psql("postgres", "SELECT count(*) FROM kybdr_write_probe")
    wait_until(
        "the standby has every row",
        lambda: world.standby.psql("postgres", "SELECT count(*) FROM kybdr_write_probe") == rows,
        timeout=15,
    )

    world.health["primary"].set("ok")
    world.witness.set("ok")
    world.peer_links["dr"].set("pass")
    wait_until("steady again", lambda: dr.status()["state"] == "steady", timeout=15)


def test_auto_failover_disabled_alerts_only_and_a_manual_failover_works(world: DRWorld) -> None:
    world.write_configs(dr={"auto_failover": False})
    dr = start_both(world)
    assert dr.status()["auto_failover"] is False
    # The last acknowledged write before the outage must survive the manual failover.
    world.primary.psql("postgres", "CREATE TABLE before_outage(x int); INSERT INTO before_outage VALUES (42)")
    lsn = world.primary.psql("postgres", "SELECT pg_current_wal_lsn()")
    world.pair.wait_replayed(world.standby, lsn)

    primary_region_dies(world)
    wait_until(
        "the alert that auto-failover is disabled",
        lambda: any("automatic failover is disabled" in m for m in alerts(dr)),
        timeout=30,
    )
    time.sleep(2)  # more rounds: still nothing happens
    status = dr.status()
    assert status["state"] == "confirming", status
    assert_no_failover(world, dr)

    response = dr.request("POST", FAILOVER + "?wait=true", {"force": False})
    assert response.status == 200, response.body
    job = response.body["jobs"][0]
    assert job["status"] == "succeeded", job
    assert writable(world.standby)
    wait_until("DNS switched", lambda: world.route53.target() == "dr", timeout=30)
    assert world.standby.psql("postgres", "SELECT x FROM before_outage") == "42"
    world.standby.psql("postgres", "INSERT INTO before_outage VALUES (43)")

    failovers = [op for op in dr.history(kind="operation") if op.get("operation") == "failover"]
    assert len(failovers) == 1, failovers
    assert failovers[0]["trigger"] == "manual"
    assert failovers[0]["forced"] is False
    assert failovers[0]["outcome"] == "succeeded"
    wait_until("steady on dr", lambda: dr.status()["state"] == "steady" and dr.status()["active"] == "dr")


def cli(agent: AgentSetup, *args: str) -> Any:
    return run_cli(agent.config, "dr", *args, env=_aws_env(), timeout=120)


def test_stale_standby_is_not_promoted_unless_forced_and_the_cli_shows_why(world: DRWorld) -> None:
    # Replication gets its own link, so it can stall while the DR agent still probes the primary database.
    replication = world.stack.enter_context(TcpProxy("127.0.0.1", world.primary.port))
    route_standby_through(world.pair, replication.port)
    wait_until(
        "the standby streams through its own link",
        lambda: (
            world.standby.psql("postgres", "SELECT sender_port FROM pg_stat_wal_receiver", check=False)
            == str(replication.port)
        ),
        timeout=30,
    )
    world.write_configs(dr={"max_staleness": "2s"})
    dr = start_both(world)

    dsns = {"primary": world.pair.dsn(world.primary)}
    with WriteProber(dsns, password_file=world.pair.password_file, interval=0.1, timeout=2.0) as prober:
        wait_until("the writer's first rows", lambda: prober.accepted("primary") > 5, timeout=15)
        replication.set("blackhole")  # silently stalled: the receiver still says "streaming"
        stalled = prober.accepted("primary")
        time.sleep(3)  # longer than max_staleness; the primary keeps acknowledging writes the standby lacks
        wait_until("writes after the stall", lambda: prober.accepted("primary") > stalled + 5, timeout=15)
    assert dr.status()["state"] == "steady"  # staleness alone is no reason for anything while the primary lives

    primary_region_dies(world)
    wait_until(
        "the alert naming the staleness guard",
        lambda: any("no failover" in m and "staleness" in m for m in alerts(dr)),
        timeout=30,
    )
    assert dr.status()["state"] == "confirming"
    assert_no_failover(world, dr)

    # A plain manual failover is refused with the guards in the problem document ...
    refused = dr.request("POST", FAILOVER + "?wait=true", {"force": False})
    assert refused.status == 412, refused.body
    assert guard_ok(refused.body, "staleness") is False, refused.body
    assert guard(refused.body, "staleness")["soft"] is True  # type: ignore[index]
    assert "staleness" in refused.body["detail"]

    # ... and the CLI says the same: refused, the guards on stderr, exit status 1.
    proc = cli(dr, "failover")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "staleness" in proc.stderr
    assert "[WARN] staleness:" in proc.stderr, proc.stderr
    assert world.standby.in_recovery()

    proc = cli(dr, "status")
    assert proc.returncode == 0, proc.stderr
    assert "confirming" in proc.stdout
    assert "auto_failover" in proc.stdout
    assert "guard staleness:" in proc.stdout, proc.stdout
    proc = cli(dr, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    for key in ("state", "active_region", "auto_failover", "auto_failback", "lease_holder", "last_transition"):
        assert key in status, key
    assert status["state"] == "confirming"
    assert status["active_region"] == "us-east-1"
    assert status["auto_failover"] is True

    proc = cli(dr, "auto-failover", "disable")  # answers with the status table
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"auto_failover\W+False", proc.stdout), proc.stdout
    assert dr.status()["auto_failover"] is False
    switches = dr.history(kind="switch")
    assert switches, "no switch record in the history"
    assert (switches[-1]["name"], switches[-1]["value"]) == ("auto_failover", False)

    # Forced: the soft guards are skipped, the fence and its self-fence wait are not.
    response = dr.request("POST", FAILOVER + "?wait=true", {"force": True, "reason": "stale standby, accepted"})
    assert response.status == 200, response.body
    job = response.body["jobs"][0]
    assert job["status"] == "succeeded", job
    assert writable(world.standby)
    wait_until("DNS switched", lambda: world.route53.target() == "dr", timeout=30)

    failovers = [op for op in dr.history(kind="operation") if op.get("operation") == "failover"]
    assert len(failovers) == 1, failovers
    record = failovers[0]
    assert record["outcome"] == "succeeded", record
    assert record["forced"] is True
    assert record["trigger"] == "manual"
    # The writes acknowledged after the stall are lost, and the record says so.
    assert (record["lost_bytes_estimate"] or 0) > 0, record
    steps = [e["step"] for e in dr.history(kind="result")]
    assert steps[:1] == ["fence"], steps
