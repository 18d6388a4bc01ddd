"""Issue 7, item 10: ``run`` started with secrets that ``config check`` rejected, or that nothing checked.

A key file of mode 0644, 31 bytes, missing or a directory, or a missing password file: the agent reported
ready and every backup then failed. Token and password files were never mode-checked (an admin token in a
0644 file worked), and ``config check`` never read token files. Now every secret file is read and checked
at ``config check`` and at the start of ``run`` with the same rules, and a bad one is exit 78 with one line
naming the field and the file — and none of the file's content. One-shot commands that load the key (or the
password) refuse the same files the same way.
"""

from __future__ import annotations

import os
import pwd
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from kybdr_agent.postgres.cluster import Cluster, free_port
from tests.faults.report import FaultTally
from tests.faults.test_config_common import can_run_unprivileged, check, one_line, run_as, shared_dir, start_refused
from tests.support import run_cli

CONTENT_MARK = "S3cretC0ntent"


@dataclass
class Secrets:
    """A config whose secret files are all valid; a case then breaks one of them."""

    dir: Path
    key: Path
    old_key: Path
    password: Path
    drill_password: Path
    admin_token: Path
    viewer_token: Path

    def file(self, name: str) -> Path:
        return getattr(self, name)  # type: ignore[no-any-return]


def _secret(path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    path.chmod(mode)
    return path


def _setup(tmp_path: Path, pg: Cluster) -> tuple[Secrets, Path]:
    made = Secrets(
        dir=tmp_path,
        key=_secret(tmp_path / "master.key", secrets.token_hex(32) + "\n"),
        old_key=_secret(tmp_path / "old.key", secrets.token_hex(32) + "\n"),
        password=_secret(tmp_path / "db-password", f"{CONTENT_MARK}-{secrets.token_hex(8)}\n"),
        drill_password=_secret(tmp_path / "drill-password", f"{CONTENT_MARK}-{secrets.token_hex(8)}\n"),
        admin_token=_secret(tmp_path / "admin.token", f"{CONTENT_MARK}{secrets.token_urlsafe(24)}\n"),
        viewer_token=_secret(tmp_path / "viewer.token", f"{CONTENT_MARK}{secrets.token_urlsafe(24)}\n"),
    )
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[backup]\nbackup_dir = "{tmp_path / "state"}"\n'
        f'[encryption]\nkey_file = "{made.key}"\nold_key_files = ["{made.old_key}"]\n'
        f'[database]\ndsn = "host=127.0.0.1 port={pg.port} user=postgres"\npassword_file = "{made.password}"\n'
        f'[repository]\nurl = "file://{tmp_path / "repo"}"\n'
        f'[drill]\nschedule = ""\npassword_file = "{made.drill_password}"\n'
        f'[control]\nsocket = "{tmp_path / "control.sock"}"\ntcp_listen = "127.0.0.1:{free_port()}"\n'
        f'[[control.tokens]]\nrole = "admin"\ntoken_file = "{made.admin_token}"\n'
        f'[[control.tokens]]\nrole = "viewer"\ntoken_file = "{made.viewer_token}"\n'
    )
    return made, config


def _chmod(mode: int) -> Callable[[Path], None]:
    return lambda path: path.chmod(mode)


def _content(data: bytes) -> Callable[[Path], None]:
    return lambda path: _secret(path, data)


def _remove(path: Path) -> None:
    path.unlink()


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir(mode=0o700)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o600)


def _owned_by_nobody(path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)


def _same_as_admin(path: Path) -> None:
    path.write_bytes((path.parent / "admin.token").read_bytes())


# (case, which file, how it is broken, the field the one line must name)
CASES: list[tuple[str, str, Callable[[Path], None], str]] = [
    ("key file mode 0644", "key", _chmod(0o644), "encryption.key_file"),
    ("key file mode 0620", "key", _chmod(0o620), "encryption.key_file"),
    ("key file of 31 bytes", "key", _content(os.urandom(31)), "encryption.key_file"),
    ("key file missing", "key", _remove, "encryption.key_file"),
    ("key file is a directory", "key", _directory, "encryption.key_file"),
    ("key file is a FIFO", "key", _fifo, "encryption.key_file"),
    ("key file owned by nobody", "key", _owned_by_nobody, "encryption.key_file"),
    ("old key file mode 0644", "old_key", _chmod(0o644), "encryption.old_key_files[0]"),
    ("old key file of 31 bytes", "old_key", _content(b"x" * 31), "encryption.old_key_files[0]"),
    ("password file missing", "password", _remove, "database.password_file"),
    ("password file mode 0644", "password", _chmod(0o644), "database.password_file"),
    ("password file empty", "password", _content(b"\n"), "database.password_file"),
    ("password file not UTF-8", "password", _content(b"caf\xe9-password\n"), "database.password_file"),
    ("password file is a directory", "password", _directory, "database.password_file"),
    ("drill password file missing", "drill_password", _remove, "drill.password_file"),
    ("drill password file mode 0604", "drill_password", _chmod(0o604), "drill.password_file"),
    ("admin token mode 0644", "admin_token", _chmod(0o644), "control.tokens[0].token_file"),
    ("admin token missing", "admin_token", _remove, "control.tokens[0].token_file"),
    ("admin token not UTF-8", "admin_token", _content(b"\xff\xfe" + b"A" * 30), "control.tokens[0].token_file"),
    ("admin token of 15 characters", "admin_token", _content(b"S3cretC0ntent15\n"), "control.tokens[0].token_file"),
    (
        "admin token with a space",
        "admin_token",
        _content(b"S3cretC0ntent with space\n"),
        "control.tokens[0].token_file",
    ),
    ("admin token owned by nobody", "admin_token", _owned_by_nobody, "control.tokens[0].token_file"),
    ("viewer token equals the admin's", "viewer_token", _same_as_admin, "control.tokens[1].token_file"),
]


RUN_CASES: Final = frozenset({next(c[0] for c in CASES if c[1] == which) for which in {c[1] for c in CASES}})


def test_the_setup_itself_passes_config_check(pg: Cluster, tmp_path: Path) -> None:
    """The baseline every case below breaks one file of: valid as made."""
    _made, config = _setup(tmp_path, pg)
    good = run_cli(config, "config", "check")
    assert good.returncode == 0, good.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns files to nobody")
@pytest.mark.parametrize(("case", "which", "breaker", "field"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_secret_file_stops_config_check_and_run_with_one_line(
    pg: Cluster, tmp_path: Path, case: str, which: str, breaker: Callable[[Path], None], field: str
) -> None:
    made, config = _setup(tmp_path, pg)
    path = made.file(which)
    breaker(path)
    tally = FaultTally(fault="config: bad secret file", injected=1)

    checked = check(config, "-v")
    assert checked.returncode == 78, (case, checked.stdout, checked.stderr)
    line = one_line(checked.stderr)
    assert f"{field} {path}" in line, line
    assert CONTENT_MARK not in line
    if case not in RUN_CASES:
        # `run` reads secrets through the same loader as `config check`: one case per kind of file proves
        # it refuses them too, without paying for an agent start in every case.
        tally.assert_clean()
        return

    outcome = start_refused(config, tmp_path, socket_path=tmp_path / "control.sock", state_dir=tmp_path / "state")
    tally.hung = int(outcome.hung)
    tally.left_behind = outcome.left_behind
    tally.assert_clean()
    assert outcome.returncode == 78, (case, outcome)
    line = one_line(outcome.stderr)
    assert f"{field} {path}" in line, line
    assert CONTENT_MARK not in line


@pytest.mark.parametrize(
    ("case", "breaker"),
    [("mode 0644", _chmod(0o644)), ("31 bytes", _content(b"k" * 31)), ("a FIFO", _fifo), ("missing", _remove)],
)
def test_one_shot_commands_refuse_the_same_key_files(
    pg: Cluster, tmp_path: Path, case: str, breaker: Callable[[Path], None]
) -> None:
    """backup, validate and restore load the key in-process: the same file is refused the same way."""
    made, config = _setup(tmp_path, pg)
    breaker(made.key)
    tally = FaultTally(fault="config: bad key file, one-shot command", injected=3)
    for argv in (
        ["--local", "backup", "--database", "postgres"],
        ["--local", "validate", "20261124T215226Z-3f9a1c2b"],
        ["--local", "restore", "20261124T215226Z-3f9a1c2b", "--target-database", "x"],
    ):
        proc = run_cli(config, *argv, timeout=60)
        assert proc.returncode == 78, (case, argv, proc.stderr)
        assert f"encryption.key_file {made.key}" in one_line(proc.stderr)
    tally.left_behind = int((tmp_path / "repo").exists() and any((tmp_path / "repo").rglob("*.json")))
    tally.assert_clean()


@pytest.mark.skipif(not can_run_unprivileged(), reason="no unprivileged user can run the system Python here")
def test_an_unprivileged_user_gets_the_same_rules(tmp_path: Path) -> None:
    """As nobody: its own 0600 key is fine; one another user owns, or one it may not read, is refused."""
    home = shared_dir(0o700, owner="nobody")
    nobody = pwd.getpwnam("nobody")
    try:
        key = _secret(home / "master.key", secrets.token_hex(32) + "\n")
        os.chown(key, nobody.pw_uid, nobody.pw_gid)
        config = home / "agent.toml"
        config.write_text(
            f'[backup]\nbackup_dir = "{home / "state"}"\n[encryption]\nkey_file = "{key}"\n'
            f'[control]\nsocket = "{home / "control.sock"}"\n[drill]\nschedule = ""\n'
        )
        os.chown(config, nobody.pw_uid, nobody.pw_gid)
        assert run_as("nobody", "--config", str(config), "config", "check").returncode == 0

        postgres = pwd.getpwnam("postgres")
        os.chown(key, postgres.pw_uid, postgres.pw_gid)
        key.chmod(0o644)  # readable, but postgres could rewrite it: refused for its owner
        refused = run_as("nobody", "--config", str(config), "config", "check")
        assert refused.returncode == 78
        assert "owned by postgres" in one_line(refused.stderr)

        os.chown(key, 0, 0)
        key.chmod(0o600)  # root's, but nobody may not read it
        refused = run_as("nobody", "--config", str(config), "config", "check")
        assert refused.returncode == 78
        assert "Permission denied" in one_line(refused.stderr)
    finally:
        import shutil

        shutil.rmtree(home, ignore_errors=True)
