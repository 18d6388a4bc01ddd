"""Issue 7: with a known database password, master key and control tokens in play, drive every failure
path we can — a bad DSN, a wrong password, an unreachable repository, a failing backup, a failing restore,
config check, API errors over TCP with a wrong token, a reload rejected for a bad key file — and look for
the secrets everywhere they could surface: the CLI's output with ``-v``, API answers, the daemon's log, the
journal and every other file under ``backup.backup_dir``, every file in the repository (manifests, and the
raw key bytes in the data), and the argv and environment of every child process the agent starts.

The one place a secret may be is the database password in the ``PGPASSWORD`` of pg_dump/pg_restore's
environment (pgdump.py passes it that way; a temporary passfile would be better — see the report). That is
recorded, not allowed anywhere else.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kybdr_agent.postgres.cluster import Cluster, free_port
from tests.daemon_support import start_daemon
from tests.faults.report import FaultTally
from tests.support import KYBDR, create_incompressible_database, run_cli, unique_db

ALLOWED_ENV = {"PGPASSWORD"}  # where the database password may be: the children libpq reads it from


@dataclass
class Secrets:
    password: str
    wrong_password: str
    key: bytes
    admin_token: str
    viewer_token: str
    wrong_token: str

    def forms(self) -> dict[str, str]:
        """Every text form each secret could take in a message."""
        key = self.key
        return {
            "database password": self.password,
            "wrong database password": self.wrong_password,
            "key (hex)": key.hex(),
            "key (HEX)": key.hex().upper(),
            "key (base64)": base64.b64encode(key).decode().rstrip("="),
            "key (base64url)": base64.urlsafe_b64encode(key).decode().rstrip("="),
            "admin token": self.admin_token,
            "viewer token": self.viewer_token,
            "presented wrong token": self.wrong_token,
        }


@dataclass
class Child:
    pid: int
    argv: list[str]
    env: dict[str, str]

    @property
    def name(self) -> str:
        return Path(self.argv[0]).name if self.argv else "?"


_HAVE_CHILDREN_LISTS = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


@dataclass
class ChildWatch:
    """Polls /proc for every descendant of ``root`` and keeps each one's argv and environment.

    Keyed by pid *and* argv: a child is first seen as a copy of its parent (forked, not yet exec'd) and
    must be looked at again once it has become pg_dump, whose environment is the one that matters."""

    root: int
    seen: dict[tuple[int, tuple[str, ...]], Child] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _descendants(self) -> set[int]:
        """Every descendant of ``root``, walked down each thread's ``children`` list: a few small reads per
        poll, where a scan of all of /proc costs more than a millisecond of CPU every 2 ms — on two busy
        cores, time taken from the very processes being watched."""
        if not _HAVE_CHILDREN_LISTS:
            return self._descendants_by_scan()
        found: set[int] = set()
        todo = [self.root]
        while todo:
            pid = todo.pop()
            try:
                threads = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in threads:
                try:
                    with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                        children = [int(child) for child in fh.read().split()]
                except (OSError, ValueError):
                    continue
                for child in children:
                    if child not in found:
                        found.add(child)
                        todo.append(child)
        found.discard(self.root)
        return found

    def _descendants_by_scan(self) -> set[int]:
        """The same from every process's parent pid (kernels without ``children`` lists)."""
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    stat = fh.read().decode(errors="replace")
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        found = {self.root}
        changed = True
        while changed:
            changed = False
            for pid, ppid in parents.items():
                if ppid in found and pid not in found:
                    found.add(pid)
                    changed = True
        found.discard(self.root)
        return found

    def _poll(self) -> None:
        while not self._stop.is_set():
            for pid in self._descendants():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
                    with open(f"/proc/{pid}/environ", "rb") as fh:
                        raw = fh.read()
                except OSError:
                    continue
                env = dict(
                    item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if b"=" in item
                )
                if argv and (env or (pid, tuple(argv)) not in self.seen):
                    self.seen[(pid, tuple(argv))] = Child(pid, argv, env)
            time.sleep(0.002)

    def __enter__(self) -> ChildWatch:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)


@dataclass
class Evidence:
    """Everything the test collected, by where it came from, to be searched for secrets at the end."""

    texts: list[tuple[str, str]] = field(default_factory=list)
    children: list[tuple[str, Child]] = field(default_factory=list)

    def add(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    def cli(self, where: str, proc: Any) -> None:
        self.add(f"{where} stdout", proc.stdout)
        self.add(f"{where} stderr", proc.stderr)


@pytest.fixture
def known(pg: Cluster) -> Iterator[tuple[Secrets, str, str]]:
    """A login role with a known password (reached over TCP, so the password is really used), a database
    big enough that pg_dump runs long enough to be seen in /proc (a 16 MiB dump: many 2 ms polls), and the
    other secrets."""
    made = Secrets(
        password="DbPw-" + secrets.token_urlsafe(18),
        wrong_password="WrongPw-" + secrets.token_urlsafe(18),
        key=secrets.token_bytes(32),
        admin_token="AdminTok-" + secrets.token_urlsafe(24),
        viewer_token="ViewerTok-" + secrets.token_urlsafe(24),
        wrong_token="WrongTok-" + secrets.token_urlsafe(24),
    )
    role = f"leak_{secrets.token_hex(4)}"
    pg.psql("postgres", f"create role {role} superuser login password '{made.password}'")
    database = unique_db("leak")
    create_incompressible_database(pg, database, 8)
    yield made, role, database
    for name in pg.psql("postgres", "select datname from pg_database where datname like 'leak%'").split():
        pg.psql("postgres", f'drop database if exists "{name}" with (force)', check=False)
    pg.psql("postgres", f"drop role if exists {role}", check=False)


def _secret_file(path: Path, content: str) -> Path:
    path.write_text(content)
    path.chmod(0o600)
    return path


def _config(tmp_path: Path, pg: Cluster, known: Secrets, role: str, *, port: int, name: str = "agent.toml") -> Path:
    files = tmp_path / "secrets"
    files.mkdir(mode=0o700, exist_ok=True)
    key = _secret_file(files / "master.key", known.key.hex() + "\n")
    password = _secret_file(files / "db-password", known.password + "\n")
    admin = _secret_file(files / "admin.token", known.admin_token + "\n")
    viewer = _secret_file(files / "viewer.token", known.viewer_token + "\n")
    config = tmp_path / name
    config.write_text(
        f'[backup]\nbackup_dir = "{tmp_path / "state"}"\n'
        f'[encryption]\nkey_file = "{key}"\n'
        f'[database]\ndsn = "host=127.0.0.1 port={pg.port} user={role}"\npassword_file = "{password}"\n'
        f'[repository]\nurl = "file://{tmp_path / "repo"}"\n'
        f'[drill]\nschedule = ""\n'
        f'[control]\nsocket = "{tmp_path / "control.sock"}"\ntcp_listen = "127.0.0.1:{port}"\n'
        f'[[control.tokens]]\nrole = "admin"\ntoken_file = "{admin}"\n'
        f'[[control.tokens]]\nrole = "viewer"\ntoken_file = "{viewer}"\n'
        "[daemon]\nshutdown_grace_seconds = 2\n"
    )
    return config


def _variant(config: Path, name: str, old: str, new: str) -> Path:
    text = config.read_text()
    assert old in text, old
    path = config.with_name(name)
    path.write_text(text.replace(old, new))
    return path


def _watched_cli(config: Path, *args: str) -> tuple[Any, list[Child]]:
    """The CLI as a subprocess with its children watched."""
    proc = subprocess.Popen(
        [*KYBDR, "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with ChildWatch(proc.pid) as watch:
        stdout, stderr = proc.communicate(timeout=300)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return done, list(watch.seen.values())


def _http(port: int, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def test_no_secret_reaches_any_output_file_or_child(
    pg: Cluster, tmp_path: Path, known: tuple[Secrets, str, str]
) -> None:
    made, role, database = known
    port = free_port()
    config = _config(tmp_path, pg, made, role, port=port)
    evidence = Evidence()
    tally = FaultTally(fault="secrets: failure paths with a password, key and tokens in play")

    # --- one-shot commands, good and failing, all with -v ----------------------------------------
    for argv in (["config", "check"], ["config", "check", "--json"]):
        proc = run_cli(config, "-v", *argv)
        assert proc.returncode == 0, proc.stderr
        evidence.cli(" ".join(argv), proc)

    made_backup, children = _watched_cli(config, "-v", "--local", "backup", "--database", database, "--json")
    assert made_backup.returncode == 0, made_backup.stderr
    evidence.cli("backup", made_backup)
    evidence.children += [("backup", c) for c in children]
    assert any(c.name == "pg_dump" for c in children), [c.argv for c in children]
    backup_id = json.loads(made_backup.stdout)["id"]
    tally.attempted += 1

    restored, children = _watched_cli(
        config, "-v", "--local", "restore", backup_id, "--target-database", f"{database}_copy"
    )
    assert restored.returncode == 0, restored.stderr
    evidence.cli("restore", restored)
    evidence.children += [("restore", c) for c in children]
    assert any(c.name == "pg_restore" for c in children), [c.argv for c in children]
    tally.restorable += 1

    validated, children = _watched_cli(config, "-v", "--local", "validate", backup_id, "--level", "full")
    evidence.cli("validate", validated)
    evidence.children += [("validate", c) for c in children]
    for argv in (["list", "--json"], ["show", backup_id, "--json"], ["stats", "--json"]):
        proc = run_cli(config, "-v", "--local", *argv)
        assert proc.returncode == 0, proc.stderr
        evidence.cli(" ".join(argv), proc)

    wrong_password_file = _secret_file(tmp_path / "secrets" / "wrong-password", made.wrong_password + "\n")
    failing = {
        "wrong password": _variant(
            config, "wrong-pw.toml", str(tmp_path / "secrets" / "db-password"), str(wrong_password_file)
        ),
        "bad DSN (closed port)": _variant(config, "bad-dsn.toml", f"port={pg.port}", f"port={free_port()}"),
        "unreachable repository": _variant(
            config,
            "no-repo.toml",
            f'url = "file://{tmp_path / "repo"}"',
            f'url = "s3://bucket/p"\nendpoint_url = "http://127.0.0.1:{free_port()}"\nregion = "us-east-1"\n'
            "max_attempts = 1\nconnect_timeout_seconds = 2",
        ),
    }
    for what, variant in failing.items():
        proc, children = _watched_cli(variant, "-v", "--local", "backup", "--database", database)
        tally.injected += 1
        tally.attempted += 1
        assert proc.returncode == 1, (what, proc.stderr)
        assert "Traceback" not in proc.stderr, (what, proc.stderr)
        tally.failed_cleanly += 1
        evidence.cli(what, proc)
        evidence.children += [(what, c) for c in children]

    for what, argv in {
        "backup of a missing database": ["backup", "--database", "no_such_database"],
        "restore of a missing backup": ["restore", "20261124T215226Z-3f9a1c2b", "--target-database", "x"],
        "restore over a non-empty target": ["restore", backup_id, "--target-database", database],
        "restore drill of a missing database": ["test", "--database", "no_such_database"],
    }.items():
        proc, children = _watched_cli(config, "-v", "--local", *argv)
        tally.injected += 1
        if argv[0] == "backup":
            tally.attempted += 1
            tally.failed_cleanly += int(proc.returncode == 1)
        assert proc.returncode == 1, (what, proc.stderr)
        assert "Traceback" not in proc.stderr, (what, proc.stderr)
        evidence.cli(what, proc)
        evidence.children += [(what, c) for c in children]

    # --- the daemon: API errors over TCP, a backup through it, a rejected reload --------------------
    daemon = start_daemon(config, tmp_path / "control.sock", tmp_path)
    try:
        with ChildWatch(daemon.process.pid) as watch:
            for what, method, path, token, body in [
                ("no token", "GET", "/v1/backup", None, None),
                ("wrong token", "GET", "/v1/backup", made.wrong_token, None),
                ("viewer on an admin endpoint", "POST", f"/v1/backup/{backup_id}/restore", made.viewer_token,
                 {"target_database": "x"}),
                ("unknown backup", "GET", "/v1/backup/20261124T215226Z-3f9a1c2b", made.viewer_token, None),
                ("restore over a non-empty target", "POST", f"/v1/backup/{backup_id}/restore?wait=true",
                 made.admin_token, {"target_database": database}),
                ("backup of a missing database", "POST", "/v1/backup?wait=true", made.admin_token,
                 {"database": "no_such_database"}),
                ("a good backup", "POST", "/v1/backup?wait=true", made.admin_token, {"database": database}),
                ("stats", "GET", "/v1/backup/stats", made.viewer_token, None),
                ("jobs", "GET", "/v1/jobs", made.viewer_token, None),
            ]:  # fmt: skip
                status, answer = _http(port, method, path, token, body)
                evidence.add(f"API {what} ({status})", answer)
                tally.injected += int(status >= 400 or "failed" in answer)
                if "backup" in what and method == "POST" and "restore" not in what:
                    tally.attempted += 1
                    if what == "a good backup":
                        assert status in (200, 202), answer
                        tally.restorable += 1  # the same path as the one-shot backup restored above
                    else:
                        tally.failed_cleanly += 1
            status_proc = run_cli(config, "-v", "status", "--json")
            evidence.cli("status (through the agent)", status_proc)

            # A reload with a world-readable key file is refused, and says so without the key.
            key = tmp_path / "secrets" / "master.key"
            key.chmod(0o644)
            daemon.signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while "config.reload_rejected" not in daemon.log():
                assert time.monotonic() < deadline, daemon.log()
                time.sleep(0.1)
            key.chmod(0o600)
            tally.injected += 1
        evidence.children += [("daemon", c) for c in watch.seen.values()]
        assert any(c.name == "pg_dump" for c in watch.seen.values()), [c.argv for c in watch.seen.values()]
    finally:
        assert daemon.stop() == 0, daemon.log()
    evidence.add("daemon log", daemon.log())

    # --- what was written -----------------------------------------------------------------------
    binary: list[tuple[str, bytes]] = []
    for root in (tmp_path / "state", tmp_path / "repo"):
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            binary.append((str(path), data))
            evidence.add(str(path), data.decode("utf-8", errors="replace"))
    assert any(path.endswith(".jsonl") for path, _ in binary), "no journal was written"
    assert any(path.endswith(".json") and "/repo/" in path for path, _ in binary), "no manifest was written"

    # --- the search ----------------------------------------------------------------------------
    found: list[str] = []
    for label, value in made.forms().items():
        for where, text in evidence.texts:
            if value in text:
                found.append(f"{label} in {where}")
    for where, data in binary:
        if made.key in data:
            found.append(f"raw key bytes in {where}")
    password_in_env: set[str] = set()
    for where, child in evidence.children:
        for label, value in made.forms().items():
            if any(value in arg for arg in child.argv):
                found.append(f"{label} in the argv of {child.name} ({where})")
            for name, env_value in child.env.items():
                if value in env_value or value in name:
                    if label == "database password" and name in ALLOWED_ENV:
                        password_in_env.add(child.name)
                    else:
                        found.append(f"{label} in {child.name}'s environment as {name} ({where})")
    tally.left_behind = len(found)
    names = sorted({child.name for _, child in evidence.children})
    print(  # for the report: what was searched
        f"searched {len(evidence.texts)} outputs/files and {len(evidence.children)} child processes ({names}); "
        f"the database password was in PGPASSWORD of: {sorted(password_in_env)}"
    )
    tally.assert_clean()
    assert found == [], found
