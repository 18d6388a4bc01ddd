"""The alert book's de-duplication, exhaustively: any sequence of fires, clears and events against a model.

What must hold whatever the order: a condition's first report sends one "firing" message and reports while
it persists send nothing; a clear sends one "resolved" only when the condition was firing; so for every key
the messages alternate firing, resolved, firing … starting with firing, and one-shot events always send.
The book never holds more than ``max_keys`` conditions, and a new condition is never kept quiet because the
book is full. Every message's JSON body has the same shape and is valid JSON; every subject fits SNS.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.alerts import (
    SUBJECT_MAX,
    SUMMARY_MAX,
    Alert,
    AlertBook,
    Message,
    dr_phase_severity,
    human_bytes,
    human_duration,
    one_line,
    parse_severity,
    replication_lag,
)

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
KEYS = ("backup_failed:a", "backup_failed:b", "stale:a", "stale:b", "repository_low", "dr_lag")

# An operation: ("fire", key), ("clear", key) or ("event", name).
operations = st.lists(
    st.one_of(
        st.tuples(st.just("fire"), st.sampled_from(KEYS)),
        st.tuples(st.just("clear"), st.sampled_from(KEYS)),
        st.tuples(st.just("event"), st.sampled_from(("dr_state", "dr_failover"))),
    ),
    max_size=60,
)


def alert_for(key: str, n: int = 0) -> Alert:
    database = key.split(":", 1)[1] if ":" in key else None
    return Alert(key.split(":")[0], "critical", f"{key} happened ({n})", database=database, details={"n": n})


def play(book: AlertBook, ops: list[tuple[str, str]]) -> list[Message]:
    sent: list[Message] = []
    for i, (op, what) in enumerate(ops):
        at = T0 + timedelta(seconds=i)
        if op == "fire":
            sent += book.firing(what, alert_for(what, i), at)
        elif op == "clear":
            sent += book.clear(what, at)
        else:
            sent += book.event(Alert(what, "info", f"{what} at {i}", region="dr"), at)
    return sent


@settings(max_examples=400)
@given(operations)
def test_messages_alternate_firing_and_resolved_per_key_and_events_always_send(ops: list[tuple[str, str]]) -> None:
    book = AlertBook(host="h1", max_keys=len(KEYS))
    sent = play(book, ops)

    # The model: a set of firing keys; what the book must have sent, in order.
    firing: set[str] = set()
    expected: list[tuple[str, str | None]] = []
    for op, what in ops:
        if op == "fire" and what not in firing:
            firing.add(what)
            expected.append(("firing", what))
        elif op == "clear" and what in firing:
            firing.remove(what)
            expected.append(("resolved", what))
        elif op == "event":
            expected.append(("event", None))
    assert [(m.status, m.key) for m in sent] == expected
    assert set(book.keys) == firing

    for key in KEYS:
        statuses = [m.status for m in sent if m.key == key]
        assert statuses == ["firing", "resolved"] * (len(statuses) // 2) + ["firing"] * (len(statuses) % 2)
    assert all(m.key is None for m in sent if m.status == "event")
    assert book.evicted == 0


@settings(max_examples=300)
@given(operations, st.integers(min_value=1, max_value=4))
def test_a_bounded_book_never_grows_and_never_silences_a_new_condition(
    ops: list[tuple[str, str]], max_keys: int
) -> None:
    book = AlertBook(host="h1", max_keys=max_keys)
    for i, (op, what) in enumerate(ops):
        at = T0 + timedelta(seconds=i)
        was_firing = what in book
        if op == "fire":
            sent = book.firing(what, alert_for(what), at)
            assert len(sent) == (0 if was_firing else 1)
            assert what in book
        elif op == "clear":
            sent = book.clear(what, at)
            assert [m.status for m in sent] == (["resolved"] if was_firing else [])
            assert what not in book
        assert len(book) <= max_keys


def test_the_oldest_condition_is_forgotten_first_when_the_book_is_full() -> None:
    book = AlertBook(host="h1", max_keys=2)
    for i, key in enumerate(("stale:a", "stale:b", "stale:c")):
        assert len(book.firing(key, alert_for(key), T0 + timedelta(seconds=i))) == 1
    assert book.keys == ("stale:b", "stale:c")
    assert book.evicted == 1
    assert book.clear("stale:a", T0) == ()  # forgotten: it clears silently


def test_a_resolved_message_keeps_the_alert_and_says_how_long_it_fired() -> None:
    book = AlertBook(host="db-host-1")
    alert = Alert("backup_failed", "critical", "backup of database mydb failed", database="mydb")
    (fired,) = book.firing("backup_failed:mydb", alert, T0)
    assert book.firing("backup_failed:mydb", alert, T0 + timedelta(minutes=1)) == ()
    assert book.since("backup_failed:mydb") == T0
    (resolved,) = book.clear("backup_failed:mydb", T0 + timedelta(minutes=5), summary="mydb backed up again")
    assert (fired.status, resolved.status) == ("firing", "resolved")
    assert resolved.alert == "backup_failed"
    assert resolved.database == "mydb"
    assert resolved.severity == "critical"
    assert resolved.summary == "mydb backed up again"
    assert resolved.details["firing_seconds"] == 300.0
    assert resolved.details["repeats"] == 1
    assert resolved.details["firing_since"] == T0.isoformat()
    assert book.clear("backup_failed:mydb", T0) == ()


def test_the_json_body_has_a_stable_shape() -> None:
    book = AlertBook(host="db-host-1")
    alert = Alert("stale", "critical", "database mydb has no good backup", database="mydb", details={"age": None})
    (message,) = book.firing("stale:mydb", alert, T0)
    assert json.loads(message.body()) == {
        "source": "kybdr-agent",
        "version": 1,
        "alert": "stale",
        "status": "firing",
        "severity": "critical",
        "summary": "database mydb has no good backup",
        "key": "stale:mydb",
        "database": "mydb",
        "host": "db-host-1",
        "at": "2030-01-02T03:04:05+00:00",
        "details": {"age": None},
    }
    (event,) = book.event(Alert("dr_state", "warning", "DR state steady -> suspect", region="primary"), T0)
    body = event.to_json()
    assert body["status"] == "event"
    assert body["region"] == "primary"
    assert "database" not in body
    assert "key" not in body


odd_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.datetimes(timezones=st.just(UTC))
    | st.builds(object),
    lambda inner: (
        st.lists(inner, max_size=3) | st.tuples(inner) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300)
@given(
    name=st.text(min_size=1, max_size=40),
    summary=st.text(max_size=500),
    database=st.none() | st.text(max_size=80),
    details=st.dictionaries(st.text(max_size=10), odd_values, max_size=4),
    status=st.sampled_from(("firing", "resolved", "event")),
)
def test_any_message_is_valid_json_with_a_one_line_summary_and_an_sns_subject(
    name: str, summary: str, database: str | None, details: dict[str, Any], status: Any
) -> None:
    message = Message(name, status, "warning", summary, "h", T0, database=database, details=details)
    body = json.loads(message.body())
    assert body["summary"] == message.summary
    assert "\n" not in message.summary
    assert len(message.summary) <= SUMMARY_MAX
    assert body.get("database") == database
    subject = message.subject()
    assert 0 < len(subject) <= SUBJECT_MAX
    assert all(" " <= c <= "~" for c in subject)
    assert subject.startswith(f"[{status.upper()}]")
    # Frozen: the details a channel sends cannot be changed by whoever built them.
    with pytest.raises(TypeError):
        message.details["x"] = 1  # type: ignore[index]


def test_long_and_multiline_text_is_flattened_and_cut() -> None:
    assert one_line("a\n  b\tc") == "a b c"
    cut = one_line("x" * 1000)
    assert len(cut) == SUMMARY_MAX
    assert cut.endswith("…")
    message = Message("a", "firing", "info", "é" * 200, "h", T0, details={"error": "e" * 10_000})
    assert len(message.details["error"]) == 2000
    assert len(message.subject()) == SUBJECT_MAX
    assert message.subject().endswith("...")


def test_unknown_severities_are_never_quieter() -> None:
    assert [parse_severity(s) for s in ("info", "warning", "critical", "fatal", "")] == [
        "info",
        "warning",
        "critical",
        "critical",
        "critical",
    ]


def test_a_book_needs_room_for_one_key() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        AlertBook(host="h", max_keys=0)


def test_human_sizes_and_durations() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 100 << 20, 10 << 30, 5 << 50)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "100.0 MiB",
        "10.0 GiB",
        "5120.0 TiB",
    ]
    assert [human_duration(s) for s in (-5, 0, 59, 61, 3600, 108_000, 90_061)] == [
        "0s",
        "0s",
        "59s",
        "1m",
        "1h",
        "1d 6h",
        "1d 1h",
    ]


def test_replication_lag_reads_the_writer_and_the_standby_whichever_way_round() -> None:
    def obs(primary: dict[str, Any], dr: dict[str, Any]) -> dict[str, Any]:
        return {"db": {"primary": primary, "dr": dr}}

    assert replication_lag(obs({"current_lsn": 5000}, {"replay_lsn": 1000})) == (4000, "dr")
    assert replication_lag(obs({"replay_lsn": 900}, {"current_lsn": 1000})) == (100, "primary")
    assert replication_lag(obs({"current_lsn": 5}, {"replay_lsn": 9})) == (0, "dr")
    assert replication_lag(obs({"current_lsn": None}, {"replay_lsn": 9})) is None
    assert replication_lag({"db": {"primary": {"current_lsn": 5}}}) is None
    assert replication_lag({}) is None


def test_dr_phases_have_a_severity_and_unknown_ones_are_a_warning() -> None:
    assert dr_phase_severity("steady") == "info"
    assert dr_phase_severity("promoting") == "critical"
    assert dr_phase_severity("something-new") == "warning"
