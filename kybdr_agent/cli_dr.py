"""``kybdr-agent dr …``: the DR verbs of the command line.

The state machine lives in the running agent (it must watch continuously, hold the lease and run steps to
completion), so every verb but ``rejoin`` asks the agent over its control socket, and says so plainly when
no agent runs. ``rejoin`` is different: it rewinds *this host's* database (``dr.pgdata``) as a standby of
the new primary, which is work for the host's own user (``postgres``) and needs no agent — it runs here.

Tables for people, ``--json`` for scripts. Exit status: 0 done, 1 refused or failed (the reason and the
guards that refused are printed), 78 configuration, as every other command.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Final

from kybdr_agent import cli_output, secret_files
from kybdr_agent.config import AgentSettings
from kybdr_agent.control.client import ApiError, ControlClient, agent_listening
from kybdr_agent.errors import ConfigError, KybdrError
from kybdr_agent.telemetry.logs import stderr_line

PREFIX: Final = "/v1/disaster-recovery"
VERBS: Final = (
    "status",
    "health",
    "history",
    "failover",
    "failback",
    "test-failover",
    "test-failback",
    "rejoin",
    "auto-failover",
    "auto-failback",
    "resume",
    "pause",
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("dr", help="disaster recovery: status, failover, failback, drills, history, rejoin")
    dr = p.add_subparsers(dest="dr_command", required=True, metavar="VERB")

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = dr.add_parser(name, help=help_text)
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
        return parser

    verb("status", "state, active region, switches, lease holder, last transition")
    verb("health", "each region's, each witness's and the peer's latest probe")
    h = verb("history", "failover history and statistics")
    h.add_argument("--limit", type=int, default=20, help="newest N entries (default 20)")
    h.add_argument("--kind", help="only entries of this kind (operation, transition, intent, result, alert, switch)")
    f = verb("failover", "fail over to the DR region now (fenced, guarded)")
    f.add_argument("--force", action="store_true", help="skip soft guards: thresholds, lag, staleness, cooldown")
    f.add_argument(
        "--allow-unfenced",
        action="store_true",
        help="promote even if the old primary cannot be fenced (recorded as a data-loss risk)",
    )
    f.add_argument("--reason", help="why, for the history")
    b = verb("failback", "switch back to the primary region (zero-loss switchover)")
    b.add_argument("--force", action="store_true", help="skip the failback threshold")
    verb("test-failover", "check every guard and write/delete the test record; changes nothing")
    verb("test-failback", "the same for a failback")
    r = verb("rejoin", "on the old primary's host: rewind it with pg_rewind and start it as a standby")
    r.add_argument("--no-start", action="store_true", help="rewind and configure, but do not start the server")
    for name in ("auto-failover", "auto-failback"):
        s = verb(name, f"turn {name} on or off")
        s.add_argument("switch", choices=("enable", "disable"))
    verb("resume", "leave the halted state or a pause: the agent re-derives roles and automation runs again")
    verb("pause", "pause automation for maintenance: the agent watches and alerts, and acts only on commands")


async def run(settings: AgentSettings, args: argparse.Namespace) -> int:
    verb = args.dr_command
    if verb == "rejoin":
        return await _rejoin(settings, args)
    owners = secret_files.trusted_owners(settings.daemon.service_user)
    if not agent_listening(settings.control.socket, owners):
        raise KybdrError(
            f"`dr {verb}` talks to the running agent, and none answers on {settings.control.socket}; "
            "start it (systemctl start kybdr-agent, or kybdr-agent run) and try again"
        )
    client = ControlClient(settings.control.socket)
    try:
        result = await _remote(client, verb, args)
    except ApiError as exc:
        _print_refusal(exc)
        return 1
    _print(verb, result, args)
    if verb in ("failover", "failback", "test-failover", "test-failback"):
        job = result["jobs"][0]
        return 0 if job["status"] == "succeeded" else 1
    return 0


async def _remote(client: ControlClient, verb: str, args: argparse.Namespace) -> dict[str, Any]:
    wait = {"wait": "true"}
    if verb == "status":
        return dict(await client.request("GET", f"{PREFIX}/status"))
    if verb == "health":
        return dict(await client.request("GET", f"{PREFIX}/health"))
    if verb == "history":
        params = {"limit": str(args.limit)}
        if args.kind:
            params["kind"] = args.kind
        return dict(await client.request("GET", f"{PREFIX}/history", params=params))
    if verb == "failover":
        body: dict[str, Any] = {"force": args.force, "allow_unfenced": args.allow_unfenced}
        if args.reason:
            body["reason"] = args.reason
        return dict(await client.request("POST", f"{PREFIX}/failover", body, params=wait))
    if verb == "failback":
        return dict(await client.request("POST", f"{PREFIX}/failback", {"force": args.force}, params=wait))
    if verb in ("test-failover", "test-failback"):
        return dict(await client.request("POST", f"{PREFIX}/{verb}", {}, params=wait))
    if verb in ("auto-failover", "auto-failback"):
        return dict(await client.request("POST", f"{PREFIX}/{verb}/{args.switch}"))
    if verb in ("resume", "pause"):
        return dict(await client.request("POST", f"{PREFIX}/{verb}"))
    raise KybdrError(f"unknown dr verb {verb!r}")


async def _rejoin(settings: AgentSettings, args: argparse.Namespace) -> int:
    from kybdr_agent import app
    from kybdr_agent.dr.rejoin import rejoin

    dr = settings.dr
    if dr.pgdata is None:
        raise ConfigError("dr rejoin needs dr.pgdata: this host's data directory, the one to rewind")
    if not dr.primary_dsn or not dr.standby_dsn:
        raise ConfigError("dr rejoin needs dr.primary_dsn and dr.standby_dsn (which database is this host's?)")
    # This host's database is the one of this agent's role; the new primary is the other one.
    local_dsn, new_primary_dsn = (
        (dr.primary_dsn, dr.standby_dsn) if dr.role == "primary" else (dr.standby_dsn, dr.primary_dsn)
    )
    secret_files.check_password_files(settings, drill=False)
    result = await rejoin(
        pgdata=dr.pgdata,
        local=app.dr_connection(settings, local_dsn),
        new_primary=app.dr_connection(settings, new_primary_dsn),
        pg_bin_dir=settings.database.pg_bin_dir,
        timeout=600.0,
        start=not args.no_start,
    )
    from dataclasses import asdict

    document = {
        k: str(v) if not isinstance(v, int | float | bool | type(None)) else v for k, v in asdict(result).items()
    }
    if args.json:
        cli_output.print_json(document)
    else:
        print(cli_output.table([[k, str(v)] for k, v in document.items()], ["rejoin", "value"]))
    return 0


def _print_refusal(exc: ApiError) -> None:
    lines = [f"kybdr-agent: dr: {exc}"]
    for guard in exc.problem.get("guards") or []:
        mark = "ok" if guard.get("ok") else ("WARN" if guard.get("soft") else "FAIL")
        lines.append(f"  [{mark}] {guard.get('name')}: {guard.get('detail')}")
    stderr_line("\n".join(lines))


def _print(verb: str, result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        cli_output.print_json(result)
        return
    if verb in ("status", "auto-failover", "auto-failback", "resume", "pause"):
        rows = [[key, _text(value)] for key, value in result.items() if key not in ("guards",)]
        print(cli_output.table(rows, ["dr", "value"]))
        failing = [g for g in result.get("guards", []) if not g["ok"]]
        for guard in failing:
            print(f"  guard {guard['name']}: {guard['detail']}")
    elif verb == "health":
        rows = []
        for region, view in (result.get("regions") or {}).items():
            hc = view.get("health_check") or {}
            db = view.get("database") or {}
            rows.append([f"{region} ({view.get('name')})", "yes" if view.get("healthy") else "NO", _probe(hc), _db(db)])
        for witness in result.get("witnesses") or []:
            rows.append([f"witness {witness['target']}", "-", _probe(witness), "-"])
        if result.get("peer"):
            peer = result["peer"]
            rows.append(
                ["peer", "-", "reachable" if peer.get("reachable") else f"unreachable {peer.get('error')}", "-"]
            )
        print(cli_output.table(rows, ["target", "healthy", "health check", "database"]))
    elif verb == "history":
        rows = [
            [str(e.get("seq")), str(e.get("at", ""))[:19], str(e.get("kind")), _summary(e)]
            for e in result.get("entries", [])
        ]
        print(cli_output.table(rows, ["seq", "at", "kind", "what"]))
        print(json.dumps(result.get("statistics", {}), indent=2, default=str))
    else:
        job = result["jobs"][0]
        record = job.get("result") or {}
        print(f"{job['kind']} {job['id']}: {job['status']}" + (f" — {job['error']}" if job.get("error") else ""))
        steps = record.get("steps") or {}
        if steps:
            print(cli_output.table([[k, f"{v:.3f} s"] for k, v in steps.items()], ["step", "time"]))
        checks = record.get("checks") or []
        if checks:
            rows = [["ok" if c["ok"] else ("WARN" if c["soft"] else "FAIL"), c["name"], c["detail"]] for c in checks]
            print(cli_output.table(rows, ["", "check", "detail"]))


def _text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return "" if value is None else str(value)


def _probe(p: dict[str, Any]) -> str:
    if not p:
        return "-"
    if not p.get("reachable"):
        return f"unreachable ({p.get('error')})"
    latency = p.get("latency_s")
    return f"HTTP {p.get('status')}" + (f" {latency * 1000:.0f} ms" if latency is not None else "")


def _db(d: dict[str, Any]) -> str:
    if not d:
        return "-"
    if not d.get("reachable"):
        return f"unreachable ({d.get('error')})"
    if d.get("in_recovery"):
        return f"standby tl {d.get('timeline')} recv {d.get('receive_lsn')} replay {d.get('replay_lsn')}"
    return f"primary tl {d.get('timeline')} lsn {d.get('current_lsn')}" + (" (fenced)" if d.get("read_only") else "")


def _summary(entry: dict[str, Any]) -> str:
    kind = entry.get("kind")
    if kind == "transition":
        return f"{entry.get('from')} → {entry.get('to')}: {entry.get('reason')}"
    if kind == "operation":
        return f"{entry.get('operation')} {entry.get('outcome')} in {entry.get('duration_s')} s"
    if kind == "alert":
        return f"{entry.get('severity')}: {entry.get('message')}"
    fields = {k: v for k, v in entry.items() if k not in ("seq", "at", "kind")}
    return json.dumps(fields, default=str)[:120]
