"""The telemetry component: what SREs see, run beside the backup and DR components under the root.

It owns the background workers of the observers the composition root subscribed to the event hub — the
alert dispatcher, the CloudWatch flusher, the audit trail's shipping to the repository — and the optional
scrape-only ``/metrics`` listener. Observers never fail the agent: a worker that crashes is logged and
restarted after a pause, and the component stays healthy (a dead CloudWatch endpoint must not make systemd's
watchdog restart an agent whose backups are fine); what is wrong shows in ``/healthz`` under ``telemetry``.

Telemetry settings are read at start; a reload leaves them as they are (the log says so when they changed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import anyio
from anyio.abc import TaskStatus

from kybdr_agent.component import Health
from kybdr_agent.config import AgentSettings
from kybdr_agent.telemetry import get_logger
from kybdr_agent.telemetry.metrics import AgentMetrics

RESTART_PAUSE_SECONDS: Final = 30.0
log = get_logger("kybdr_agent.telemetry")


class Worker(Protocol):
    async def run(self, *, task_status: TaskStatus[None] = ...) -> None: ...

    def status(self) -> Mapping[str, Any]: ...


@dataclass
class TelemetryParts:
    metrics: AgentMetrics
    workers: dict[str, Worker] = field(default_factory=dict)
    metrics_listen: str | None = None
    settings_snapshot: Mapping[str, Any] = field(default_factory=dict)  # [telemetry] and [notify] at start
    on_stop: list[Callable[[], Awaitable[object]]] = field(default_factory=list)


class TelemetryComponent:
    name = "telemetry"

    def __init__(self, parts: TelemetryParts) -> None:
        self.parts = parts
        self.crashes: dict[str, int] = {}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        from kybdr_agent.telemetry.routes import start_metrics_listener

        runner = None
        if self.parts.metrics_listen:
            runner = await start_metrics_listener(self.parts.metrics, self.parts.metrics_listen)
        try:
            async with anyio.create_task_group() as tg:
                for name, worker in self.parts.workers.items():
                    tg.start_soon(self._keep_running, name, worker, name=f"telemetry:{name}")
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                for stop in self.parts.on_stop:
                    with anyio.move_on_after(10):
                        try:
                            await stop()
                        except Exception:
                            log.exception("telemetry.stop_failed")
                if runner is not None:
                    await runner.cleanup()

    async def _keep_running(self, name: str, worker: Worker) -> None:
        while True:
            try:
                await worker.run()
            except Exception:
                self.crashes[name] = self.crashes.get(name, 0) + 1
                log.exception("telemetry.worker_crashed", worker=name, restart_in=RESTART_PAUSE_SECONDS)
            else:
                return
            await anyio.sleep(RESTART_PAUSE_SECONDS)

    def health(self) -> Health:
        fields: dict[str, Any] = {name: dict(worker.status()) for name, worker in self.parts.workers.items()}
        if self.crashes:
            fields["crashes"] = dict(self.crashes)
        return Health(ok=True, fields={"telemetry": fields})

    async def reload(self, settings: AgentSettings) -> None:
        now = {
            "telemetry": settings.telemetry.model_dump(mode="json"),
            "notify": settings.notify.model_dump(mode="json"),
        }
        if now != self.parts.settings_snapshot:
            log.warning("telemetry.reload_ignored", note="[telemetry] and [notify] changes apply on restart")


class Periodic:
    """A worker that runs ``work`` every ``interval`` seconds (first at once); a failure is logged and the
    next round retries. Used for shipping the audit trail to the repository."""

    def __init__(self, name: str, work: Callable[[], Awaitable[object]], interval: float) -> None:
        self.name = name
        self.work = work
        self.interval = interval
        self.last_ok: float | None = None
        self.last_error: str | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.work()
                self.last_ok, self.last_error = anyio.current_time(), None
            except Exception as exc:  # noqa: BLE001 - logged and retried next round; never ends the worker
                self.last_error = str(exc)[:300]
                log.warning("telemetry.periodic_failed", worker=self.name, error=self.last_error)
            await anyio.sleep(self.interval)

    def status(self) -> Mapping[str, Any]:
        return {"last_error": self.last_error, "ok": self.last_error is None}
