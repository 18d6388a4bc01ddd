"""What the DR component shows: ``GET /v1/disaster-recovery/status`` and ``/health``, built from its state
and its last round of probes (nothing here does I/O)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from kybdr_agent.dr import machine
from kybdr_agent.dr.observations import REGIONS, Observations, Region

if TYPE_CHECKING:
    from kybdr_agent.dr.component import DRComponent


def status_view(dr: DRComponent) -> dict[str, Any]:
    state = dr.state
    transition = state.last_transition
    vantage = state.vantage
    status: dict[str, Any] = {
        "enabled": dr.settings.enabled,
        "role": dr.role,
        "state": dr.phase(),
        "active": state.active,
        "active_region": dr.region_names[state.active],
        "primary_region": dr.region_names["primary"],
        "dr_region": dr.region_names["dr"],
        "auto_failover": state.switches.auto_failover,
        "auto_failback": state.switches.auto_failback,
        "paused": state.switches.paused,
        "lease_holder": dr.lease_holder if dr.parts.lease is not None else "this agent (no lease configured)",
        "holds_lease": dr.holder,
        "last_transition": (
            {
                "from": transition.from_phase,
                "to": transition.to_phase,
                "at": transition.at.isoformat(),
                "reason": transition.reason,
            }
            if transition
            else None
        ),
        "failures": state.failures,
        "failover_threshold": dr.policy.failover_threshold,
        "recoveries": state.recoveries,
        "failback_threshold": dr.policy.failback_threshold,
        "vantage": vantage,
        "vantage_note": (
            "single vantage point: no witness or peer is configured, so this agent cannot tell a dead "
            "primary from a cut link; automatic failover relies on its own probes alone"
            if vantage == "single"
            else "confirmed by a witness or the peer before any automatic failover"
        ),
        "operation": operation_view(state.operation),
        "executing": dr.executing,
        "halted_reason": state.halted_reason or None,
        "guards": [{"name": g.name, "ok": g.ok, "soft": g.soft, "detail": g.detail} for g in state.guards],
        "last_probe_at": dr.last_obs.at.isoformat() if dr.last_obs else None,
    }
    if dr.role == "primary":
        status["fenced"] = dr.primary_side.fenced
        status["last_contact"] = iso(dr.primary_side.last_contact)
    return status


def health_view(dr: DRComponent) -> dict[str, Any]:
    obs = dr.last_obs
    if obs is None:
        return {"at": None, "regions": {}, "witnesses": [], "peer": None, "note": "no probe has completed yet"}
    data = obs.to_json()
    regions: dict[str, Any] = {}
    for region in REGIONS:
        regions[region] = {
            "name": dr.region_names[region],
            "healthy": region_ok(obs, region),
            "health_check": data["health"].get(region),
            "database": data["db"].get(region),
        }
    return {"at": data["at"], "regions": regions, "witnesses": data["witnesses"], "peer": data["peer"]}


def region_ok(obs: Observations, region: Region) -> bool:
    health = obs.health.get(region)
    db = obs.db.get(region)
    return (health is None or health.ok) and db is not None and db.writable


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def operation_view(operation: machine.Operation | None) -> dict[str, Any] | None:
    if operation is None:
        return None
    return {
        "id": operation.id,
        "kind": operation.kind,
        "trigger": operation.trigger,
        "forced": operation.forced,
        "allow_unfenced": operation.allow_unfenced,
        "from": operation.source,
        "to": operation.target,
        "step": operation.step,
        "started_at": operation.started_at.isoformat(),
        "fence_deadline": iso(operation.fence_deadline),
        "steps": dict(operation.steps),
        "data_loss_risk": operation.data_loss_risk,
        "reason": operation.reason,
    }
