"""Physical manifests (kybdr_agent/backup/manifest.py's PhysicalInfo), their window view and consistency
segments (physical_manifest.py), their retention per cluster (physical_retention.py), the physical policy's
configuration and its schedule slot, the server checks that refuse a backup that could not be restored, and the
validation of a copy with no WAL archive beside it."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError

from kybdr_agent.backup.manifest import (
    CLUSTER_PREFIX,
    Manifest,
    PhysicalInfo,
    cluster_database,
    data_key_path,
    is_cluster_database,
)
from kybdr_agent.backup.physical import refusal
from kybdr_agent.backup.physical_manifest import NotPhysical, base_backup, consistency_segments, physical_info
from kybdr_agent.backup.physical_retention import merged, physical_retention_plan
from kybdr_agent.backup.retention_plan import RetentionPlan
from kybdr_agent.backup.slots import planned_slots
from kybdr_agent.backup.verify import validate_backup
from kybdr_agent.config import DrillSettings, PolicySettings
from kybdr_agent.postgres.connection import Connection
from kybdr_agent.storage.local import LocalStore
from tests.manifests import AT, sample_manifest

SYSID = "7714579446767659151"
MIB = 1 << 20


def info(**changes: Any) -> PhysicalInfo:
    fields: dict[str, Any] = {
        "system_identifier": SYSID,
        "timeline": 1,
        "start_lsn": "0/2000028",
        "stop_lsn": "0/2000100",
        "wal_segment_size": 16 * MIB,
        "stop_time": AT,
        "server_version_num": 150008,
        "tar_bytes": 10,
    }
    return PhysicalInfo(**{**fields, **changes})


def physical(backup_id: str, *, at: datetime = AT, sysid: str = SYSID, **more: Any) -> Manifest:
    """A physical manifest: ``tests.manifests.sample_manifest``'s fields, a cluster, its own key and ``more``."""
    database = cluster_database(sysid)
    fields = sample_manifest(backup_id, at=at).model_dump()
    fields.update(
        database=database,
        kind="physical",
        physical=info(system_identifier=sysid, stop_time=at),
        object_key=data_key_path(database, backup_id),
        **more,
    )
    return Manifest.model_validate(fields)


def test_a_physical_manifest_round_trips_and_keys_per_cluster() -> None:
    m = physical("20261124T215226Z-3f9a1c2b")
    assert m.database == "@cluster-" + SYSID
    assert is_cluster_database(m.database)
    assert m.object_key == f"backups/%40cluster-{SYSID}/20261124T215226Z-3f9a1c2b/data"
    assert Manifest.from_json(m.to_json()) == m
    assert sample_manifest("20261124T215226Z-3f9a1c2b").kind == "logical"


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"physical": None}, "needs its physical fields"),
        ({"database": "app"}, "must name its cluster"),
        ({"database": cluster_database("42")}, "must name its cluster"),
        ({"snapshot": "00000003-00000002-1"}, "no globals object, snapshot"),
        ({"dump_bytes": 11}, "tar size and dump size differ"),
        ({"kind": "logical"}, "a logical backup has no physical fields"),
    ],
)
def test_a_manifest_edited_into_the_other_kind_does_not_parse(changes: dict[str, Any], problem: str) -> None:
    document = physical("20261124T215226Z-3f9a1c2b").model_dump(mode="json")
    document.update({k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in changes.items()})
    with pytest.raises(ValidationError, match=problem):
        Manifest.model_validate(document)


def test_a_logical_backup_cannot_name_a_cluster() -> None:
    with pytest.raises(ValidationError, match="names a database, not a cluster"):
        sample_manifest("20261124T215226Z-3f9a1c2b", database=CLUSTER_PREFIX + "app")


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"stop_lsn": "0/2000028"}, "not after the start LSN"),
        ({"start_lsn": "nope"}, "not an LSN"),
        ({"timeline": 0}, "not a timeline"),
        ({"wal_segment_size": 3 * MIB}, "not a WAL segment size"),
        ({"system_identifier": "0"}, "not a system identifier"),
        ({"stop_time": datetime(2026, 11, 24)}, "must carry a time zone"),
    ],
)
def test_physical_info_holds_together(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        info(**changes)


def test_base_backup_and_consistency_segments() -> None:
    m = physical("20261124T215226Z-3f9a1c2b", started_at=AT - timedelta(seconds=5))
    base = base_backup(m)
    assert (base.timeline, base.start_lsn, base.stop_lsn) == (1, 0x2000028, 0x2000100)
    assert base.start_time == AT - timedelta(seconds=5)
    assert base.stop_time == AT
    assert [s.name for s in consistency_segments(physical_info(m))] == ["000000010000000000000002"]
    # A stop LSN exactly at a segment boundary ends in the segment before it (XLByteToPrevSeg).
    spanning = info(start_lsn="0/1FFFF00", stop_lsn="0/4000000", wal_segment_size=MIB * 16)
    assert [s.name for s in consistency_segments(spanning)] == [
        "000000010000000000000001",
        "000000010000000000000002",
        "000000010000000000000003",
    ]
    # The server's clock may run behind the agent's: the backup never starts after it stops.
    skewed = physical("20261124T215226Z-3f9a1c2b", started_at=AT + timedelta(seconds=3))
    assert base_backup(skewed).start_time == AT
    with pytest.raises(NotPhysical):
        base_backup(sample_manifest("20261124T215226Z-3f9a1c2b"))


def _policy(name: str, **fields: Any) -> PolicySettings:
    return PolicySettings(name=name, schedule="0 1 * * *", **fields)


def test_a_physical_policy_lists_no_databases_and_a_logical_one_some() -> None:
    assert _policy("base", kind="physical").databases == []
    with pytest.raises(ValidationError, match="lists no databases"):
        _policy("base", kind="physical", databases=["app"])
    with pytest.raises(ValidationError, match="list at least one database"):
        _policy("daily")


def test_a_physical_policy_has_one_slot() -> None:
    slots = planned_slots(
        True, [_policy("base", kind="physical"), _policy("daily", databases=["a", "b"])], DrillSettings(schedule=None)
    )
    assert [(s.key, s.kind, s.database) for s in slots] == [
        ("physical:base", "physical", None),
        ("backup:daily:a", "backup", "a"),
        ("backup:daily:b", "backup", "b"),
    ]


def _ids(n: int, start: datetime) -> list[tuple[str, datetime]]:
    return [
        (f"2026{11 + i // 28:02d}{1 + i % 28:02d}T010000Z-0000000{i % 10}", start + timedelta(days=i)) for i in range(n)
    ]


def test_physical_retention_keeps_per_cluster_by_the_physical_policies() -> None:
    start = datetime(2026, 11, 1, 1, tzinfo=UTC)
    now = start + timedelta(days=20)
    backups = [physical(i, at=at, labels=["base"]) for i, at in _ids(10, start)]
    other_cluster = [physical("20261105T010000Z-aaaaaaaa", at=start + timedelta(days=4), sysid="42", labels=["base"])]
    logical = [sample_manifest("20261101T010000Z-bbbbbbbb", at=start, labels=["base"])]
    policies = [_policy("base", kind="physical", keep_daily=3, keep_weekly=0, keep_monthly=0, keep_yearly=0)]
    plan = physical_retention_plan(policies, backups + other_cluster + logical, now, set(), timedelta(days=2557))
    assert plan.keep == {m.id for m in backups[-3:]} | {other_cluster[0].id}  # each cluster's newest days
    assert plan.delete == {m.id for m in backups[:-3]}
    assert "20261101T010000Z-bbbbbbbb" not in plan.keep | plan.delete  # logical backups are not its business
    # Without a physical policy, or for another agent's label, only age judges.
    aged = physical_retention_plan([], backups, now, set(), timedelta(days=15))
    assert aged.delete == {m.id for m in backups if now - m.finished_at > timedelta(days=15)}
    foreign = [physical(i, at=at, labels=["theirs"]) for i, at in _ids(3, start)]
    assert physical_retention_plan(policies, foreign, now, set(), timedelta(days=2557)).delete == set()


def test_plans_merge() -> None:
    a = RetentionPlan(frozenset({"1"}), frozenset({"2"}), {"1": "x", "2": "y"})
    b = RetentionPlan(frozenset({"3"}), frozenset(), {"3": "z"})
    assert merged(a, b) == RetentionPlan(frozenset({"1", "3"}), frozenset({"2"}), {"1": "x", "2": "y", "3": "z"})


GOOD_SERVER: dict[str, Any] = {
    "role": "backup",
    "may_replicate": True,
    "wal_level": "replica",
    "max_wal_senders": 10,
    "in_recovery": False,
    "tablespaces": [],
}


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({}, None),
        ({"may_replicate": False}, "lacks the REPLICATION attribute"),
        ({"wal_level": "minimal"}, "wal_level is minimal"),
        ({"max_wal_senders": 0}, "max_wal_senders is 0"),
        ({"in_recovery": True}, "is a standby"),
        ({"tablespaces": ["fast", "slow"]}, "tablespaces besides pg_default \\(fast, slow\\)"),
    ],
)
def test_the_server_checks_say_what_to_change(changes: dict[str, Any], problem: str | None) -> None:
    why = refusal({**GOOD_SERVER, **changes})
    if problem is None:
        assert why is None
    else:
        assert why is not None
        assert re.search(problem, why)


def test_a_copy_without_a_wal_archive_fails_validation_without_a_verdict(tmp_path: Path) -> None:
    """The DR region's copy of a physical backup has no WAL beside it: the validation fails, but never calls the
    backup corrupt (the journal would then mark the primary's copy, which shares its id, invalid)."""
    m = physical("20261124T215226Z-3f9a1c2b")
    m = m.model_copy(update={"stored_bytes": 39})
    store = LocalStore(tmp_path)
    anyio.run(store.put_bytes, m.object_key, bytes.fromhex(m.stream_header))
    connection = Connection(env={})
    result = anyio.run(
        lambda: validate_backup(m, store=store, keyring=None, connection=connection, level="quick", wal_archive=None)
    )
    assert not result.ok
    assert not result.corrupt
    assert result.error is not None
    assert "no WAL archive" in result.error
