"""The DR path as it runs in production: both agents as the ``postgres`` OS user, not root.

An agent that archives WAL and rejoins its own database runs as ``postgres`` (the unit's alternative to
``kybdr``). Everything it touches must then work without root: its socket, state dir and history, the shared
repository's lease, the token and password files it owns, the failover itself, and ``dr rejoin`` (pg_rewind and
pg_ctl on a data directory it owns). The venv's interpreter lives under /root, so the agents run on the system
Python with the venv's site-packages on their path, as ``tests/faults/test_config_common.run_as`` does.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sysconfig
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_support import Daemon
from tests.dr_support import DRWorld, _aws_env, dr_world, wait_until, writable
from tests.faults.test_config_common import SYSTEM_PYTHON, can_run_unprivileged, run_as, shared_dir
from tests.support import REPO_ROOT, MotoServer

pytestmark = pytest.mark.skipif(
    not can_run_unprivileged(), reason="needs root (to drop to postgres) and /usr/bin/python3"
)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def start_as(world: DRWorld, name: str, user: str) -> Daemon:
    """``kybdr-agent run`` for agent ``name`` as ``user``, its READY=1 awaited on a notify socket it may use."""
    agent = world.agents[name]
    notify_path = agent.home / f"notify-{uuid.uuid4().hex[:8]}.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    pw = pwd.getpwnam(user)
    os.chown(notify_path, pw.pw_uid, pw.pw_gid)
    log_path = agent.home / "agent.log"
    env = {
        "PATH": "/usr/bin:/bin",
        **_aws_env(),
        "NOTIFY_SOCKET": str(notify_path),
        "PYTHONPATH": f"{REPO_ROOT}:{sysconfig.get_paths()['purelib']}",
    }
    # Privileges dropped in the child itself (not through runuser): the process the test holds is the
    # agent, so kill -9 reaches it and nothing outlives the test.
    process = subprocess.Popen(
        [str(SYSTEM_PYTHON), "-m", "kybdr_agent", "--config", str(agent.config), "run"],
        stdout=subprocess.DEVNULL,
        stderr=open(log_path, "ab"),  # noqa: SIM115 - the child owns it
        cwd="/",
        env=env,
        user=pw.pw_uid,
        group=pw.pw_gid,
        extra_groups=[],
    )
    daemon = Daemon(agent.config, agent.socket, process, notify, log_path)
    try:
        daemon.wait_notify("READY=1", timeout=60)
    except AssertionError:
        daemon.stop()
        raise
    agent.daemon = daemon
    return daemon


@pytest.fixture
def world(moto_server: MotoServer) -> Iterator[DRWorld]:
    base = shared_dir(0o755)
    try:
        with dr_world(base, moto_server) as world:
            pw = pwd.getpwnam("postgres")
            (base / "repo").mkdir()
            for agent in world.agents.values():
                agent.state_dir.mkdir()
                _chown_tree(agent.home, pw.pw_uid, pw.pw_gid)
            _chown_tree(base / "repo", pw.pw_uid, pw.pw_gid)
            os.chown(world.pair.password_file, pw.pw_uid, pw.pw_gid)  # the agents' own secret file now
            yield world
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_failover_and_rejoin_work_as_the_postgres_user(world: DRWorld) -> None:
    start_as(world, "primary", "postgres")
    start_as(world, "dr", "postgres")
    dr = world.agents["dr"]
    wait_until("steady", lambda: dr.status()["state"] == "steady", timeout=30)
    assert dr.status()["holds_lease"] is True  # the lease in the shared repository, written as postgres

    world.kill("primary")
    world.pair.crash(world.primary)
    world.health["primary"].set("fail")
    world.witness.set("fail")
    wait_until("DR writable", lambda: writable(world.standby), timeout=60)
    wait_until("DNS switched", lambda: world.route53.target() == "dr", timeout=30)
    wait_until("steady on dr", lambda: dr.status()["state"] == "steady" and dr.status()["active"] == "dr")
    history = dr.history(kind="operation")
    assert [op["outcome"] for op in history if op["operation"] == "failover"] == ["succeeded"]
    state_files = list((dr.state_dir / "dr").iterdir())
    assert state_files
    assert all(path.stat().st_uid == pwd.getpwnam("postgres").pw_uid for path in state_files)

    # The old primary's host: its database comes back and is rewound into a standby, as postgres.
    world.pair.start(world.primary)
    wait_until("the returning primary fenced", lambda: not writable(world.primary), timeout=30)
    world.health["primary"].set("ok")
    world.witness.set("ok")
    rejoined = run_as("postgres", "--config", str(world.agents["primary"].config), "dr", "rejoin", "--json")
    assert rejoined.returncode == 0, rejoined.stderr
    wait_until("old primary in recovery", world.primary.in_recovery, timeout=30)
    world.standby.psql(
        "postgres", "CREATE TABLE written_after_failover(x int); INSERT INTO written_after_failover VALUES (7)"
    )
    lsn = world.standby.psql("postgres", "SELECT pg_current_wal_lsn()").strip()
    world.pair.wait_replayed(world.primary, lsn)
    assert world.primary.psql("postgres", "SELECT x FROM written_after_failover").strip() == "7"
