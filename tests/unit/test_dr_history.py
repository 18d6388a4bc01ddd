"""The DR history (kybdr_agent/dr/history.py) and the DR state file (kybdr_agent/dr/state_file.py).

Real files in a temp folder and a real folder repository: append/read/limit/kind, ``seq`` across a reopen
and across a second writer, a torn last line from a crash, statistics, the copy to the repository and its
idempotence (after a crash between upload and progress too), and the state file's atomicity and mode.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kybdr_agent.dr import history as history_mod
from kybdr_agent.dr.history import History, HistoryError
from kybdr_agent.dr.state_file import StateFileError, load_state, save_state
from kybdr_agent.errors import KybdrError
from kybdr_agent.storage.local import LocalStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    """A clock the test moves (the history stamps ``at`` from it)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def _history(tmp_path: Path, origin: str = "dr-host") -> History:
    return History(tmp_path / "state" / "dr-history.jsonl", clock=FakeClock(), origin=origin)


def _operation(op: str, outcome: str, duration: float, trigger: str = "manual") -> dict[str, Any]:
    return {"kind": "operation", "operation": op, "trigger": trigger, "outcome": outcome, "duration_s": duration}


def test_append_read_limit_kind(tmp_path: Path) -> None:
    h = _history(tmp_path)
    assert h.read() == []
    assert h.read(5) == []
    first = h.append({"kind": "transition", "from": "starting", "to": "steady", "reason": "boot"})
    assert first["seq"] == 1
    assert first["at"] == (T0 + timedelta(seconds=1)).isoformat()
    assert first["from"] == "starting"
    for i in range(2, 21):
        h.append({"kind": "intent" if i % 2 else "result", "operation": "failover", "step": f"s{i}", "n": i})
    everything = h.read()
    assert [r["seq"] for r in everything] == list(range(1, 21))
    assert everything[0] == first
    assert [r["seq"] for r in h.read(3)] == [18, 19, 20]
    assert [r["seq"] for r in h.read(2, kind="intent")] == [17, 19]
    assert [r["seq"] for r in h.read(kind="transition")] == [1]
    assert h.read(0) == []
    assert h.read(100) == everything
    # a caller's own seq/at never override the history's numbering
    forged = h.append({"kind": "alert", "seq": 999, "at": "yesterday"})
    assert forged["seq"] == 21
    assert forged["at"] != "yesterday"
    # values that are not JSON are written as strings (datetimes, paths)
    odd = h.append({"kind": "alert", "when": T0, "where": Path("/x")})
    assert h.read(1) == [odd]
    assert odd["when"] == T0.isoformat()
    assert odd["where"] == "/x"


def test_file_mode_and_durability_layout(tmp_path: Path) -> None:
    h = _history(tmp_path)
    h.append({"kind": "alert"})
    assert stat.S_IMODE(h.path.stat().st_mode) == 0o600
    assert h.path.read_bytes().endswith(b"\n")
    assert h.path.read_bytes().count(b"\n") == 1


def test_seq_survives_reopen_and_a_second_writer(tmp_path: Path) -> None:
    h = _history(tmp_path)
    for _ in range(3):
        h.append({"kind": "alert"})
    again = _history(tmp_path)
    assert again.append({"kind": "alert"})["seq"] == 4
    # the first instance learns of the other's append (the file changed under it) rather than reusing 4
    assert h.append({"kind": "alert"})["seq"] == 5
    # a separate process appending (a one-shot CLI command while the daemon runs)
    code = (
        "import sys; from pathlib import Path; from kybdr_agent.clock import utc_now;"
        "from kybdr_agent.dr.history import History;"
        "h = History(Path(sys.argv[1]), clock=utc_now);"
        "print(h.append({'kind': 'switch', 'name': 'auto_failover', 'value': True})['seq'])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(h.path)], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "6"
    assert h.append({"kind": "alert"})["seq"] == 7
    assert [r["seq"] for r in _history(tmp_path).read()] == list(range(1, 8))


def test_torn_last_line_is_reported_fenced_and_skipped(tmp_path: Path) -> None:
    h = _history(tmp_path)
    for _ in range(3):
        h.append({"kind": "intent", "operation": "failover", "step": "promote"})
    with open(h.path, "ab") as fh:  # a crash mid-append: half a record, no newline
        fh.write(b'{"seq":4,"at":"2026-03-01T12:00:09+00:00","kind":"res')
    reopened = _history(tmp_path)
    assert reopened.torn_tail
    assert [r["seq"] for r in reopened.read()] == [1, 2, 3]
    assert [r["seq"] for r in reopened.read(2)] == [2, 3]
    record = reopened.append({"kind": "result", "operation": "failover", "step": "promote", "ok": True})
    assert record["seq"] == 4  # the torn record never reached disk whole, so its number is free
    lines = reopened.path.read_bytes().split(b"\n")
    assert lines[3].startswith(b'{"seq":4')
    assert lines[3].endswith(b'"kind":"res')
    assert json.loads(lines[4])["ok"] is True
    assert [r["seq"] for r in reopened.read()] == [1, 2, 3, 4]
    assert [r["seq"] for r in reopened.read(1)] == [4]
    assert reopened.statistics()["unreadable_lines"] == 1
    assert not _history(tmp_path).torn_tail


def test_garbage_and_oversized_lines_never_break_reading(tmp_path: Path) -> None:
    h = _history(tmp_path)
    h.append({"kind": "alert", "n": 1})
    with open(h.path, "ab") as fh:
        fh.write(b"not json at all\n")
        fh.write(b"[1, 2, 3]\n")
        fh.write(b"x" * (history_mod.MAX_RECORD_BYTES * 3) + b"\n")  # longer than any record can be
    h.append({"kind": "alert", "n": 2})
    assert [r["n"] for r in h.read()] == [1, 2]
    assert [r["n"] for r in h.read(5)] == [1, 2]
    assert h.append({"kind": "alert", "n": 3})["seq"] == 3
    with pytest.raises(HistoryError):
        h.append({"kind": "alert", "detail": "y" * history_mod.MAX_RECORD_BYTES})
    assert isinstance(HistoryError("x"), KybdrError)


def test_read_with_a_small_limit_reads_from_the_end(tmp_path: Path) -> None:
    """A long history (8 MiB, written directly): the newest records cost memory by the limit, not by the
    file — measured with tracemalloc while reading."""
    h = _history(tmp_path)
    h.path.parent.mkdir(parents=True)
    pad = "z" * 2000
    with open(h.path, "w") as fh:
        for i in range(1, 4001):
            fh.write(json.dumps({"seq": i, "at": T0.isoformat(), "kind": "transition", "pad": pad}) + "\n")
    assert h.path.stat().st_size > 8_000_000
    tracemalloc.start()
    try:
        newest = h.read(3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r["seq"] for r in newest] == [3998, 3999, 4000]
    assert peak < 4 * history_mod.BLOCK
    assert h.append({"kind": "alert"})["seq"] == 4001
    tracemalloc.start()
    try:
        stats = h.statistics()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats["records"] == 4001
    assert peak < 1 << 20  # streamed, one line at a time


def test_statistics(tmp_path: Path) -> None:
    h = _history(tmp_path)
    empty = h.statistics()
    assert empty["count_by_kind"] == {}
    assert empty["last"] is None
    assert empty["last_drill"] is None
    assert empty["time_to_failover_s"] == {"count": 0, "mean": None, "worst": None}
    h.append({"kind": "transition", "from": "steady", "to": "suspect"})
    h.append(_operation("failover", "succeeded", 12.0, trigger="auto"))
    h.append(_operation("test-failover", "succeeded", 3.0))
    h.append(_operation("failover", "failed", 99.0))
    h.append(_operation("failover", "succeeded", 20.0))
    h.append(_operation("failback", "succeeded", 40.0))
    h.append(_operation("test-failback", "failed", 1.0))
    h.append({"kind": "result", "operation": "failover", "step": "dns", "ok": True, "duration_s": 500.0})
    s = h.statistics()
    assert s["count_by_kind"] == {"failover": 3, "test-failover": 1, "failback": 1, "test-failback": 1}
    assert s["count_by_trigger"]["failover"] == {"auto": 1, "manual": 2}
    assert s["count_by_outcome"]["failover"] == {"succeeded": 2, "failed": 1}
    assert s["last"]["operation"] == "test-failback"
    assert s["last"]["seq"] == 7
    assert s["last_drill"]["operation"] == "test-failback"
    assert s["last_drill"]["outcome"] == "failed"
    assert s["time_to_failover_s"] == {"count": 2, "mean": 16.0, "worst": 20.0}
    assert s["records"] == 8
    assert s["unreadable_lines"] == 0


@pytest.mark.anyio
async def test_copy_to_a_folder_repository_is_idempotent_and_never_overwrites(tmp_path: Path) -> None:
    h = _history(tmp_path)
    store = LocalStore(tmp_path / "repo")
    assert await h.copy_to(store) == 0
    for i in range(5):
        h.append({"kind": "transition", "i": i})
    assert await h.copy_to(store) == 5
    assert await h.copy_to(store) == 0  # nothing new: nothing copied
    h.append({"kind": "alert", "i": 5})
    h.append({"kind": "alert", "i": 6})
    assert await h.copy_to(store) == 2
    assert await h.copy_to(store) == 0
    keys = [o.key async for o in store.list_objects("dr/history/")]
    assert len(keys) == 2
    assert all(k.startswith("dr/history/dr-host/") for k in keys)
    assert keys[0].startswith("dr/history/dr-host/000000000001-000000000005-")
    copied = []
    for key in keys:
        data = await store.get_bytes(key, max_size=1 << 20)
        copied += [json.loads(line) for line in data.splitlines()]
    assert copied == h.read()
    progress = h.progress_path
    assert stat.S_IMODE(progress.stat().st_mode) == 0o600
    assert load_state(progress) == {"copied_through": 7}


@pytest.mark.anyio
async def test_copy_to_after_a_crash_between_upload_and_progress(tmp_path: Path) -> None:
    """The sidecar says a batch was pending (written ahead of the upload): the same batch is uploaded
    again under the same name, found already there, and nothing is duplicated or overwritten."""
    h = _history(tmp_path)
    store = LocalStore(tmp_path / "repo")
    for i in range(3):
        h.append({"kind": "transition", "i": i})
    assert await h.copy_to(store) == 3
    for i in range(3, 6):
        h.append({"kind": "transition", "i": i})
    assert await h.copy_to(store) == 3
    before = {o.key: o.modified async for o in store.list_objects("dr/history/")}
    # rewind the sidecar as a crash right after the second upload would have left it
    save_state(h.progress_path, {"copied_through": 3, "pending": {"first": 4, "last": 6}})
    h.append({"kind": "transition", "i": 6})  # appended since: must not join the pending batch
    assert await h.copy_to(store) == 4  # the pending three again (already there), then the new one
    after = {o.key: o.modified async for o in store.list_objects("dr/history/")}
    assert set(before) < set(after)
    assert len(after) == 3
    assert all(after[k] == before[k] for k in before)  # nothing rewritten
    assert load_state(h.progress_path) == {"copied_through": 7}


@pytest.mark.anyio
async def test_copy_to_in_batches_and_with_a_lost_sidecar(tmp_path: Path) -> None:
    h = History(tmp_path / "state" / "dr-history.jsonl", clock=FakeClock(), origin="dr-host", copy_batch_records=4)
    store = LocalStore(tmp_path / "repo")
    for i in range(10):
        h.append({"kind": "transition", "i": i})
    assert await h.copy_to(store, prefix="dr/history") == 10
    keys = [o.key async for o in store.list_objects("dr/history/")]
    assert [k.split("/")[-1][:25] for k in keys] == [
        "000000000001-000000000004",
        "000000000005-000000000008",
        "000000000009-000000000010",
    ]
    h.progress_path.write_text("{torn")  # a lost or corrupt sidecar: start over, same names, no overwrite
    assert await h.copy_to(store) == 10
    assert [o.key async for o in store.list_objects("dr/history/")] == keys


def test_state_file_round_trip_mode_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "dr" / "dr-state.json"
    assert load_state(path) is None
    save_state(path, {"state": "steady", "active": "primary", "switches": {"auto_failover": False}, "at": T0})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_state(path) == {
        "state": "steady",
        "active": "primary",
        "switches": {"auto_failover": False},
        "at": T0.isoformat(),
    }
    save_state(path, {"state": "halted"})
    assert load_state(path) == {"state": "halted"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["dr-state.json"]  # no temp file left
    path.write_text('{"state": "ste')
    with pytest.raises(StateFileError, match="corrupt"):
        load_state(path)
    path.write_text("[1, 2]")
    with pytest.raises(StateFileError, match="JSON object"):
        load_state(path)
    assert issubclass(StateFileError, KybdrError)


def test_state_file_is_replaced_atomically(tmp_path: Path) -> None:
    """A reader in another process, reading while the state is rewritten over and over, only ever sees
    a whole old or a whole new state (never a partial file, never a missing one)."""
    path = tmp_path / "dr-state.json"
    save_state(path, {"n": 0, "pad": "p" * 50_000})
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, sys\n"
            "seen = 0\n"
            "for _ in range(3000):\n"
            "    d = json.loads(open(sys.argv[1], 'rb').read())\n"
            "    assert len(d['pad']) == 50000, d\n"
            "    seen += 1\n"
            "print(seen)\n",
            str(path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    n = 0
    while reader.poll() is None:
        n += 1
        save_state(path, {"n": n, "pad": "p" * 50_000})
    out, err = reader.communicate()
    assert reader.returncode == 0, err
    assert out.strip() == "3000"
    assert os.listdir(tmp_path) == ["dr-state.json"]
