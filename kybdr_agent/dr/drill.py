"""Test failover and test failback (the seed's "non-disruptive failover testing").

Every guard and precondition of the real operation — the machine's own dry run of the command, so the drill
reports exactly what a failover would meet — plus the privileges it needs on both databases, the peer, each
witness, the lease and the record; then a timed write, INSYNC and delete of ``kybdr-failover-test.<domain>``.
No promotion, no fence, no production record touched, no state changed; recorded as an operation.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from kybdr_agent.dr import machine
from kybdr_agent.dr.dns import DnsError
from kybdr_agent.dr.machine import Failback, Failover, Refusal
from kybdr_agent.dr.observations import Region, other
from kybdr_agent.dr.privileges import privilege_check

if TYPE_CHECKING:
    from kybdr_agent.dr.component import DRComponent


async def run_drill(dr: DRComponent, kind: Literal["test-failover", "test-failback"]) -> dict[str, Any]:
    """Every guard and precondition of a real operation, checked and reported; a timed write and delete of
    the test record; no promotion, no fencing, no production record touched, no state changed."""
    started = time.monotonic()
    steps: dict[str, float] = {}
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str, *, soft: bool = False) -> None:
        checks.append({"name": name, "ok": ok, "soft": soft, "detail": detail})

    t = time.monotonic()
    obs = await dr.parts.prober.observe()
    steps["probe"] = time.monotonic() - t
    target: Region = "dr" if kind == "test-failover" else "primary"
    source = other(target)
    now = dr.clock()
    dry = machine.command(dr.state, Failover() if kind == "test-failover" else Failback(), now, dr.policy, obs)
    if isinstance(dry, Refusal):
        check("machine", False, dry.reason)
        for guard in dry.guards:
            check(guard.name, guard.ok, guard.detail, soft=guard.soft)
    else:
        check("machine", True, f"a {kind.removeprefix('test-')} would start now")
        for guard in machine.evaluate_guards(dr.state, obs, now, dr.policy, forced=False):
            check(guard.name, guard.ok, guard.detail, soft=guard.soft)
    target_db = obs.db.get(target)
    check(
        f"{target}-database-promotable",
        bool(target_db and target_db.reachable and target_db.in_recovery),
        "reachable and in recovery"
        if target_db and target_db.reachable
        else (target_db.error if target_db else "not probed"),
    )
    t = time.monotonic()
    check("promote-privilege", *await _privilege(dr, target, "pg_promote"))
    check("fence-privilege", *await _privilege(dr, source, "alter_system"))
    steps["privileges"] = time.monotonic() - t
    if dr.settings.peer_url:
        peer = obs.peer
        check(
            "peer-reachable",
            bool(peer and peer.reachable),
            peer.error if peer and not peer.reachable else "answered",
        )
    for witness in obs.witnesses:
        check(f"witness {witness.target}", witness.reachable, witness.error or f"HTTP {witness.status}")
    if dr.parts.lease is not None:
        check("lease", dr.holder, "held by this agent" if dr.holder else f"held by {dr.lease_holder}")
    if dr.parts.dns is not None:
        try:
            t = time.monotonic()
            current = await dr.parts.dns.current()
            steps["dns_read"] = time.monotonic() - t
            check(
                "dns-record",
                current is not None,
                f"points at the {current} load balancer" if current else "not found",
            )
            t = time.monotonic()
            result, delete_s = await dr.parts.dns.test_record(target)
            steps["dns_test_write"] = result.submitted_s
            steps["dns_test_insync"] = result.insync_s
            steps["dns_test_delete"] = delete_s
            check(
                "dns-test-record",
                result.verified,
                f"{result.record} → {result.target.dns_name}, in sync and deleted",
            )
        except DnsError as exc:
            check("dns-test-record", False, str(exc))
    hard_failed = [c for c in checks if not c["ok"] and not c["soft"]]
    soft_failed = [c for c in checks if not c["ok"] and c["soft"]]
    outcome = "failed" if hard_failed else ("passed-with-warnings" if soft_failed else "passed")
    steps = {name: round(seconds, 3) for name, seconds in steps.items()}
    return dr.record(
        "operation",
        {
            "operation": kind,
            "trigger": "manual",
            "outcome": outcome,
            "duration_s": round(time.monotonic() - started, 3),
            "steps": steps,
            "checks": checks,
            "target": target,
        },
    )


async def _privilege(dr: DRComponent, region: Region, what: Literal["pg_promote", "alter_system"]) -> tuple[bool, str]:
    return await privilege_check(
        dr.parts.executor.config.databases[region],
        database=dr.parts.executor.config.maintenance_database,
        what=what,
        timeout=dr.settings.probe_timeout.total_seconds() * 2,
    )
