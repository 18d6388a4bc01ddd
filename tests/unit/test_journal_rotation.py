"""The bounded journal (kybdr_agent/journal.py): it rotates, keeps a fixed number of generations, and what
its readers ask — statistics' outcome tally, retention's "corrupt" set — has the same answer after rotation
as it would from the whole, unbounded history.

Property-tested: random job histories are appended to a journal rotating every few hundred bytes, and each
reader's answer is compared with the same reader folded over every record ever appended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kybdr_agent.backup.service import BackupService
from kybdr_agent.backup.stats import OutcomeTally
from kybdr_agent.config import load_settings
from kybdr_agent.journal import Journal
from tests.support import folder_service

BACKUP_IDS = [f"20260101T00000{i}Z-0000000{i}" for i in range(4)]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KYBDR_CONFIG", raising=False)


def _service(tmp_path: Path, journal: Journal) -> BackupService:
    config = tmp_path / "agent.toml"
    config.write_text(f'[backup]\nencryption = false\nbackup_dir = "{tmp_path}"\n')
    return folder_service(load_settings(config), journal=journal)


records = st.one_of(
    st.builds(
        lambda status, db, n: {"kind": "backup", "status": status, "database": db, "error": f"e{n}", "n": n},
        st.sampled_from(["succeeded", "failed", "cancelled"]),
        st.sampled_from(["a", "b"]),
        st.integers(0, 10**6),
    ),
    st.builds(
        lambda status, n: {"kind": "test", "status": status, "result": {"drills": [n]}, "n": n},
        st.sampled_from(["succeeded", "failed"]),
        st.integers(0, 10**6),
    ),
    st.builds(
        lambda backup_id, level, verdict, n: {
            "kind": "validate",
            "status": "succeeded" if verdict == "ok" else "failed",
            "result": {
                "backup_id": backup_id,
                "level": level,
                "ok": verdict == "ok",
                "corrupt": verdict == "corrupt",
            },
            "n": n,
        },
        st.sampled_from(BACKUP_IDS),
        st.sampled_from(["quick", "full"]),
        st.sampled_from(["ok", "corrupt", "inconclusive"]),
        st.integers(0, 10**6),
    ),
    st.builds(lambda n: {"kind": "cleanup", "status": "succeeded", "n": n}, st.integers(0, 10**6)),
)


def _tally(history: list[dict[str, Any]]) -> OutcomeTally:
    tally = OutcomeTally()
    for record in history:
        tally.observe(record)
    return tally


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(records, max_size=80), max_bytes=st.integers(150, 900), keep=st.integers(1, 3))
def test_readers_answer_the_same_after_rotation(
    tmp_path_factory: pytest.TempPathFactory, history: list[dict[str, Any]], max_bytes: int, keep: int
) -> None:
    tmp_path = tmp_path_factory.mktemp("journal")
    journal = Journal(tmp_path / "journal.jsonl", max_bytes=max_bytes, keep=keep)
    for record in history:
        journal.append(record)
    unbounded = Journal(tmp_path / "reference.jsonl", max_bytes=1 << 40)
    for record in history:
        unbounded.append(record)

    assert OutcomeTally.from_journal(journal) == _tally(history)
    assert _service(tmp_path, journal)._invalid_ids() == _service(tmp_path, unbounded)._invalid_ids()
    generations = [p for p in tmp_path.iterdir() if p.name.startswith("journal.jsonl.") and p.name[14:].isdigit()]
    assert len(generations) <= keep


def test_rotation_bounds_the_files_and_keeps_the_summary_small(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl", max_bytes=2000, keep=2)
    for n in range(2000):
        journal.append({"kind": "backup", "status": "succeeded" if n % 10 else "failed", "database": "db", "n": n})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0] == "journal.jsonl"
    assert len([f for f in files if f[len("journal.jsonl.") :].isdigit()]) == 2
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total < 4 * 2000 + 2000  # current + two generations + a summary of a few records
    summary = json.loads((tmp_path / "journal.jsonl.summary").read_text())
    assert len(summary["carried"]) == 2  # the last succeeded and the last failed backup
    tally = OutcomeTally.from_journal(journal)
    assert tally.outcomes == {"succeeded": 1800, "failed": 200, "cancelled": 0}
    assert tally.last_failure is not None
    assert tally.last_failure["database"] == "db"
    assert [r["n"] for r in journal.records("backup")][-1] == 1999


def test_a_crash_after_the_summary_was_written_counts_nothing_twice(tmp_path: Path) -> None:
    """The summary names the last generation folded into it; a generation it already holds is skipped."""
    journal = Journal(tmp_path / "journal.jsonl", max_bytes=200, keep=1)
    for n in range(40):
        journal.append({"kind": "backup", "status": "succeeded", "n": n})
    summary = json.loads((tmp_path / "journal.jsonl.summary").read_text())
    folded = summary["folded_through"]
    # As if the agent died between writing the summary and deleting the generation it folded.
    (tmp_path / f"journal.jsonl.{folded}").write_text(json.dumps({"kind": "backup", "status": "succeeded"}) + "\n")
    assert OutcomeTally.from_journal(journal).outcomes["succeeded"] == 40
    for n in range(40, 80):
        journal.append({"kind": "backup", "status": "succeeded", "n": n})
    assert OutcomeTally.from_journal(journal).outcomes["succeeded"] == 80
    assert not (tmp_path / f"journal.jsonl.{folded}").exists()


def test_a_torn_line_and_a_damaged_summary_are_survived(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl", max_bytes=300, keep=1)
    for n in range(20):
        journal.append({"kind": "backup", "status": "failed", "database": f"d{n}", "n": n})
    with open(tmp_path / "journal.jsonl", "a") as fh:
        fh.write('{"kind": "backup", "sta')
    assert OutcomeTally.from_journal(journal).last_failure == {"at": None, "database": "d19", "error": None}
    (tmp_path / "journal.jsonl.summary").write_text("not json")
    tally = OutcomeTally.from_journal(journal)  # the live generations still answer
    assert 0 < tally.outcomes["failed"] < 20
    journal.append({"kind": "backup", "status": "succeeded"})  # and appending still works
    assert [r.get("status") for r in journal.records("backup")][-1] == "succeeded"


def test_a_missing_journal_reads_as_empty(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "nothing" / "journal.jsonl")
    assert list(journal.records()) == []
    assert OutcomeTally.from_journal(journal) == OutcomeTally()
    assert OutcomeTally.from_journal(None) == OutcomeTally()
