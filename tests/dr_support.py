"""A whole DR deployment on one machine, for the end-to-end tests and the failover benchmark.

Real parts only: a PostgreSQL primary and its streaming standby (``dr_cluster``), the region link as a TCP
proxy in front of the primary (the standby's replication and the DR agent's probes both cross it, so cutting
it is a partition between regions), scripted health URLs and a witness (``dr_net``), Route53 and ELBv2 from
``moto_server``, a folder repository both agents share (the lease lives there), and the two agents as real
processes (``daemon_support``) talking to each other over TCP with bearer tokens — each through its own
proxy, so one agent can be cut off from the other.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kybdr_agent.postgres.cluster import free_port
from tests.daemon_support import Daemon, start_daemon
from tests.dr_aws import DR_REGION, PRIMARY_REGION, World, build_world
from tests.dr_cluster import Node, Pair, _write_owned, start_pair
from tests.dr_net import ScriptedHttpServer, TcpProxy
from tests.support import MotoServer


def _token_file(path: Path) -> tuple[Path, str]:
    token = secrets.token_urlsafe(24)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path, token


@dataclass
class AgentSetup:
    """One agent's files and addresses."""

    name: str
    home: Path
    port: int  # its TCP control listener
    token_file: Path
    token: str
    config: Path = field(init=False)
    daemon: Daemon | None = None

    @property
    def socket(self) -> Path:
        return self.home / "control.sock"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    def request(self, method: str, path: str, body: Any = None) -> Any:
        assert self.daemon is not None, f"the {self.name} agent is not running"
        return self.daemon.request(method, path, body)

    def status(self) -> dict[str, Any]:
        response = self.request("GET", "/v1/disaster-recovery/status")
        assert response.status == 200, response.body
        body: dict[str, Any] = response.body
        return body

    def history(self, limit: int = 1000, kind: str | None = None) -> list[dict[str, Any]]:
        query = f"?limit={limit}" + (f"&kind={kind}" if kind else "")
        response = self.request("GET", f"/v1/disaster-recovery/history{query}")
        assert response.status == 200, response.body
        entries: list[dict[str, Any]] = response.body["entries"]
        return entries

    def log(self) -> str:
        return self.daemon.log() if self.daemon else ""


@dataclass
class DRWorld:
    tmp: Path
    pair: Pair
    link: TcpProxy  # the DR region's way to the primary database (replication and the DR agent's probes)
    health: dict[str, ScriptedHttpServer]
    witness: ScriptedHttpServer
    witness_links: dict[str, TcpProxy]  # each agent's own way to the witness
    peer_links: dict[str, TcpProxy]  # "dr": the DR agent's way to the primary agent; "primary": the reverse
    route53: World
    agents: dict[str, AgentSetup]
    stack: ExitStack

    @property
    def primary(self) -> Node:
        return self.pair.primary

    @property
    def standby(self) -> Node:
        return self.pair.standby

    def write_configs(self, dr: dict[str, Any] | None = None, primary: dict[str, Any] | None = None) -> None:
        """Both agents' configuration files; ``dr``/``primary`` override fields of their ``[dr]`` sections."""
        dr_agent, primary_agent = self.agents["dr"], self.agents["primary"]
        common = {
            "enabled": True,
            "primary_region": PRIMARY_REGION,
            "dr_region": DR_REGION,
            "health_check_url": self.health["primary"].url + "/health",
            "dr_health_check_url": self.health["dr"].url + "/health",
            "health_check_interval": "1s",
            "probe_timeout": "0.5s",
            "failover_threshold": 3,
            "failback_threshold": 3,
            "route53_zone_id": self.route53.zone_id,
            "route53_domain": self.route53.domain,
            "load_balancer_arn": self.route53.arns["primary"],
            "dr_load_balancer_arn": self.route53.arns["dr"],
            "password_file": str(self.pair.password_file),
            "partition_timeout": "3s",
            "cooldown": "0s",
            "max_staleness": "30s",
            "catchup_timeout": "10s",
            "promote_timeout": "20s",
            "dns_sync_timeout": "20s",
            "aws_endpoint_url": self.route53.moto.endpoint,
        }
        dr_section = {
            **common,
            "role": "dr",
            "auto_failover": True,
            "primary_dsn": self.pair.dsn(self.primary, self.link.port),
            "standby_dsn": self.pair.dsn(self.standby),
            "witness_urls": [f"http://127.0.0.1:{self.witness_links['dr'].port}/primary"],
            "peer_url": f"http://127.0.0.1:{self.peer_links['dr'].port}",
            "peer_token_file": str(primary_agent.token_file),
            "pgdata": str(self.standby.data_dir),
            **(dr or {}),
        }
        primary_section = {
            **common,
            "role": "primary",
            "primary_dsn": self.pair.dsn(self.primary),
            "standby_dsn": self.pair.dsn(self.standby),  # the link proxies to the primary: not this way
            "witness_urls": [f"http://127.0.0.1:{self.witness_links['primary'].port}/primary"],
            "peer_url": f"http://127.0.0.1:{self.peer_links['primary'].port}",
            "peer_token_file": str(dr_agent.token_file),
            "pgdata": str(self.primary.data_dir),
            **(primary or {}),
        }
        for agent, section, local in (
            (dr_agent, dr_section, self.standby),
            (primary_agent, primary_section, self.primary),
        ):
            agent.config = agent.home / "agent.toml"
            agent.config.write_text(
                f'[backup]\nbackup_dir = "{agent.state_dir}"\nencryption = false\n\n'
                f'[database]\ndsn = "{self.pair.dsn(local)}"\npassword_file = "{self.pair.password_file}"\n\n'
                f'[repository]\nurl = "file://{self.tmp / "repo"}"\n\n'
                f'[control]\nsocket = "{agent.socket}"\ntcp_listen = "127.0.0.1:{agent.port}"\n\n'
                f'[[control.tokens]]\nrole = "admin"\ntoken_file = "{agent.token_file}"\n\n'
                '[drill]\nschedule = ""\n\n[daemon]\nshutdown_grace_seconds = 2\n\n'
                f"[dr]\n{_toml(section)}"
            )

    def start(self, name: str) -> AgentSetup:
        agent = self.agents[name]
        agent.daemon = start_daemon(agent.config, agent.socket, agent.home, env=_aws_env())
        return agent

    def stop(self, name: str) -> None:
        agent = self.agents[name]
        if agent.daemon is not None:
            agent.daemon.stop()
            agent.daemon = None

    def kill(self, name: str) -> None:
        agent = self.agents[name]
        if agent.daemon is not None:
            agent.daemon.process.kill()
            agent.daemon.process.wait()
            agent.daemon = None

    def close(self) -> None:
        for name in list(self.agents):
            with contextlib.suppress(Exception):  # tearing down: the next agent must still be stopped
                self.stop(name)
        self.stack.close()


def _aws_env() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": PRIMARY_REGION,
    }


def _toml(section: dict[str, Any]) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in section.items())


def route_standby_through(pair: Pair, port: int) -> None:
    """Point the standby's replication at ``port`` (the region link) instead of the primary itself."""
    standby = pair.standby
    auto = standby.data_dir / "postgresql.auto.conf"
    kept = [line for line in auto.read_text().splitlines() if not line.startswith("primary_conninfo")]
    kept.append(f"primary_conninfo = 'host=127.0.0.1 port={port} user=postgres passfile={standby.passfile}'")
    _write_owned(auto, "\n".join(kept) + "\n")
    standby.psql("postgres", "SELECT pg_reload_conf()")
    pair.wait_streaming(standby)


@contextmanager
def dr_world(tmp: Path, moto: MotoServer) -> Iterator[DRWorld]:
    """Everything but the agents' processes: start them with ``world.start("dr")`` / ``("primary")``."""
    with ExitStack() as stack:
        pair = stack.enter_context(start_pair())
        link = stack.enter_context(TcpProxy("127.0.0.1", pair.primary.port))
        route_standby_through(pair, link.port)
        health = {name: stack.enter_context(ScriptedHttpServer()) for name in ("primary", "dr")}
        witness = stack.enter_context(ScriptedHttpServer())
        witness_links = {name: stack.enter_context(TcpProxy("127.0.0.1", witness.port)) for name in ("dr", "primary")}
        agents: dict[str, AgentSetup] = {}
        for name in ("dr", "primary"):
            home = tmp / name
            home.mkdir(mode=0o700)
            token_file, token = _token_file(home / "admin.token")
            agents[name] = AgentSetup(name, home, free_port(), token_file, token)
        # Each agent reaches the other's TCP control listener through its own proxy.
        peer_links = {
            "dr": stack.enter_context(TcpProxy("127.0.0.1", agents["primary"].port)),
            "primary": stack.enter_context(TcpProxy("127.0.0.1", agents["dr"].port)),
        }
        world = DRWorld(
            tmp=tmp,
            pair=pair,
            link=link,
            health=health,
            witness=witness,
            witness_links=witness_links,
            peer_links=peer_links,
            route53=build_world(moto),
            agents=agents,
            stack=ExitStack(),
        )
        world.write_configs()
        try:
            yield world
        finally:
            world.close()


def wait_until(what: str, predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def writable(node: Node) -> bool:
    """Whether an ordinary session can write on ``node`` right now (not in recovery, not fenced)."""
    if not node.is_running():
        return False
    answer = node.psql(
        "postgres",
        "SELECT NOT pg_is_in_recovery() AND current_setting('default_transaction_read_only') = 'off'",
        check=False,
    )
    return answer.strip() == "t"
