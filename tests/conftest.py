"""Shared fixtures: real PostgreSQL 15 clusters, a real moto server over HTTP, and the CLI as a subprocess.

Nothing of our own I/O is mocked: the agent talks to these exactly as it would in production.

Also the order in which ``pytest -n 2 --dist loadfile`` (scripts/test) hands out test files: longest first.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from kybdr_agent.postgres.cluster import Cluster, start_cluster
from tests.support import MotoServer, start_moto_server


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    with start_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = start_moto_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(moto_server: MotoServer) -> str:
    name = f"kybdr-test-{secrets.token_hex(4)}"
    moto_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(autouse=True)
def _aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto accepts any credentials; set fake ones so nothing ever reaches for real ones."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name in list(os.environ):
        if name.startswith("KYBDR_") and name not in ("KYBDR_CHECKOV", "KYBDR_FAULT_REPORT"):
            monkeypatch.delenv(name)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


# --- the order of the files -------------------------------------------------------------------------------
#
# With ``--dist loadfile`` each worker takes whole files, in queue order, whenever it is nearly out of work.
# xdist's own queue order is by number of tests, most first: that puts the slowest files — one or two long
# tests each — at the very end, where one of them can keep a worker busy for half a minute while the other
# has nothing left to take. Longest first, the run ends on short files and both workers finish together.
#
# Seconds per file on two quiet cores (``--durations=0``, summed per file; December 2026, some from loaded
# runs scaled down). Only the order matters, so rough figures do: refresh them when a file's cost changes
# a lot. A file not listed is estimated from its number of tests and its directory (PER_TEST_SECONDS).
FILE_SECONDS: Final[dict[str, float]] = {
    "tests/integration/test_failures.py": 72,
    "tests/faults/test_kill9.py": 50,
    "tests/faults/test_s3_faults.py": 50,
    "tests/integration/test_roundtrip.py": 45,
    "tests/dr/test_no_false_failover_e2e.py": 43,
    "tests/integration/test_daemon.py": 42,
    "tests/dr/test_failback_e2e.py": 36,
    "tests/faults/test_secrets_files.py": 31,
    "tests/faults/test_disk_and_peers.py": 30,
    "tests/dr/test_partition_e2e.py": 28,
    "tests/faults/test_config_socket.py": 28,
    "tests/integration/test_large.py": 26,
    "tests/faults/test_api_load.py": 26,
    "tests/faults/test_api_requests.py": 25,
    "tests/dr/test_dr_api_e2e.py": 24,
    "tests/faults/test_config_exits.py": 24,
    "tests/faults/test_secrets_leaks.py": 22,
    "tests/dr/test_kill9_e2e.py": 21,
    "tests/integration/test_regions.py": 19,
    "tests/integration/test_pitr_restore.py": 25,
    "tests/integration/test_wal_archive.py": 30,
    "tests/integration/test_physical_backup.py": 25,
    "tests/integration/test_pitr_drill.py": 18,
    "tests/integration/test_wal_retention.py": 12,
    "tests/integration/test_kms.py": 18,
    "tests/integration/test_key_rotate.py": 17,
    "tests/faults/test_api_schema.py": 15,
    "tests/faults/test_s3_slow_link.py": 14,
    "tests/faults/test_config_values.py": 14,
    "tests/faults/test_restore_safety.py": 14,
    "tests/integration/test_dr_dns.py": 13,
    "tests/integration/test_globals.py": 13,
    "tests/integration/test_telemetry_daemon.py": 12,
    "tests/dr/test_unprivileged_e2e.py": 11,
    "tests/integration/test_dr_probes.py": 11,
    "tests/faults/test_database_faults.py": 10,
    "tests/integration/test_dr_pgops.py": 9,
    "tests/integration/test_check_cli.py": 8,
    "tests/terraform/test_terraform.py": 7,
    "tests/integration/test_parallel_restore.py": 7,
    "tests/integration/test_selective_restore.py": 6,
    "tests/dr/test_failover_e2e.py": 5,
    "tests/integration/test_manage_script.py": 4,
    "tests/unit/test_config_fuzz.py": 4,
    "tests/integration/test_cloudwatch.py": 4,
    "tests/integration/test_dr_lease.py": 3,
    "tests/integration/test_notify.py": 2,
    "tests/integration/test_systemd_unit.py": 0.1,
}
PER_TEST_SECONDS: Final[dict[str, float]] = {
    "unit": 0.05,
    "component": 0.8,
    "terraform": 1.0,
    "integration": 1.5,
    "faults": 1.5,
    "dr": 8.0,
}


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's by-count order would undo ours
        config.option.loadscopereorder = False


def _file_seconds(path: str, tests: int) -> float:
    if path in FILE_SECONDS:
        return FILE_SECONDS[path]
    parts = path.split("/")
    return tests * PER_TEST_SECONDS.get(parts[1] if len(parts) > 2 else "", 1.0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker (whose collection order is the queue's): files longest first, each file's tests
    together and in their own order."""
    if not hasattr(config, "workerinput"):
        return
    by_file: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_file.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    order = sorted(by_file, key=lambda path: -_file_seconds(path, len(by_file[path])))
    items[:] = [item for path in order for item in by_file[path]]
