"""The agent-level retention plan: a backup made under another agent's policy is judged by age only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kybdr_agent.backup.manifest import Manifest
from kybdr_agent.backup.retention_plan import retention_plan
from kybdr_agent.backup.settings import BackupConfig
from kybdr_agent.config import AgentSettings, PolicySettings
from tests.unit.test_manifest import manifest_fields

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _backup(day: int, labels: list[str]) -> Manifest:
    backup_id = f"202611{day:02d}T020000Z-000000{day:02d}"
    finished = datetime(2026, 11, day, 2, 0, tzinfo=UTC)
    return Manifest(
        **manifest_fields(
            id=backup_id,
            database="app",
            started_at=finished - timedelta(minutes=1),
            finished_at=finished,
            object_key=f"backups/app/{backup_id}/data",
            labels=labels,
        )
    )


@pytest.fixture
def config() -> BackupConfig:
    policy = PolicySettings(
        name="nightly",
        schedule="0 2 * * *",
        databases=["app"],
        keep_daily=2,
        keep_weekly=0,
        keep_monthly=0,
        keep_yearly=0,
    )
    settings = AgentSettings(backup={"encryption": False, "policies": [policy]})  # type: ignore[arg-type]
    return BackupConfig.from_settings(settings)


def test_own_policy_prunes_and_a_foreign_policys_backups_are_kept_until_max_age(config: BackupConfig) -> None:
    own = [_backup(day, ["nightly"]) for day in range(1, 11)]
    theirs = [_backup(day, ["their-hourly"]) for day in range(11, 21)]
    plan = retention_plan(config, own + theirs, NOW, invalid=set())
    keep, delete, reasons = plan.keep, plan.delete, plan.reasons
    assert {m.id for m in theirs} <= keep  # another agent's policy decides about these, not ours
    assert {m.id for m in own[:-2]} == delete  # ours: keep_daily = 2
    assert all("younger than" in reasons[m.id] for m in theirs)


def test_manual_backups_are_judged_by_the_database_policy(config: BackupConfig) -> None:
    manual = [_backup(day, ["manual"]) for day in range(1, 6)]
    delete = retention_plan(config, manual, NOW, invalid=set()).delete
    assert len(delete) == 3
