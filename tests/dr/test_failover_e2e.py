"""End to end: two agents as real processes, a real primary/standby pair, Route53 and ELBv2 on moto.

The primary dies; the DR agent sees it fail ``failover_threshold`` rounds, a witness agrees, the old primary
cannot be fenced (it is dead) so the agent waits out its self-fence deadline, promotes the standby, verifies
a write and switches the record — every step in the history.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dr_support import DRWorld, dr_world, wait_until, writable
from tests.support import MotoServer


@pytest.fixture
def world(tmp_path: Path, moto_server: MotoServer) -> Iterator[DRWorld]:
    with dr_world(tmp_path, moto_server) as world:
        yield world


def test_primary_death_fails_over_fences_switches_dns_and_records_every_step(world: DRWorld) -> None:
    world.start("primary")
    dr = world.start("dr")
    wait_until("steady", lambda: dr.status()["state"] == "steady", timeout=30)
    status = dr.status()
    assert status["active"] == "primary"
    assert status["vantage"] == "multi"
    assert world.route53.target() == "primary"

    # The primary region dies: its database, its health URL, and its agent; the witness no longer sees it.
    world.kill("primary")
    world.pair.crash(world.primary)
    world.health["primary"].set("fail")
    world.witness.set("fail")
    died = time.monotonic()

    wait_until("DR writable", lambda: writable(world.standby), timeout=60)
    writable_after = time.monotonic() - died
    wait_until("DNS switched", lambda: world.route53.target() == "dr", timeout=30)
    wait_until("steady on dr", lambda: dr.status()["state"] == "steady" and dr.status()["active"] == "dr")
    world.standby.psql("postgres", "CREATE TABLE after_failover(x int); INSERT INTO after_failover VALUES (1)")

    operations = dr.history(kind="operation")
    failover = [op for op in operations if op.get("operation") == "failover"]
    assert len(failover) == 1, operations
    assert failover[0]["outcome"] == "succeeded"
    assert failover[0]["trigger"] == "auto"
    steps = [e["step"] for e in dr.history(kind="result")]
    assert steps[:1] == ["fence"]
    assert "promote" in steps
    assert "dns" in steps
    transitions = [(e["from"], e["to"]) for e in dr.history(kind="transition")]
    assert ("confirming", "fencing") in transitions
    assert writable_after < 60

    # The history reaches the repository right after the operation (immutable objects under dr/history/).
    copied = world.tmp / "repo" / "dr" / "history"
    wait_until("history copied", lambda: copied.exists() and any(copied.rglob("*.jsonl")), timeout=20)
    lines = [line for path in copied.rglob("*.jsonl") for line in path.read_text().splitlines()]
    assert any('"operation": "failover"' in line or '"operation":"failover"' in line for line in lines)
