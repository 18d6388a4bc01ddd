"""Shared fixtures: real PostgreSQL 15 clusters, a real moto server over HTTP, and the CLI as a subprocess.

Nothing of our own I/O is mocked: the agent talks to these exactly as it would in production.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

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
