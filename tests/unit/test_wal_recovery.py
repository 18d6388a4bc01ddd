"""Recovery targets and settings (``wal/targets.py``, ``wal/recovery.py``).

Two checks use the real PostgreSQL 15 binaries, without a cluster: ``postgres -C <parameter>`` on a scratch
directory reads the configuration exactly as a starting server would (quoting, escapes, duplicates, the
recovery-target assign hooks) and prints the value it ended up with; the ``restore_command`` it prints is then
run through ``/bin/sh`` after PostgreSQL 15's ``%`` substitution, against a spool whose path holds every
character that needs quoting. A real restore through this command and settings (a backup recovered to a time
from a spool filled while PostgreSQL waited, and one stopped by a ``.failed`` segment) was checked by hand;
see the report of issue 13.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kybdr_agent.postgres.cluster import PG_BIN
from kybdr_agent.wal.recovery import (
    EXIT_COPY_FAILED,
    EXIT_FETCH_FAILED,
    EXIT_WAIT_TIMEOUT,
    FAILED_SUFFIX,
    PENDING_SUFFIX,
    TARGET_PARAMETERS,
    WANTED_SUFFIX,
    RecoverySettings,
    RecoverySettingsError,
    conf_quote,
    restore_command,
)
from kybdr_agent.wal.targets import (
    MAX_NAME_BYTES,
    ImmediateTarget,
    LatestTarget,
    LsnTarget,
    NameTarget,
    RecoveryTarget,
    TargetError,
    TimeTarget,
    parse_target_lsn,
    parse_target_name,
    parse_target_time,
)

NASTY = 'sp o\'ol "q" $HOME `x` %f %% \\x ü'
SEGMENT = "000000010000000000000003"


# ---------------------------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-02 03:22:11+00:00", "2026-12-02 03:22:11.000000+00:00"),
        ("2026-12-02T04:22:11.5+01:00", "2026-12-02 03:22:11.500000+00:00"),
        ("2026-12-02 03:22:11.383054Z", "2026-12-02 03:22:11.383054+00:00"),
        (" 2026-12-01 22:22:11-05 ", "2026-12-02 03:22:11.000000+00:00"),
        ("2026-12-02 08:52:11+0530", "2026-12-02 03:22:11.000000+00:00"),
    ],
)
def test_target_times_are_normalised_to_utc_microseconds(text: str, expected: str) -> None:
    assert parse_target_time(text).setting == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-12-02 03:22:11", "no time zone"),
        ("2026-12-02", "no time zone"),
        ("now", "not a fixed point"),
        ("Tomorrow", "not a fixed point"),
        ("infinity", "not a fixed point"),
        ("yesterday at noon", "not a time"),
        ("2026-13-02 03:22:11+00", "not a time"),
        ("", "not a time"),
    ],
)
def test_bad_target_times_are_refused(text: str, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        parse_target_time(text)


def test_target_lsns_and_names() -> None:
    assert parse_target_lsn(" 16/B374D848 ") == LsnTarget(0x16B374D848)
    assert parse_target_lsn("0/3000E18", inclusive=False) == LsnTarget(0x3000E18, inclusive=False)
    for bad in ("16/B374D848/1", "0x16", "", "16/"):
        with pytest.raises(TargetError, match="not an LSN"):
            parse_target_lsn(bad)
    with pytest.raises(TargetError):
        LsnTarget(-1)
    assert parse_target_name("before-upgrade") == NameTarget("before-upgrade")
    assert parse_target_name("é" * 31).name == "é" * 31  # 62 bytes
    assert parse_target_name("x" * MAX_NAME_BYTES).name == "x" * 63
    with pytest.raises(TargetError, match="at most 63 bytes; this one is 64"):
        parse_target_name("é" * 32)
    for bad in ("", "line\nbreak", "nul\x00", "tab\there"):
        with pytest.raises(TargetError):
            parse_target_name(bad)
    with pytest.raises(TargetError, match="time zone"):
        TimeTarget(datetime(2026, 12, 2))


@given(
    st.datetimes(
        timezones=st.just(UTC)
        | st.builds(
            timezone,
            st.timedeltas(timedelta(hours=-14), timedelta(hours=14)).map(
                lambda d: timedelta(minutes=d // timedelta(minutes=1))
            ),
        )
    )
)
def test_any_zoned_time_survives_the_setting(at: datetime) -> None:
    assert parse_target_time(TimeTarget(at).setting).at == at


# ---------------------------------------------------------------------------------------------------------------
# Settings, as text


def test_each_target_writes_its_parameter_last_and_blanks_the_others() -> None:
    command = restore_command("/var/lib/kybdr/spool")
    cases: dict[RecoveryTarget, list[tuple[str, str]]] = {
        TimeTarget(datetime(2026, 12, 2, 3, 22, 11, tzinfo=UTC)): [
            ("recovery_target_time", "2026-12-02 03:22:11.000000+00:00"),
            ("recovery_target_inclusive", "on"),
        ],
        LsnTarget(0x3000E18, inclusive=False): [
            ("recovery_target_lsn", "0/3000E18"),
            ("recovery_target_inclusive", "off"),
        ],
        NameTarget("rp1"): [("recovery_target_name", "rp1")],
        ImmediateTarget(): [("recovery_target", "immediate")],
        LatestTarget(): [],
    }
    for target, chosen in cases.items():
        parameters = RecoverySettings(command, target, 3).parameters()
        names = [name for name, _ in parameters]
        assert names[0] == "restore_command"
        assert set(TARGET_PARAMETERS) <= set(names), "every target parameter is written"
        assert len(names) == len(set(names)), "no parameter twice"
        assert parameters[-2:] == (("recovery_target_timeline", "3"), ("recovery_target_action", "promote"))
        assert list(parameters[-2 - len(chosen) : -2]) == chosen
        assert all(value == "" for name, value in parameters[1 : -2 - len(chosen)])


def test_timeline_action_and_archiving() -> None:
    settings = RecoverySettings("cp", LatestTarget(), "latest", action="pause", disable_archiving=True)
    assert dict(settings.parameters())["recovery_target_timeline"] == "latest"
    assert dict(settings.parameters())["recovery_target_action"] == "pause"
    assert settings.parameters()[-1] == ("archive_mode", "off")
    for timeline in (0, -1, 2**32, True, "newest"):
        with pytest.raises(RecoverySettingsError):
            RecoverySettings("cp", LatestTarget(), timeline).parameters()  # type: ignore[arg-type]
    with pytest.raises(RecoverySettingsError):
        RecoverySettings("cp", LatestTarget(), 1, action="explode").parameters()  # type: ignore[arg-type]


def test_conf_quoting() -> None:
    assert conf_quote("plain") == "'plain'"
    assert conf_quote("it's") == "'it''s'"
    assert conf_quote("back\\slash") == "'back\\\\slash'"
    for bad in ("new\nline", "car\rriage", "nul\x00", "esc\x1b"):
        with pytest.raises(RecoverySettingsError, match="control character"):
            conf_quote(bad)


def test_restore_command_inputs() -> None:
    for bad in ("relative/spool", "", "/tmp/new\nline"):
        with pytest.raises(RecoverySettingsError):
            restore_command(bad)
    with pytest.raises(RecoverySettingsError):
        restore_command("/spool", wait_seconds=0)
    assert "%%" in restore_command("/a%b")  # a literal % is doubled so PostgreSQL does not substitute it
    assert WANTED_SUFFIX not in restore_command("/spool", announce=False)
    assert PENDING_SUFFIX not in restore_command("/spool", wait=False)


# ---------------------------------------------------------------------------------------------------------------
# Settings, through the real PostgreSQL and /bin/sh


def _as_postgres() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder under /tmp the postgres user can use (pytest's tmp_path is root's, 0700)."""
    base = Path(tempfile.mkdtemp(prefix="kybdr-wal-", dir="/tmp"))
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(base, entry.pw_uid, entry.pw_gid)
    (base / "postgresql.conf").write_text("", encoding="utf-8")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def postgres_setting(data_dir: Path, name: str) -> str:
    proc = subprocess.run(
        [str(PG_BIN / "postgres"), "-D", str(data_dir), "-C", name],
        capture_output=True,
        text=True,
        check=False,
        **_as_postgres(),
    )
    assert proc.returncode == 0, proc.stderr
    value: str = proc.stdout
    return value.removesuffix("\n")


def pg15_substitute(command: str, path: str, file: str) -> str:
    """PostgreSQL 15's BuildRestoreCommand: %p, %f, %r replaced, %% → %, any other % kept."""
    out, i = [], 0
    while i < len(command):
        pair = command[i : i + 2]
        replacement = {"%p": path, "%f": file, "%r": "000000010000000000000001", "%%": "%"}.get(pair)
        if replacement is not None:
            out.append(replacement)
            i += 2
        else:
            out.append(command[i])
            i += 1
    return "".join(out)


def test_postgresql_reads_the_settings_back(scratch: Path) -> None:
    spool = scratch / NASTY
    settings = RecoverySettings(restore_command(str(spool)), parse_target_lsn("0/3000E18"), 3, disable_archiving=True)
    # A copied configuration with another target already set: ours must replace it, not clash with it.
    (scratch / "postgresql.conf").write_text(
        "recovery_target_name = 'old'\nrecovery_target_time = '2020-01-01 00:00:00+00'\n", encoding="utf-8"
    )
    (scratch / "postgresql.auto.conf").write_text(settings.conf_text(), encoding="utf-8")
    for name, value in settings.parameters():
        assert postgres_setting(scratch, name) == value, name
    name_settings = RecoverySettings(restore_command(str(spool)), NameTarget("rp '1' \\ %"), 2)
    (scratch / "postgresql.auto.conf").write_text(name_settings.conf_text(), encoding="utf-8")
    assert postgres_setting(scratch, "recovery_target_name") == "rp '1' \\ %"
    assert postgres_setting(scratch, "recovery_target_lsn") == ""


def test_restore_command_runs_the_spool_protocol(scratch: Path) -> None:
    spool = scratch / NASTY
    spool.mkdir()
    (scratch / "postgresql.auto.conf").write_text(
        f"restore_command = {conf_quote(restore_command(str(spool), wait_seconds=1))}\n", encoding="utf-8"
    )
    command = postgres_setting(scratch, "restore_command")
    data = scratch / "data"
    (data / "pg_wal").mkdir(parents=True)

    def run(file: str, path: str = "pg_wal/RECOVERYXLOG") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["/bin/sh", "-c", pg15_substitute(command, path, file)],
            cwd=data,
            capture_output=True,
            text=True,
            check=False,
        )

    (spool / SEGMENT).write_bytes(b"wal bytes")
    done = run(SEGMENT)
    assert (done.returncode, done.stderr) == (0, "")
    assert (data / "pg_wal" / "RECOVERYXLOG").read_bytes() == b"wal bytes"
    assert (spool / (SEGMENT + WANTED_SUFFIX)).exists()  # the fetcher sees how far recovery has got

    missing = run("000000010000000000000009")
    assert (missing.returncode, missing.stderr) == (1, "")  # "not in the archive": the end of the WAL

    (spool / ("00000002.history" + FAILED_SUFFIX)).write_text("sha256 mismatch in 00000002.history\n")
    failed = run("00000002.history")
    assert failed.returncode == EXIT_FETCH_FAILED > 125  # PostgreSQL aborts recovery rather than promote
    assert "sha256 mismatch" in failed.stderr

    (spool / ("000000010000000000000004" + PENDING_SUFFIX)).touch()
    stuck = run("000000010000000000000004")
    assert stuck.returncode == EXIT_WAIT_TIMEOUT
    assert "gave up waiting" in stuck.stderr

    broken = run(SEGMENT, path="no/such/dir/RECOVERYXLOG")
    assert broken.returncode == EXIT_COPY_FAILED  # a failed copy is not "no such file"

    # Planned, not fetched yet: the command waits, and copies once the fetcher has renamed the file in.
    pending = spool / ("000000010000000000000005" + PENDING_SUFFIX)
    pending.touch()
    waiting = subprocess.Popen(
        ["/bin/sh", "-c", pg15_substitute(command, "pg_wal/RECOVERYXLOG", "000000010000000000000005")], cwd=data
    )
    (spool / ".fetching").write_bytes(b"fetched later")
    (spool / ".fetching").rename(spool / "000000010000000000000005")
    pending.unlink()
    assert waiting.wait(timeout=30) == 0
    assert (data / "pg_wal" / "RECOVERYXLOG").read_bytes() == b"fetched later"


def test_the_copy_only_command(scratch: Path) -> None:
    spool = scratch / NASTY
    spool.mkdir()
    (spool / SEGMENT).write_bytes(b"x")
    (scratch / "pg_wal").mkdir()
    (scratch / "postgresql.auto.conf").write_text(
        f"restore_command = {conf_quote(restore_command(str(spool), wait=False))}\n", encoding="utf-8"
    )
    command = postgres_setting(scratch, "restore_command")
    for file, code in ((SEGMENT, 0), ("000000010000000000000004", 1)):
        proc = subprocess.run(["/bin/sh", "-c", pg15_substitute(command, "pg_wal/X", file)], cwd=scratch, check=False)
        assert proc.returncode == code
