"""What the WAL shipper reports and reads besides the files: commit timestamps parsed from pg_waldump's
output, the ``wal_spool_full`` alert's decision, the WAL metrics, the ``[wal]`` settings, and the
pg_receivewal command line (no password, no compression, the slot and synchronous flushes)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kybdr_agent.alerts import AlertBook, wal_spool_alert
from kybdr_agent.config import AgentSettings
from kybdr_agent.config_wal import WalSettings
from kybdr_agent.telemetry.metrics import AgentMetrics
from kybdr_agent.wal.facts import parse_xact_time, xact_end_time
from kybdr_agent.wal.receiver import receivewal_argv

# Lines as pg_waldump 15 prints them (TZ=UTC), from a real cluster.
LINES = {
    b"rmgr: Transaction len (rec/tot):     34/    34, tx:        735, lsn: 0/0153F1A0, prev 0/0153F168, "
    b"desc: COMMIT 2026-12-02 05:35:41.927375 UTC": datetime(2026, 12, 2, 5, 35, 41, 927375, tzinfo=UTC),
    b"rmgr: Transaction len (rec/tot):     34/    34, tx:        736, lsn: 0/0153F1E8, prev 0/0153F1A0, "
    b"desc: ABORT 2026-12-02 05:35:42.000001 UTC": datetime(2026, 12, 2, 5, 35, 42, 1, tzinfo=UTC),
    b"rmgr: Transaction len (rec/tot):     82/    82, tx:          0, lsn: 0/0153F230, prev 0/0153F1E8, "
    b"desc: COMMIT_PREPARED 740: 2026-12-02 05:35:43 UTC": datetime(2026, 12, 2, 5, 35, 43, tzinfo=UTC),
    b"rmgr: Transaction len (rec/tot):    130/   130, tx:        737, lsn: 0/0153F290, prev 0/0153F230, "
    b"desc: COMMIT 2026-12-02 05:35:44.5 UTC; inval msgs: catcache 7 catcache 6": datetime(
        2026, 12, 2, 5, 35, 44, 500000, tzinfo=UTC
    ),
    b"rmgr: Transaction len (rec/tot):     46/    46, tx:        738, lsn: 0/0153F318, prev 0/0153F290, "
    b"desc: PREPARE gid t1: 2026-12-02 05:35:45.1 UTC": None,
    b"rmgr: Transaction len (rec/tot):     30/    30, tx:          0, lsn: 0/0153F348, prev 0/0153F318, "
    b"desc: ASSIGNMENT xtop 739: subxacts: 740": None,
    b"pg_waldump: error: error in WAL record at 0/153F348: invalid record length at 0/153F380": None,
}


@pytest.mark.parametrize(("line", "expected"), LINES.items())
def test_commit_and_abort_times_are_read_from_pg_waldump_lines(line: bytes, expected: datetime | None) -> None:
    assert xact_end_time(line) == expected


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2999, 12, 31)))
def test_timestamps_round_trip(moment: datetime) -> None:
    text = moment.strftime("%Y-%m-%d %H:%M:%S") + (f".{moment.microsecond:06d}" if moment.microsecond else "")
    assert parse_xact_time(text.encode()) == moment.replace(tzinfo=UTC)


def test_the_spool_alert_fires_once_and_resolves() -> None:
    book = AlertBook(host="db1")
    at = datetime(2026, 12, 2, tzinfo=UTC)

    def check(spool_bytes: int) -> tuple[str, ...]:
        over, alert = wal_spool_alert(
            host="db1",
            spool_dir="/var/lib/kybdr-agent/wal-spool",
            spool_bytes=spool_bytes,
            max_spool_bytes=1 << 30,
            files=70,
            oldest="000000010000000000000003",
            last_error="000000010000000000000003: the repository is unreachable",
        )
        messages = book.firing("wal_spool_full", alert, at) if over else book.clear("wal_spool_full", at)
        return tuple(f"{m.status} {m.severity} {m.summary}" for m in messages)

    assert check(1 << 29) == ()
    (fired,) = check((1 << 30) + 1)
    assert fired.startswith("firing critical WAL is not being archived on db1: 1.0 GiB in 70 file(s)")
    assert "the repository is unreachable" in fired
    assert check(2 << 30) == ()  # still firing: no second page
    (resolved,) = check(0)
    assert resolved.startswith("resolved critical")


def test_wal_metrics_only_when_measured() -> None:
    metrics = AgentMetrics()
    values: dict[str, float] = {"kybdr_wal_spool_bytes": 0.0, "kybdr_wal_files_shipped": 0.0}
    metrics.watch_wal(lambda: values)
    text = metrics.render().decode()
    assert "kybdr_wal_spool_bytes 0.0" in text
    assert "kybdr_wal_files_shipped_total 0.0" in text
    assert "kybdr_wal_slot_retained_bytes" not in text
    values.update(kybdr_wal_slot_retained_bytes=5e6, kybdr_wal_last_shipped_timestamp=1.7e9, kybdr_wal_files_shipped=3)
    text = metrics.render().decode()
    assert "kybdr_wal_slot_retained_bytes 5e+06" in text
    assert "kybdr_wal_files_shipped_total 3.0" in text


def test_wal_settings() -> None:
    settings = AgentSettings(backup={"backup_dir": "/srv/agent", "encryption": False})  # type: ignore[arg-type]
    assert not settings.wal.enabled
    assert settings.wal.mode == "stream"
    assert settings.wal_spool_dir() == Path("/srv/agent/wal-spool")
    assert WalSettings(spool_dir=Path("/x")).spool_path(Path("/y")) == Path("/x")
    for bad in ({"spool_dir": "relative"}, {"slot_name": "Bad-Slot"}, {"max_partial_age": 0}, {"mode": "push"}):
        with pytest.raises(ValueError, match="validation error"):
            WalSettings.model_validate(bad)


def test_pg_receivewal_flags() -> None:
    argv = receivewal_argv("/usr/lib/postgresql/15/bin/pg_receivewal", Path("/spool"), "kybdr_agent")
    assert argv[1:] == [
        "--directory=/spool",
        "--slot=kybdr_agent",
        "--synchronous",
        "--no-loop",
        "--no-password",
        "--status-interval=10",
    ]
    assert not any("password=" in arg or arg.startswith("--compress") for arg in argv)
