"""Which region holds what, and what a backfill pass copies: pure rules, every case, and hypothesis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.regions import NOT_REQUESTED, backfill_candidates, locations
from tests.manifests import sample_manifest

BASE = datetime(2026, 11, 24, tzinfo=UTC)


def _backup(minute: int, *, status: str | None = None) -> Manifest:
    at = BASE + timedelta(minutes=minute)
    replication = {} if status is None else {"cross_region": {"status": status}}
    return sample_manifest(at.strftime("%Y%m%dT%H%M%SZ") + "-3f9a1c2b", at=at, storage="s3", replication=replication)


def test_locations_list_the_regions_holding_the_manifest_primary_first() -> None:
    assert locations("a", {"dr": {"a"}, "primary": {"a"}}) == ["primary", "dr"]
    assert locations("a", {"dr": {"a"}}) == ["dr"]
    assert locations("a", {"primary": {"b"}}) == []


def test_backfill_copies_the_missing_newest_first_and_leaves_opted_out_ones() -> None:
    backups = [_backup(1), _backup(2), _backup(3, status=NOT_REQUESTED), _backup(4)]
    in_dr = {backups[1].id}
    chosen = backfill_candidates(backups, in_dr, limit=10)
    assert [m.id for m in chosen] == [backups[3].id, backups[0].id]
    assert [m.id for m in backfill_candidates(backups, in_dr, limit=1)] == [backups[3].id]


@given(
    minutes=st.lists(st.integers(0, 10_000), unique=True, max_size=30),
    copied=st.sets(st.integers(0, 29)),
    opted_out=st.sets(st.integers(0, 29)),
    limit=st.integers(1, 40),
)
def test_backfill_never_copies_what_dr_has_or_what_asked_not_to_be_copied(
    minutes: list[int], copied: set[int], opted_out: set[int], limit: int
) -> None:
    backups = [_backup(m, status=NOT_REQUESTED if i in opted_out else None) for i, m in enumerate(minutes)]
    in_dr = {b.id for i, b in enumerate(backups) if i in copied}
    chosen = backfill_candidates(backups, in_dr, limit)
    wanted = [b for i, b in enumerate(backups) if i not in copied and i not in opted_out]
    assert len(chosen) == min(limit, len(wanted))
    assert all(
        m.id not in in_dr and m.replication.get("cross_region", {}).get("status") != NOT_REQUESTED for m in chosen
    )
    # Newest first, and nothing newer than a chosen one was skipped.
    assert [m.finished_at for m in chosen] == sorted((m.finished_at for m in chosen), reverse=True)
    if chosen:
        assert all(b.finished_at <= chosen[-1].finished_at for b in wanted if b not in chosen)
