"""The imperative shell of the DR state machine: each step action becomes exactly one side effect.

``machine`` decides; this module does, one step at a time, and returns a ``StepResult`` the machine reads
back. A step is never cancelled by newer observations (the component runs it to completion before it looks
again) and every step is bounded by its own timeout, so "never cancelled" cannot become "hangs forever".
Nothing here decides whether a step should happen: a fence that fails is reported as failed, and what
follows (wait out the old primary's self-fence deadline, halt, roll back) is the machine's call.

Fencing, in order of preference, because the strongest evidence wins:

1. the old primary's database answers: fence it directly (read-only, every session ended, persisted in
   ``postgresql.auto.conf`` so a restart does not undo it);
2. it does not, but its agent does (``peer_url``): ask the peer to fence the database beside it;
3. ``fence_command``, the operator's own hook (a cloud API call, a power switch), run whatever 1 and 2 said:
   a STONITH the operator wired in counts as fenced on exit 0.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import anyio

from kybdr_agent.dr import pgops
from kybdr_agent.dr.dns import DnsSwitcher
from kybdr_agent.dr.machine import Fence, FenceSelf, Promote, Rejoin, StepResult, SwitchDns, Unfence
from kybdr_agent.dr.observations import Region, other
from kybdr_agent.errors import KybdrError
from kybdr_agent.postgres.connection import Connection
from kybdr_agent.telemetry import get_logger
from kybdr_agent.telemetry.tracing import stage

log = get_logger("kybdr_agent.dr")

PEER_FENCE_PATH: Final = "/v1/disaster-recovery/fence"
FENCE_TIMEOUT_SECONDS: Final = 15.0
PEER_FENCE_MIN_SECONDS: Final = 1.0
REJOIN_TIMEOUT_SECONDS: Final = 600.0

StepAction = Fence | Promote | SwitchDns | Rejoin | Unfence | FenceSelf


@dataclass(frozen=True)
class ExecutorConfig:
    databases: Mapping[Region, Connection]
    maintenance_database: str
    local_region: Region  # the database beside this agent
    pgdata: Path | None
    pg_bin_dir: Path | None
    peer_url: str | None
    peer_token: str | None
    fence_command: tuple[str, ...] | None
    catchup_timeout: float
    promote_timeout: float
    probe_timeout: float


class StepExecutor:
    """Runs one step action; ``dns`` is None when this agent does not switch records (the primary side)."""

    def __init__(self, config: ExecutorConfig, dns: DnsSwitcher | None) -> None:
        self.config = config
        self.dns = dns

    async def run(self, action: StepAction, operation_id: str) -> StepResult:
        started = time.monotonic()
        step = _step_name(action)
        try:
            with stage(f"dr.{step}", operation_id=operation_id, step=step):
                detail = await self._run(action)
        except KybdrError as exc:
            return StepResult(operation_id, step, False, time.monotonic() - started, {}, str(exc))
        except Exception as exc:  # a step must always report back: the machine halts on a failure it sees
            log.exception("dr.step_crashed", step=step)
            return StepResult(operation_id, step, False, time.monotonic() - started, {}, f"internal error: {exc!r}")
        ok = bool(detail.pop("ok", True))
        error = str(detail.pop("error", "")) if not ok else ""
        return StepResult(operation_id, step, ok, time.monotonic() - started, detail, error)

    async def _run(self, action: StepAction) -> dict[str, Any]:
        if isinstance(action, Fence):
            return await self.fence(action.region)
        if isinstance(action, FenceSelf):
            return await self.fence(self.config.local_region, allow_peer=False)
        if isinstance(action, Promote):
            return await self._promote(action.region, action.at_least_lsn)
        if isinstance(action, SwitchDns):
            return await self._switch_dns(action.region)
        if isinstance(action, Unfence):
            await pgops.unfence(
                self.config.databases[action.region],
                database=self.config.maintenance_database,
                timeout=FENCE_TIMEOUT_SECONDS,
            )
            return {"how": "sql"}
        return await self._rejoin(action.region)

    # --- fence ------------------------------------------------------------------------------------

    async def fence(self, region: Region, *, allow_peer: bool = True) -> dict[str, Any]:
        config = self.config
        use_peer = allow_peer and config.peer_url is not None and region != config.local_region
        peer: dict[str, Any] = {}
        sql: list[pgops.FenceResult] = []

        async def by_sql(scope: anyio.CancelScope) -> None:
            sql.append(
                await pgops.fence(
                    config.databases[region], database=config.maintenance_database, timeout=FENCE_TIMEOUT_SECONDS
                )
            )
            if sql[0].fenced or sql[0].reachable:
                scope.cancel()  # the database answered: its own word decides, the peer's is not needed

        # The database and its agent are asked at the same time: when the database is silent (a blackholed
        # link, a powered-off host) the peer's answer, or its silence, then costs no extra time.
        async with anyio.create_task_group() as tg:
            if use_peer:
                tg.start_soon(self._peer_fence_into, peer)
            await by_sql(tg.cancel_scope)
        result = sql[0]
        detail: dict[str, Any] = {
            "region": region,
            "reachable": result.reachable,
            "lsn": result.lsn,
            "how": result.how,
            "detail": result.detail,
        }
        fenced = result.fenced
        if use_peer and not result.reachable:
            detail["peer"] = peer or {"fenced": False, "error": "no answer"}
            if peer.get("fenced"):
                fenced = True
                detail["how"] = "peer"
                detail["lsn"] = peer.get("lsn")
        if config.fence_command:
            hook = await pgops.run_fence_command(
                config.fence_command,
                env={"KYBDR_FENCE_REGION": region, "KYBDR_FENCE_TARGET": config.databases[region].describe()},
                timeout=FENCE_TIMEOUT_SECONDS,
            )
            detail["fence_command"] = {"fenced": hook.fenced, "detail": hook.detail}
            if hook.fenced and not fenced:
                fenced = True
                detail["how"] = "fence_command"
        detail["ok"] = fenced
        if not fenced:
            detail["error"] = f"could not fence the {region} database: {result.detail or 'unreachable'}"
        return detail

    async def _peer_fence_into(self, into: dict[str, Any]) -> None:
        into.update(await self._peer_fence())

    async def _peer_fence(self) -> dict[str, Any]:
        """Ask the other agent to fence the database beside it; any failure is "not fenced", never raised."""
        config = self.config
        assert config.peer_url is not None
        headers = {"Authorization": f"Bearer {config.peer_token}"} if config.peer_token else {}
        # A peer that accepts the connection and never answers (a blackholed link) must not hold the
        # failover for the whole fence timeout: a real peer fence takes ~0.1 s. Giving up early is safe, only
        # slower: an unconfirmed fence means waiting out the old primary's self-fence deadline instead.
        bound = max(PEER_FENCE_MIN_SECONDS, 2 * config.probe_timeout)
        timeout = aiohttp.ClientTimeout(total=bound, connect=config.probe_timeout)
        url = config.peer_url.rstrip("/") + PEER_FENCE_PATH
        try:
            with anyio.fail_after(bound + 1):
                async with (
                    aiohttp.ClientSession(timeout=timeout) as session,
                    session.post(url, json={}, headers=headers) as response,
                ):
                    body = await response.json(content_type=None)
                    if response.status != 200 or not isinstance(body, dict):
                        return {"fenced": False, "error": f"peer answered {response.status}"}
                    return {"fenced": bool(body.get("fenced")), "lsn": body.get("lsn"), "how": body.get("how")}
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            return {"fenced": False, "error": f"peer unreachable: {type(exc).__name__}"}

    # --- promote, DNS, rejoin ---------------------------------------------------------------------

    async def _promote(self, region: Region, at_least_lsn: int | None) -> dict[str, Any]:
        config = self.config
        result = await pgops.promote(
            config.databases[region],
            database=config.maintenance_database,
            catchup_timeout=config.catchup_timeout,
            promote_timeout=config.promote_timeout,
            at_least_lsn=at_least_lsn,
        )
        return {
            "region": region,
            "promoted_lsn": result.promoted_lsn,
            "timeline": result.timeline,
            "receive_lsn": result.receive_lsn,
            "replay_lsn": result.replay_lsn,
            "catchup_s": round(result.waited_catchup_s, 3),
            "promote_s": round(result.promote_s, 3),
        }

    async def _switch_dns(self, region: Region) -> dict[str, Any]:
        if self.dns is None:
            return {"ok": False, "error": "this agent does not switch DNS (dr.role is not 'dr')"}
        result = await self.dns.point_at(region)
        return {
            "region": region,
            "record": result.record,
            "target": result.target.dns_name,
            "change_id": result.change_id,
            "submitted_s": round(result.submitted_s, 3),
            "insync_s": round(result.insync_s, 3),
            "verified": result.verified,
            "ok": result.verified,
            "error": "" if result.verified else "the record did not read back as the new target",
        }

    async def _rejoin(self, region: Region) -> dict[str, Any]:
        config = self.config
        if region != config.local_region or config.pgdata is None:
            return {
                "ok": False,
                "error": f"the {region} database must be rejoined on its own host: run `kybdr-agent dr rejoin` there",
            }
        from kybdr_agent.dr.rejoin import rejoin

        result = await rejoin(
            pgdata=config.pgdata,
            local=config.databases[region],
            new_primary=config.databases[other(region)],
            pg_bin_dir=config.pg_bin_dir,
            timeout=REJOIN_TIMEOUT_SECONDS,
        )
        return {"region": region, "rejoin": _plain(result)}


def _step_name(action: StepAction) -> str:
    return {
        Fence: "fence",
        FenceSelf: "fence",
        Promote: "promote",
        SwitchDns: "dns",
        Rejoin: "rejoin",
        Unfence: "unfence",
    }[type(action)]


def _plain(value: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(value).items()}
    return value
