"""The pure parts of sweeping: who holds a lease, which folders are candidates, when leaseless ones go,
and how an existing target's contents are described."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kybdr_agent.backup.lease import Lease, Owner, is_live, pid_alive, process_start, this_process
from kybdr_agent.backup.sweep import LEASELESS_FLOOR, Folder, leaseless_due, plan
from kybdr_agent.backup.target import TargetContents, describe
from kybdr_agent.storage.base import IncompleteUpload, ObjectInfo

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
HERE = Owner(host="m1:db1", boot_id="boot-a", pid=100, pid_start=5000)
ID = "20261201T120000Z-0123abcd"


def _lease(owner: Owner, renewed: datetime = NOW, ttl: float = 300.0) -> Lease:
    return Lease(ID, "app", owner, NOW - timedelta(hours=1), renewed, ttl)


def test_same_boot_is_judged_by_the_pid_only() -> None:
    other_pid = Owner(HERE.host, HERE.boot_id, 200, 7000)
    # Renewed long ago, but its process runs: live. Renewed just now, but its process is gone: dead.
    assert is_live(_lease(other_pid, renewed=NOW - timedelta(days=3)), HERE, NOW, lambda _o: True)
    assert not is_live(_lease(other_pid), HERE, NOW, lambda _o: False)


def test_same_host_after_a_reboot_is_dead_whatever_the_time() -> None:
    before_reboot = Owner(HERE.host, "boot-old", 100, 5000)
    assert not is_live(_lease(before_reboot), HERE, NOW, lambda _o: True)


@given(age=st.floats(min_value=0, max_value=10_000), ttl=st.floats(min_value=1, max_value=3600))
def test_another_host_is_live_exactly_within_its_ttl(age: float, ttl: float) -> None:
    remote = Owner("m2:db2", "boot-b", 100, 5000)
    lease = _lease(remote, renewed=NOW - timedelta(seconds=age), ttl=ttl)
    assert is_live(lease, HERE, NOW, lambda _o: pytest.fail("a remote pid is never looked up")) == (age < ttl)


def test_lease_round_trips_and_rejects_garbage() -> None:
    lease = _lease(HERE)
    assert Lease.from_json(lease.to_json()) == lease
    for raw in (b"", b"[]", b"{}", b'{"owner": 1}', lease.to_json().replace(b"+00:00", b"")):
        with pytest.raises(ValueError, match="not a lease"):
            Lease.from_json(raw)


def test_this_process_is_alive_and_a_recycled_pid_is_not() -> None:
    me = this_process()
    assert me.pid == os.getpid()
    assert process_start(me.pid) == me.pid_start
    assert pid_alive(me)
    assert not pid_alive(Owner(me.host, me.boot_id, me.pid, me.pid_start + 1))


def _obj(key: str, minutes_ago: float = 60) -> ObjectInfo:
    return ObjectInfo(key, 1, NOW - timedelta(minutes=minutes_ago))


def test_plan_picks_unfinished_folders_and_leaves_everything_else() -> None:
    done = f"backups/app/{ID}"
    dead = "backups/app/20261201T110000Z-00000000"
    rewriting = "backups/app/20261201T100000Z-11111111"
    objects = [
        _obj(f"{done}/data"),
        _obj(f"{done}/manifest.json"),
        _obj(f"{dead}/data"),
        _obj(f"{dead}/lease.json"),
        _obj(f"{rewriting}/data"),
        _obj(f"{rewriting}/manifest.json"),
        _obj("backups/app/not-an-id/data"),
        _obj("backups/stray"),
        _obj("dr/history/x"),
    ]
    uploads = [IncompleteUpload(f"{rewriting}/manifest.json", "u1", NOW)]
    folders = {f.prefix: f for f in plan(objects, uploads)}
    assert set(folders) == {dead, rewriting}
    assert folders[dead].has_lease
    assert not folders[dead].has_manifest
    assert folders[rewriting].has_manifest  # a candidate for its upload only, never its objects


_ids = st.sampled_from([f"20261201T1{n}0000Z-0000000{n}" for n in range(5)])
_names = st.sampled_from(["data", "manifest.json", "lease.json", ".kybdr-tmp-data.ab12"])


@given(
    objects=st.lists(st.tuples(_ids, _names), max_size=20),
    uploads=st.lists(_ids, max_size=5),
)
def test_plan_never_offers_a_complete_backup_without_cause(objects: list[tuple[str, str]], uploads: list[str]) -> None:
    infos = [_obj(f"backups/db/{i}/{n}") for i, n in objects]
    open_uploads = [IncompleteUpload(f"backups/db/{i}/data", f"u{k}", NOW) for k, i in enumerate(uploads)]
    for folder in plan(infos, open_uploads):
        assert folder.uploads or folder.has_lease or not folder.has_manifest
    offered = {f.prefix for f in plan(infos, open_uploads)}
    for i, _name in objects:
        prefix = f"backups/db/{i}"
        names = {n for j, n in objects if j == i}
        if "manifest.json" in names and "lease.json" not in names and i not in uploads:
            assert prefix not in offered


def test_leaseless_folders_wait_the_grace() -> None:
    folder = Folder("backups/app/x", objects={"data": _obj("backups/app/x/data", minutes_ago=1)})
    assert leaseless_due(folder, NOW, timedelta(0))
    assert not leaseless_due(folder, NOW, timedelta(hours=1))
    assert leaseless_due(folder, NOW + timedelta(hours=1), timedelta(hours=1))
    assert leaseless_due(Folder("backups/app/y"), NOW, timedelta(hours=1))


def test_a_lease_being_written_through_a_temp_file_waits_the_floor() -> None:
    temp = IncompleteUpload("backups/app/x/.kybdr-tmp-lease.json.ab12", ".kybdr-tmp-lease.json.ab12", NOW)
    folder = Folder("backups/app/x", uploads=[temp])
    assert not leaseless_due(folder, NOW, timedelta(0))
    assert leaseless_due(folder, NOW + LEASELESS_FLOOR, timedelta(0))


def test_a_fresh_database_has_nothing_to_describe() -> None:
    assert TargetContents().empty
    assert describe(TargetContents()) == []


def test_every_kind_of_content_is_named() -> None:
    found = TargetContents(
        user_objects={"pg_namespace": 1, "pg_type": 2, "pg_ts_config": 1, "pg_weird": 3},
        builtin_changed=True,
        foreign_owner="app",
        has_comment=True,
        settings=1,
        has_acl=True,
        connection_limit=5,
    )
    text = "; ".join(describe(found))
    for phrase in (
        "1 schema",
        "2 type",
        "text-search configuration",
        "3 pg_weird row",
        "built-in objects",
        "owner app",
        "a comment",
        "SET setting",
        "granted privileges",
        "connection limit of 5",
    ):
        assert phrase in text
    assert not found.empty
