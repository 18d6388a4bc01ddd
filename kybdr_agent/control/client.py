"""What the CLI uses to talk to a running agent over its unix socket."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from kybdr_agent.errors import KybdrError


class AgentUnavailable(KybdrError):
    """No agent answers on the control socket."""


class ApiError(KybdrError):
    """The agent answered with a problem document."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        detail = problem.get("detail")
        super().__init__(f"{problem.get('title', 'error')}{': ' + str(detail) if detail else ''} (HTTP {status})")


def agent_listening(path: Path) -> bool:
    """True if something accepts connections on the socket (a stale file from a crash does not)."""
    if not path.exists():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class ControlClient:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, params: dict[str, str] | None = None
    ) -> Any:
        import aiohttp  # only when an agent answers: aiohttp costs 0.2 s of start-up for one-shot commands

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.request(method, f"http://kybdr-agent{path}", json=body, params=params) as response,
            ):
                raw = await response.read()
                try:
                    data = json.loads(raw) if raw else None
                except ValueError:
                    data = {"title": raw.decode("utf-8", "replace")[:200]}
                if response.status >= 400:
                    raise ApiError(response.status, data if isinstance(data, dict) else {"title": str(data)[:200]})
                return data
        except aiohttp.ClientConnectorError as exc:
            raise AgentUnavailable(f"the agent is not running (nothing answers on {self.socket_path}): {exc}") from None
        except aiohttp.ClientError as exc:
            raise AgentUnavailable(f"the connection to the agent on {self.socket_path} broke: {exc}") from None
