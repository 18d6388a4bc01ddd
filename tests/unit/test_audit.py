"""The audit trail (kybdr_agent/audit.py, audit_chain.py): records chained by hash, fsynced to segments, a
chain that survives restarts, rotation and torn writes, ``verify`` naming the first bad record whichever way
the journal was tampered with, the event mapping, and shipping to a repository folder.

Real files throughout; the store is a real ``LocalStore``. The pure chain is property-tested: any single
edit, removal or swap in a random chain is reported at exactly the record where it happened.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.audit import (
    AuditTrail,
    audit_subscriber,
    entry_for,
    read,
    segment_name,
    segments,
    ship,
    verify,
)
from kybdr_agent.audit_chain import GENESIS, ChainChecker, Link, encode, record_hash, seal
from kybdr_agent.events import (
    BackupCompleted,
    ControlRequestHandled,
    DROperationFinished,
    DRTransition,
    JobFinished,
    RetentionDeleted,
)
from kybdr_agent.storage.local import LocalStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def stepping_clock(start: datetime = T0, step: timedelta = timedelta(minutes=1)) -> Callable[[], datetime]:
    now = [start - step]

    def clock() -> datetime:
        now[0] += step
        return now[0]

    return clock


def make_trail(directory: Path, **kwargs: Any) -> AuditTrail:
    return AuditTrail(directory, clock=stepping_clock(), host="db1.example", **kwargs)


def fill(trail: AuditTrail, count: int) -> list[dict[str, Any]]:
    return [trail.append(f"uid:{1000 + i}", "POST backup", f"db{i}", "202", {"n": i}) for i in range(count)]


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def forge(record: dict[str, Any]) -> str:
    """A record with its own hash recomputed, as someone who knows the format would write it."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return encode({**body, "hash": record_hash(body)}).decode()


# --- writing -------------------------------------------------------------------------------------------------


def test_records_are_chained_fsynced_lines_in_private_files(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    trail = make_trail(directory)
    first, second = fill(trail, 2)

    assert first["seq"] == 0
    assert first["prev"] == GENESIS
    assert second["seq"] == 1
    assert second["prev"] == first["hash"]
    assert first["hash"] == record_hash(first)
    assert first == {
        "seq": 0,
        "at": "2026-03-01T12:00:00.000000+00:00",
        "host": "db1.example",
        "caller": "uid:1000",
        "operation": "POST backup",
        "target": "db0",
        "outcome": "202",
        "detail": {"n": 0},
        "prev": GENESIS,
        "hash": first["hash"],
    }
    path = directory / segment_name(1)
    assert [json.loads(line) for line in lines_of(path)] == [first, second]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert verify(directory).ok
    assert verify(directory).records == 2


def test_odd_values_are_stored_as_json_that_hashes_the_same_when_read_back(tmp_path: Path) -> None:
    trail = make_trail(tmp_path)
    detail = {"nan": float("nan"), "when": T0, "tuple": (1, 2), "long": "x" * 5000, "nested": {"a": {"b": [None]}}}
    record = trail.append("token:ops", "DELETE backup", None, "200 é", detail)
    assert record["detail"]["nan"] == "nan"
    assert len(record["detail"]["long"]) == 512
    huge = trail.append("agent", "x", None, "ok", {str(i): "y" * 500 for i in range(100)})
    assert huge["detail"] == {"truncated": True}
    assert verify(tmp_path).ok


def test_a_restart_continues_the_chain(tmp_path: Path) -> None:
    fill(make_trail(tmp_path), 3)
    trail = make_trail(tmp_path)
    assert trail.head.seq == 2
    record = trail.append("agent", "retention.delete", "b1", "deleted")
    assert record["seq"] == 3
    report = verify(tmp_path)
    assert report.ok
    assert report.records == 4


def test_segments_rotate_at_the_size_bound_and_the_chain_runs_across_them_and_restarts(tmp_path: Path) -> None:
    trail = make_trail(tmp_path, max_bytes=1000)
    fill(trail, 12)
    trail = make_trail(tmp_path, max_bytes=1000)  # a restart, mid-way through the newest segment
    fill(trail, 5)
    found = segments(tmp_path)
    assert len(found) >= 4
    assert [n for n, _ in found] == list(range(1, len(found) + 1))
    assert all(path.stat().st_size < 1000 + 400 for _, path in found)
    assert [r["seq"] for r in read(tmp_path)] == list(range(17))
    report = verify(tmp_path)
    assert report.ok
    assert report.records == 17
    assert report.segments == len(found)

    # a record removed at the start of a later segment is caught there, with that segment named
    second = found[1][1]
    tamper(second, lambda lines: lines[1:])
    report = verify(tmp_path)
    assert not report.ok
    assert report.file == second.name
    assert report.line == 1
    assert "removed" in (report.reason or "")


# --- tampering -----------------------------------------------------------------------------------------------


@pytest.fixture
def six(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    records = fill(make_trail(tmp_path), 6)
    return tmp_path / segment_name(1), records


def tamper(path: Path, change: Callable[[list[str]], list[str]]) -> None:
    path.write_text("".join(change(lines_of(path))))


def test_an_edited_field_is_caught_at_that_record(six: tuple[Path, list[dict[str, Any]]]) -> None:
    path, _ = six
    tamper(path, lambda lines: [*lines[:2], lines[2].replace('"outcome":"202"', '"outcome":"403"'), *lines[3:]])
    report = verify(path.parent)
    assert (report.ok, report.file, report.line, report.seq, report.records) == (False, path.name, 3, 2, 2)
    assert "edited" in (report.reason or "")


def test_an_edit_with_a_recomputed_hash_breaks_the_link_to_the_next(six: tuple[Path, list[dict[str, Any]]]) -> None:
    path, records = six
    tamper(path, lambda lines: [*lines[:2], forge({**records[2], "caller": "uid:0"}), *lines[3:]])
    report = verify(path.parent)
    assert (report.ok, report.line, report.seq) == (False, 4, 3)
    assert "chain broken" in (report.reason or "")


def test_a_removed_record_is_caught_where_it_is_missing(six: tuple[Path, list[dict[str, Any]]]) -> None:
    path, _ = six
    tamper(path, lambda lines: [*lines[:2], *lines[3:]])
    report = verify(path.parent)
    assert (report.ok, report.line, report.seq, report.records) == (False, 3, 3, 2)
    assert "expected seq 2" in (report.reason or "")


def test_an_inserted_forged_record_is_caught(six: tuple[Path, list[dict[str, Any]]]) -> None:
    path, records = six
    # The forger does everything a chain without a secret lets them: the next seq, the right prev, its hash.
    forged = forge({**records[3], "caller": "uid:0", "operation": "DELETE backup", "prev": records[2]["hash"]})
    tamper(path, lambda lines: [*lines[:3], forged, *lines[3:]])
    report = verify(path.parent)
    assert (report.ok, report.line, report.seq, report.records) == (False, 5, 3, 4)
    assert f"as at {path.name} line 4" in (report.reason or "")
    assert "inserted" in (report.reason or "")

    # A careless forger (a wrong prev) is caught at the forged line itself.
    path.write_text("".join(encode(r).decode() for r in records))
    careless = forge({**records[3], "prev": records[0]["hash"]})
    tamper(path, lambda lines: [*lines[:3], careless, *lines[3:]])
    report = verify(path.parent)
    assert (report.ok, report.line, report.seq) == (False, 4, 3)


def test_swapped_records_are_caught_at_the_first_out_of_place(six: tuple[Path, list[dict[str, Any]]]) -> None:
    path, _ = six
    tamper(path, lambda lines: [*lines[:2], lines[3], lines[2], *lines[4:]])
    report = verify(path.parent)
    assert (report.ok, report.line, report.seq, report.records) == (False, 3, 3, 2)
    assert "reordered" in (report.reason or "")


def test_a_truncated_tail_and_a_garbage_line_are_caught(six: tuple[Path, list[dict[str, Any]]]) -> None:
    path, records = six
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 20)
    report = verify(path.parent)
    assert (report.ok, report.line, report.seq, report.records) == (False, 6, None, 5)
    assert "truncated" in (report.reason or "")

    path.write_text("".join(encode(r).decode() for r in records))
    tamper(path, lambda lines: [*lines[:1], "not json\n", *lines[1:]])
    report = verify(path.parent)
    assert (report.ok, report.line, report.seq) == (False, 2, None)
    assert "unparsable" in (report.reason or "")

    path.write_text("x" * 100_000 + "\n" + "".join(encode(r).decode() for r in records))
    report = verify(path.parent)
    assert (report.ok, report.line, report.seq) == (False, 1, None)


def test_a_missing_first_segment_is_caught(tmp_path: Path) -> None:
    fill(make_trail(tmp_path, max_bytes=500), 6)
    (tmp_path / segment_name(1)).unlink()
    report = verify(tmp_path)
    assert not report.ok
    assert report.file == segment_name(2)
    assert report.line == 1
    assert "expected seq 0" in (report.reason or "")


def test_no_trail_at_all_verifies_as_empty(tmp_path: Path) -> None:
    report = verify(tmp_path / "nothing")
    assert (report.ok, report.records, report.segments) == (True, 0, 0)


# --- crashes -------------------------------------------------------------------------------------------------


def test_a_torn_tail_is_cut_off_at_the_next_start_and_the_cut_is_recorded(tmp_path: Path) -> None:
    fill(make_trail(tmp_path), 3)
    path = tmp_path / segment_name(1)
    torn = b'{"seq":3,"at":"2026-03-0'
    with open(path, "ab") as fh:
        fh.write(torn)  # a crash mid-write
    assert "truncated" in (verify(tmp_path).reason or "")

    trail = make_trail(tmp_path)
    assert trail.head.seq == 3
    (recovery,) = [r for r in read(tmp_path) if r["operation"] == "audit.recover"]
    assert recovery["seq"] == 3
    assert recovery["detail"] == {"bytes": len(torn)}
    assert recovery["target"] == path.name
    trail.append("agent", "retention.delete", "b", "deleted")
    report = verify(tmp_path)
    assert report.ok
    assert report.records == 5


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path: Path) -> None:
    fill(make_trail(tmp_path), 3)
    path = tmp_path / segment_name(1)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    assert verify(tmp_path).ok
    trail = make_trail(tmp_path)
    assert trail.append("agent", "x", None, "ok")["seq"] == 3
    assert verify(tmp_path).records == 4


def test_a_failed_write_is_logged_as_an_error_and_never_raised(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    trail = make_trail(directory)
    subscriber = audit_subscriber(trail)
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    directory.write_text("not a folder")  # every open below it now fails
    with structlog.testing.capture_logs() as logs:
        subscriber(RetentionDeleted("main", "20260101T000000Z-00000001", 10))
    (entry,) = logs
    assert entry["event"] == "audit.write_failed"
    assert entry["log_level"] == "error"
    assert entry["event_type"] == "RetentionDeleted"
    assert trail.head == Link()  # nothing was written, so the next record still follows the last one


# --- events --------------------------------------------------------------------------------------------------


def request(method: str, status: int, **kwargs: Any) -> ControlRequestHandled:
    fields: dict[str, Any] = {
        "at": T0,
        "method": method,
        "path": "/v1/backups",
        "route": "backups",
        "status": status,
        "caller": "uid:1000",
        "role": "operator",
        "seconds": 0.12345,
        "target": "main",
    }
    return ControlRequestHandled(**{**fields, **kwargs})


def job(via: str, params: dict[str, Any]) -> JobFinished:
    record = {"id": "j1", "kind": "backup", "status": "succeeded", "database": "main", "params": params, "via": via}
    return JobFinished(record)


def test_events_map_to_records() -> None:
    assert entry_for(request("GET", 200)) is None
    post = entry_for(request("POST", 202))
    assert post is not None
    assert (post.caller, post.operation, post.target, post.outcome, post.at) == (
        "uid:1000",
        "POST backups",
        "main",
        "202",
        T0,
    )
    assert post.detail == {"path": "/v1/backups", "role": "operator", "seconds": 0.123}
    refused = entry_for(request("GET", 403, caller="token:ci", role="viewer"))
    assert refused is not None
    assert refused.outcome == "403 refused"
    assert refused.caller == "token:ci"
    unauthenticated = entry_for(request("DELETE", 401, caller="anonymous", role=None))
    assert unauthenticated is not None
    assert unauthenticated.outcome == "401 refused"

    scheduled = entry_for(job("agent", {"policy": "daily", "slot": "2026-03-01T02:00:00+00:00"}))
    assert scheduled is not None
    assert (scheduled.caller, scheduled.operation, scheduled.target, scheduled.outcome) == (
        "agent:schedule",
        "backup",
        "main",
        "succeeded",
    )
    assert entry_for(job("agent", {})) is None  # asked for over the API: audited as that request
    assert entry_for(job("cli", {"slot": "x"})) is None

    deleted = entry_for(RetentionDeleted("main", "20260101T000000Z-00000001", 123))
    assert deleted is not None
    assert (deleted.caller, deleted.operation, deleted.target) == (
        "agent",
        "retention.delete",
        "20260101T000000Z-00000001",
    )

    operation = {"operation": "failover", "operation_id": "op1", "trigger": "auto", "outcome": "succeeded"}
    failover = entry_for(DROperationFinished({**operation, "target": "dr", "source": "primary", "reason": "down"}))
    assert failover is not None
    assert (failover.caller, failover.operation, failover.target, failover.outcome) == (
        "agent:dr",
        "dr.failover",
        "dr",
        "succeeded",
    )
    assert entry_for(DROperationFinished({**operation, "trigger": "manual"})) is None
    transition = entry_for(DRTransition("steady", "suspect", "primary", "probes failing", T0))
    assert transition is not None
    assert (transition.caller, transition.operation, transition.target, transition.outcome) == (
        "agent:dr",
        "dr.transition",
        "primary",
        "steady -> suspect",
    )
    assert entry_for(BackupCompleted("main", "b", T0, 1.0, 1, 1)) is None


def test_the_subscriber_appends_what_it_maps(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path, clock=lambda: T0 + timedelta(hours=1), host="h")
    subscriber = audit_subscriber(trail)
    subscriber(request("GET", 200))
    subscriber(request("POST", 202))
    subscriber(RetentionDeleted("main", "b1", 1))
    records = list(read(tmp_path))
    assert [(r["caller"], r["operation"], r["at"]) for r in records] == [
        ("uid:1000", "POST backups", "2026-03-01T12:00:00.000000+00:00"),
        ("agent", "retention.delete", "2026-03-01T13:00:00.000000+00:00"),  # the trail's clock
    ]
    assert verify(tmp_path).ok


def test_a_flood_of_refusals_is_counted_not_recorded_one_by_one(tmp_path: Path) -> None:
    now = [T0]
    trail = AuditTrail(tmp_path, clock=lambda: now[0], host="h")
    subscriber = audit_subscriber(trail, refusals_per_minute=3)
    with structlog.testing.capture_logs() as logs:
        for _ in range(10):
            subscriber(request("POST", 401, caller="anonymous", role=None))
        subscriber(request("POST", 202))  # allowed requests are never held back
    assert [entry["event"] for entry in logs] == ["audit.refusals_suppressed"]
    now[0] = T0 + timedelta(minutes=1)
    subscriber(request("GET", 200))  # any event closes the minute
    records = list(read(tmp_path))
    assert [r["outcome"] for r in records] == [
        "401 refused",
        "401 refused",
        "401 refused",
        "202",
        "7 refused requests not recorded",
    ]
    assert records[-1]["operation"] == "audit.suppressed"
    assert records[-1]["detail"] == {
        "from": "2026-03-01T12:00:00.000000+00:00",
        "to": "2026-03-01T12:01:00.000000+00:00",
    }
    assert verify(tmp_path).ok


def test_read_since(tmp_path: Path) -> None:
    fill(make_trail(tmp_path), 5)  # one a minute from T0
    assert [r["seq"] for r in read(tmp_path, T0 + timedelta(minutes=3))] == [3, 4]
    assert len(list(read(tmp_path))) == 5


# --- shipping ------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_ship_sends_new_and_grown_segments_only(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "repo")
    trail = make_trail(tmp_path / "audit", max_bytes=1000)
    fill(trail, 8)
    count = len(segments(trail.directory))
    assert count >= 2
    assert await ship(trail, store) == count
    assert await ship(trail, store) == 0

    fill(trail, 1)  # grows the open segment (or opens a new one)
    assert await ship(trail, store) == 1
    for name, path, _ in trail.snapshot():
        copy = await store.get_bytes(f"audit/db1.example/{name}", max_size=1 << 20)
        assert copy == path.read_bytes()

    # a restarted agent (a new trail object, or the folder alone) learns from the repository what it has
    assert await ship(make_trail(tmp_path / "audit", max_bytes=1000), store) == 0
    assert await ship(trail.directory, store, host="db1.example") == 0


@pytest.mark.anyio
async def test_ship_never_replaces_a_copy_with_a_shorter_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "repo")
    trail = make_trail(tmp_path / "audit")
    fill(trail, 4)
    assert await ship(trail, store) == 1
    path = trail.directory / segment_name(1)
    path.write_text("".join(lines_of(path)[:2]))  # someone cut the local journal
    assert await ship(trail.directory, store, host="db1.example") == 0
    copy = await store.get_bytes(f"audit/db1.example/{segment_name(1)}", max_size=1 << 20)
    assert len(copy.splitlines()) == 4


# --- the pure chain ------------------------------------------------------------------------------------------


def chain_of(count: int) -> list[str]:
    head, lines = Link(), []
    for i in range(count):
        record = seal(head, at=T0, host="h", caller=f"c{i}", operation="op", target=None, outcome="ok")
        head = Link(record["seq"], record["hash"])
        lines.append(encode(record).decode())
    return lines


def first_problem(lines: list[str]) -> tuple[int, int | None] | None:
    checker = ChainChecker()
    for index, line in enumerate(lines):
        problem = checker.check(line, where=f"line {index + 1}")
        if problem is not None:
            return index, problem.seq
    return None


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 12), st.data())
def test_any_single_tampering_is_reported_where_it_happened(count: int, data: st.DataObject) -> None:
    lines = chain_of(count)
    assert first_problem(lines) is None
    kind = data.draw(st.sampled_from(["edit", "remove", "swap", "duplicate"]))
    i = data.draw(st.integers(0, count - 2))  # removing the very last record is what shipping is for
    if kind == "edit":
        field = data.draw(st.sampled_from(["caller", "operation", "outcome", "at", "host"]))
        record = json.loads(lines[i])
        record[field] = record[field] + "!"
        lines[i] = encode(record).decode()
        assert first_problem(lines) == (i, i)
    elif kind == "remove":
        del lines[i]
        assert first_problem(lines) == (i, i + 1)
    elif kind == "swap":
        j = data.draw(st.integers(i + 1, count - 1))
        lines[i], lines[j] = lines[j], lines[i]
        assert first_problem(lines) == (i, j)
    else:
        lines.insert(i + 1, lines[i])
        assert first_problem(lines) == (i + 1, i)
