"""What every subsystem of the agent (backups now; DR and telemetry next) offers the composition root.

A component brings:

* its **supervisors**: ``run`` starts them and reports ``task_status.started()`` once they are up, so the
  root (``await tg.start(component.run)``) says READY=1 only after every component is running;
* its **health**: ``ok`` feeds the systemd watchdog (WATCHDOG=1 only while every component is healthy),
  and ``fields`` are merged into ``GET /healthz``;
* its **reload**: given the new settings, it swaps what it runs with (the root has already checked them);
* its **routes**: a ``RouteTable`` from the component's own ``routes`` module, which the root hands to the
  control server with every other table. (Not a method here, so that this contract — and the component —
  never depends on the HTTP framework; only that one module does.)

Adding a component edits the root, not the other components. Components never call each other: they
publish and subscribe to ``events``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from anyio.abc import TaskStatus

from kybdr_agent.config import AgentSettings


@dataclass(frozen=True)
class Health:
    ok: bool
    fields: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""  # why not ok, for the watchdog's STATUS= line and the log


class Component(Protocol):
    name: str

    async def run(self, *, task_status: TaskStatus[None]) -> None: ...

    def health(self) -> Health: ...

    async def reload(self, settings: AgentSettings) -> None: ...
