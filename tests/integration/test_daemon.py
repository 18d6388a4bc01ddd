"""The daemon as a real process: every control endpoint over its real unix socket, TCP auth and roles, the
systemd notify protocol, SIGTERM during a large backup, SIGHUP, the start-up sweep, schedules and drills."""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kybdr_agent.postgres.cluster import Cluster, free_port
from tests.daemon_support import Daemon, start_daemon
from tests.faultproxy import FaultProxy
from tests.support import (
    KYBDR,
    MotoServer,
    create_incompressible_database,
    create_mixed_database,
    database_fingerprint,
    run_cli,
    unique_db,
)

SEED_BODY = {"compression": True, "encryption": True, "cross_region": False, "description": "Daily backup"}


def daemon_config(
    tmp_path: Path,
    pg: Cluster,
    key_file: Path,
    *,
    databases: list[str],
    repository: str | None = None,
    extra: str = "",
    policies: str = "",
) -> tuple[Path, Path]:
    socket_path = tmp_path / "control.sock"
    repo = repository or f'url = "file://{tmp_path / "repo"}"'
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[backup]\nbackup_dir = "{tmp_path / "state"}"\n{policies}\n'
        f'[database]\ndsn = "host={pg.socket_dir} port={pg.port} user=postgres"\n'
        f"databases = {json.dumps(databases)}\n\n"
        f'[encryption]\nkey_file = "{key_file}"\n\n[repository]\n{repo}\n\n'
        f'[control]\nsocket = "{socket_path}"\n\n[drill]\nschedule = ""\n\n'
        f"[daemon]\nshutdown_grace_seconds = 2\n{extra}"
    )
    return config, socket_path


@pytest.fixture(scope="module")
def app_db(pg: Cluster) -> str:
    name = unique_db("app")
    create_mixed_database(pg, name, rows=1500)
    return name


@pytest.fixture
def daemon(pg: Cluster, tmp_path: Path, key_file: Path, app_db: str) -> Iterator[Daemon]:
    config, socket_path = daemon_config(tmp_path, pg, key_file, databases=[app_db])
    agent = start_daemon(config, socket_path, tmp_path)
    yield agent
    assert agent.stop() == 0, agent.log()


def _one_job(resp: Any) -> dict[str, Any]:
    jobs = resp.body["jobs"]
    assert len(jobs) == 1
    job: dict[str, Any] = jobs[0]
    return job


def test_ready_notify_socket_mode_and_health(daemon: Daemon) -> None:
    assert "READY=1" in "\n".join(daemon.messages)
    mode = stat.S_IMODE(daemon.socket_path.stat().st_mode)
    assert mode == 0o660
    health = daemon.request("GET", "/healthz")
    assert health.status == 200
    assert health.body["status"] == "ok"


def test_every_backup_endpoint(daemon: Daemon, pg: Cluster, app_db: str) -> None:
    created = daemon.request("POST", "/v1/backup", SEED_BODY)
    assert created.status == 202, created.body
    assert created.body["job_id"] == _one_job(created)["id"]
    assert created.body["job_ids"] == [created.body["job_id"]]
    job = daemon.wait_job(created.body["job_id"])
    assert job["status"] == "succeeded", job
    backup = job["result"]
    assert backup["database"] == app_db
    assert backup["description"] == "Daily backup"

    listed = daemon.request("GET", "/v1/backup")
    assert [b["id"] for b in listed.body["backups"]] == [backup["id"]]
    shown = daemon.request("GET", f"/v1/backup/{backup['id']}")
    assert shown.status == 200
    assert shown.body["sha256"] == backup["sha256"]

    for level in ("quick", "full"):
        validated = daemon.request("POST", f"/v1/backup/{backup['id']}/validate?wait=true", {"level": level})
        assert validated.status == 200
        assert _one_job(validated)["status"] == "succeeded", validated.body

    target = unique_db("api_restored")
    restored = daemon.request(
        "POST", f"/v1/backup/{backup['id']}/restore?wait=true", {"target_database": target, "force": False}
    )
    assert _one_job(restored)["status"] == "succeeded", restored.body
    assert database_fingerprint(pg, target) == database_fingerprint(pg, app_db)

    # What the backup holds, and one schema of it restored on its own (the full matrix:
    # tests/integration/test_selective_restore.py; here the API's names).
    contents = daemon.request("GET", f"/v1/backup/{backup['id']}/contents").body
    assert {s["name"]: sorted(t["name"] for t in s["tables"]) for s in contents["schemas"]} == {
        "public": ["accounts", "events"],
        "audit": ["log"],
    }
    audit_only = unique_db("api_audit")
    selective = daemon.request(
        "POST", f"/v1/backup/{backup['id']}/restore?wait=true", {"target_database": audit_only, "schemas": ["audit"]}
    )
    assert _one_job(selective)["result"]["tables"] == ["audit.log"]
    assert pg.psql(audit_only, "select count(*) from audit.log").strip() == "100"
    refused = daemon.request(
        "POST", f"/v1/backup/{backup['id']}/restore", {"target_database": audit_only, "into_existing": True}
    )
    assert refused.status == 422
    assert refused.body["type"].endswith("/bad-selection")

    tested = daemon.request("POST", "/v1/backup/test?wait=true", {})
    drill = _one_job(tested)
    assert drill["status"] == "succeeded", drill
    assert drill["result"]["drills"][0]["passed"] is True
    assert drill["result"]["drills"][0]["tables_compared"] == 3

    cleanup = daemon.request("POST", "/v1/backup/cleanup?wait=true", {"dry_run": True})
    result = _one_job(cleanup)["result"]
    assert result["dry_run"] is True
    assert backup["id"] in result["kept"]  # the newest valid backup is never deleted

    stats = daemon.request("GET", "/v1/backup/stats").body
    assert stats["backups"]["count"] == 1
    assert stats["by_outcome"]["succeeded"] == 1
    assert stats["success_rate"] == 1.0
    assert stats["databases"][app_db]["last_good_id"] == backup["id"]
    assert stats["last_drill"]["status"] == "succeeded"

    jobs = daemon.request("GET", "/v1/jobs").body["jobs"]
    assert {j["kind"] for j in jobs} == {"backup", "validate", "restore", "test", "cleanup"}

    spec = daemon.request("GET", "/v1/openapi.json").body
    for path in (
        "/v1/backup",
        "/v1/backup/{backup_id}",
        "/v1/backup/{backup_id}/restore",
        "/v1/backup/{backup_id}/validate",
        "/v1/backup/{backup_id}/contents",
        "/v1/backup/backfill",
        "/v1/backup/cleanup",
        "/v1/backup/stats",
        "/v1/backup/test",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/healthz",
    ):
        assert path in spec["paths"], path
    assert set(spec["paths"]["/v1/backup"]) == {"get", "post"}
    pg.psql("postgres", f'drop database "{target}"')
    pg.psql("postgres", f'drop database "{audit_only}"')


def test_cleanup_deletes_manifest_first_and_keeps_newest(daemon: Daemon, tmp_path: Path) -> None:
    ids = []
    for _ in range(3):
        job = daemon.wait_job(_one_job(daemon.request("POST", "/v1/backup", {}))["id"])
        assert job["status"] == "succeeded"
        ids.append(job["result"]["id"])
    # Policy: the implicit default (every backup younger than min_age 1 h is kept), so nothing goes yet.
    kept = _one_job(daemon.request("POST", "/v1/backup/cleanup?wait=true", {"dry_run": False}))["result"]
    assert sorted(kept["kept"]) == sorted(ids)
    assert kept["deleted"] == []


def test_bad_input_gets_problem_json_and_changes_nothing(daemon: Daemon) -> None:
    before = daemon.request("GET", "/v1/jobs").body["jobs"]
    cases = [
        ("POST", "/v1/backup", {"raw": b"{not json"}, 400, "malformed-json"),
        ("POST", "/v1/backup", {"body": {"compresion": True}}, 422, "unknown-field"),
        ("POST", "/v1/backup", {"body": {"compression": "yes please"}}, 422, "invalid-body"),
        ("POST", "/v1/backup", {"raw": b"[1, 2]"}, 400, "malformed-json"),
        ("POST", "/v1/backup", {"raw": b"{" + b'"description": "' + b"x" * 70000 + b'"}'}, 413, "body-too-large"),
        ("GET", "/v1/backup/..%2F..%2Fetc", {}, 400, "invalid-backup-id"),
        ("GET", "/v1/backup/20261124T215226Z-3f9a1c2b", {}, 404, "not-found"),
        ("POST", "/v1/backup/20261124T215226Z-3f9a1c2b/restore", {"body": {"target_database": "x"}}, 404, "not-found"),
        ("POST", "/v1/backup/not-an-id/validate", {"body": {}}, 400, "invalid-backup-id"),
        ("POST", "/v1/backup/cleanup", {"body": {"dry_run": "maybe"}}, 422, "invalid-body"),
        ("GET", "/v1/jobs/job-doesnotexist", {}, 404, "not-found"),
        ("DELETE", "/v1/backup", {}, 405, "method-not-allowed"),
        ("GET", "/v1/nothing-here", {}, 404, "not-found"),
    ]
    for method, path, kwargs, status, slug in cases:
        resp = daemon.request(method, path, **kwargs)
        assert resp.status == status, (path, resp.body)
        assert resp.headers["content-type"].startswith("application/problem+json"), path
        assert resp.body["type"].endswith("/" + slug), (path, resp.body)
    assert daemon.request("GET", "/v1/jobs").body["jobs"] == before
    assert daemon.request("GET", "/v1/backup").body["backups"] == []


def test_tcp_requires_tokens_and_roles(pg: Cluster, tmp_path: Path, key_file: Path, app_db: str) -> None:
    port = free_port()
    tokens: dict[str, str] = {}
    entries = ""
    for role in ("viewer", "operator", "admin"):
        tokens[role] = secrets.token_urlsafe(24)
        (tmp_path / f"{role}.token").write_text(tokens[role] + "\n")
        (tmp_path / f"{role}.token").chmod(0o600)  # token files are secrets: others may not read them
        entries += f'\n[[control.tokens]]\nrole = "{role}"\ntoken_file = "{tmp_path / f"{role}.token"}"\n'
    config, socket_path = daemon_config(tmp_path, pg, key_file, databases=[app_db])
    text = config.read_text().replace("[control]\n", f'[control]\ntcp_listen = "127.0.0.1:{port}"\n')
    config.write_text(text + entries)
    agent = start_daemon(config, socket_path, tmp_path)
    try:
        assert agent.tcp_request(port, "GET", "/healthz").status == 401
        assert agent.tcp_request(port, "GET", "/healthz", token="wrong-token-wrong-token").status == 401
        undecodable = agent.tcp_request(port, "GET", "/healthz", token="\xff\xfe-not-utf8")
        assert undecodable.status == 401
        assert undecodable.headers["content-type"].startswith("application/problem+json")
        assert agent.tcp_request(port, "GET", "/v1/backup", token=tokens["viewer"]).status == 200
        denied = agent.tcp_request(port, "POST", "/v1/backup", {}, token=tokens["viewer"])
        assert denied.status == 403
        assert denied.body["type"].endswith("/forbidden")
        made = agent.tcp_request(port, "POST", "/v1/backup?wait=true", {}, token=tokens["operator"])
        assert made.status == 200
        backup_id = _one_job(made)["result"]["id"]
        body = {"target_database": unique_db("tcp")}
        assert (
            agent.tcp_request(port, "POST", f"/v1/backup/{backup_id}/restore", body, token=tokens["operator"]).status
            == 403
        )
        assert (
            agent.tcp_request(port, "POST", "/v1/backup/cleanup", {"dry_run": True}, token=tokens["operator"]).status
            == 403
        )
        restored = agent.tcp_request(
            port, "POST", f"/v1/backup/{backup_id}/restore?wait=true", body, token=tokens["admin"]
        )
        assert _one_job(restored)["status"] == "succeeded"
    finally:
        assert agent.stop() == 0


def test_sigterm_during_large_backup_aborts_cleanly(
    pg: Cluster, tmp_path: Path, key_file: Path, moto_server: MotoServer, bucket: str
) -> None:
    name = unique_db("big")
    create_incompressible_database(pg, name, megabytes=12)
    with FaultProxy(moto_server.endpoint) as proxy:
        proxy.delay_upload_part = 1.0
        repo = (
            f'url = "s3://{bucket}/kybdr"\nendpoint_url = "{proxy.endpoint}"\nregion = "us-east-1"\n'
            'addressing_style = "path"\npart_size_mib = 5\n'
        )
        config, socket_path = daemon_config(tmp_path, pg, key_file, databases=[name], repository=repo)
        agent = start_daemon(config, socket_path, tmp_path)
        job = _one_job(agent.request("POST", "/v1/backup", {}))
        s3 = moto_server.client()
        deadline = time.monotonic() + 60
        while proxy.counts["upload_part"] < 1:
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) != []
        started = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert agent.process.wait(timeout=60) == 0, agent.log()
        assert time.monotonic() - started < 2 + 30  # the grace period plus a bounded abort
        agent.wait_notify("STOPPING=1", timeout=5)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # Nothing of the backup is left; the audit trail (shipped at shutdown under audit/) is not a backup.
    backups = s3.list_objects_v2(Bucket=bucket, Prefix="kybdr/backups/")
    assert backups.get("KeyCount", 0) == 0, backups.get("Contents")
    journal = [json.loads(line) for line in (tmp_path / "state" / "journal.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"]) for r in journal] == [(job["id"], "cancelled")]


def test_sighup_reloads_a_good_config_and_keeps_the_old_one_on_a_bad_one(
    pg: Cluster, tmp_path: Path, key_file: Path, app_db: str
) -> None:
    config, socket_path = daemon_config(tmp_path, pg, key_file, databases=[app_db])
    agent = start_daemon(config, socket_path, tmp_path)
    try:
        good = config.read_text()
        config.write_text(good + "\n[nonsense]\nkey = 1\n")
        agent.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "config.reload_rejected" not in agent.log():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
        assert agent.request("GET", "/healthz").status == 200
        assert agent.request("GET", "/v1/backup/stats").status == 200

        # A good config with a per-second policy: after the reload the scheduler runs it.
        policy = f'[[backup.policies]]\nname = "every2s"\nschedule = "*/2 * * * * *"\ndatabases = ["{app_db}"]\n'
        config.write_text(good.replace("[database]", policy + "\n[database]", 1))
        agent.signal(signal.SIGHUP)
        agent.wait_notify("RELOADING=1", timeout=30)
        deadline = time.monotonic() + 30
        while True:
            jobs = agent.request("GET", "/v1/jobs").body["jobs"]
            scheduled = [j for j in jobs if j["params"].get("policy") == "every2s" and j["status"] == "succeeded"]
            if scheduled:
                break
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        assert scheduled[0]["result"]["labels"] == ["every2s"]
    finally:
        assert agent.stop() == 0


def test_restart_sweeps_leftovers(
    pg: Cluster, tmp_path: Path, key_file: Path, app_db: str, moto_server: MotoServer, bucket: str
) -> None:
    repo = (
        f'url = "s3://{bucket}/kybdr"\nendpoint_url = "{moto_server.endpoint}"\nregion = "us-east-1"\n'
        'addressing_style = "path"\n'
    )
    config, socket_path = daemon_config(
        tmp_path, pg, key_file, databases=[app_db], repository=repo, extra='sweep_older_than = "0s"\n'
    )
    agent = start_daemon(config, socket_path, tmp_path)
    good = _one_job(agent.request("POST", "/v1/backup?wait=true", {}))["result"]
    assert agent.stop() == 0

    # What a killed agent leaves: an open multipart upload and a data object without a manifest.
    s3 = moto_server.client()
    s3.create_multipart_upload(Bucket=bucket, Key=f"kybdr/backups/{app_db}/20200101T000000Z-deadbeef/data")
    s3.put_object(Bucket=bucket, Key=f"kybdr/backups/{app_db}/20200101T000001Z-0badf00d/data", Body=b"half")

    agent = start_daemon(config, socket_path, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while s3.list_multipart_uploads(Bucket=bucket).get("Uploads") or any(
            "0badf00d" in o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])
        ):
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="kybdr/backups/")["Contents"])
        manifest_key = f"kybdr/backups/{app_db}/{good['id']}/manifest.json"
        assert keys == sorted([f"kybdr/{good['object_key']}", f"kybdr/{good['globals']['object_key']}", manifest_key])
    finally:
        assert agent.stop() == 0


def test_watchdog_pings_while_healthy(pg: Cluster, tmp_path: Path, key_file: Path, app_db: str) -> None:
    config, socket_path = daemon_config(tmp_path, pg, key_file, databases=[app_db])
    agent = start_daemon(config, socket_path, tmp_path, env={"WATCHDOG_USEC": "200000"})
    try:
        deadline = time.monotonic() + 10
        while sum(m == "WATCHDOG=1" for m in agent.messages) < 3:
            assert time.monotonic() < deadline, agent.messages
            agent.read_notify(timeout=1)
    finally:
        assert agent.stop() == 0
    assert any(m.startswith("STOPPING=1") for m in agent.read_notify(timeout=1) + agent.messages)


def test_drill_fails_when_the_data_does_not_match(pg: Cluster, tmp_path: Path, key_file: Path, app_db: str) -> None:
    config, socket_path = daemon_config(tmp_path, pg, key_file, databases=[app_db])
    agent = start_daemon(config, socket_path, tmp_path)
    try:
        made = _one_job(agent.request("POST", "/v1/backup?wait=true", {}))["result"]
        manifest_path = tmp_path / "repo" / "backups" / app_db / made["id"] / "manifest.json"
        doc = json.loads(manifest_path.read_text())
        doc["row_counts"]["public.accounts"] += 1  # what the backup claims no longer matches what restores
        manifest_path.write_text(json.dumps(doc))
        drill = _one_job(agent.request("POST", "/v1/backup/test?wait=true", {}))
        assert drill["status"] == "failed"
        assert "differ" in drill["error"]
        leftovers = pg.psql("postgres", "select datname from pg_database where datname like 'kybdr\\_%'")
        assert leftovers.strip() == ""
    finally:
        assert agent.stop() == 0


def test_cli_talks_to_the_running_agent(daemon: Daemon, app_db: str) -> None:
    made = run_cli(daemon.config, "backup", "--json")
    assert made.returncode == 0, made.stderr
    backup = json.loads(made.stdout)
    assert backup["database"] == app_db
    # It went through the agent: the agent's job list has it.
    jobs = daemon.request("GET", "/v1/jobs").body["jobs"]
    assert any(j["kind"] == "backup" and (j["result"] or {}).get("id") == backup["id"] for j in jobs)
    status = run_cli(daemon.config, "status", "--json")
    assert status.returncode == 0
    assert json.loads(status.stdout)["agent"]["status"] == "ok"
    for verb in (["stats"], ["list"], ["test"], ["cleanup", "--dry-run"]):
        proc = run_cli(daemon.config, *verb)
        assert proc.returncode == 0, (verb, proc.stderr)


def test_status_without_an_agent_says_so(tmp_path: Path, pg: Cluster, key_file: Path, app_db: str) -> None:
    config, _socket = daemon_config(tmp_path, pg, key_file, databases=[app_db])
    proc = run_cli(config, "status")
    assert proc.returncode == 1
    assert "not running" in proc.stderr


def test_a_second_agent_on_the_same_socket_is_refused(daemon: Daemon) -> None:
    proc = subprocess.run(
        [*KYBDR, "--config", str(daemon.config), "run"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
        check=False,
    )
    assert proc.returncode == 78
    assert "already listening" in proc.stderr
    assert daemon.request("GET", "/healthz").status == 200


def test_seed_body_with_cross_region_copies_to_the_dr_bucket(
    pg: Cluster, tmp_path: Path, key_file: Path, app_db: str, moto_server: MotoServer, bucket: str
) -> None:
    s3 = moto_server.client()
    dr_bucket = f"{bucket}-dr"
    s3.create_bucket(Bucket=dr_bucket)
    repo = (
        f'url = "s3://{bucket}/kybdr"\nendpoint_url = "{moto_server.endpoint}"\nregion = "us-east-1"\n'
        'addressing_style = "path"\n'
    )
    config, socket_path = daemon_config(tmp_path, pg, key_file, databases=[app_db], repository=repo)
    config.write_text(
        config.read_text().replace(
            "[backup]\n", f'[backup]\ncross_region = true\ncross_region_bucket = "{dr_bucket}"\n', 1
        )
    )
    agent = start_daemon(config, socket_path, tmp_path)
    try:
        seed_body = {**SEED_BODY, "cross_region": True}
        job = _one_job(agent.request("POST", "/v1/backup?wait=true", seed_body))
        assert job["status"] == "succeeded", job
        made = job["result"]
        record = made["replication"]["cross_region"]
        assert record["bucket"] == dr_bucket
        manifest_key = f"kybdr/backups/{app_db}/{made['id']}/manifest.json"
        dr_keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=dr_bucket)["Contents"])
        assert dr_keys == sorted(
            [f"kybdr/{made['object_key']}", f"kybdr/{made['globals']['object_key']}", manifest_key]
        )
        primary = s3.get_object(Bucket=bucket, Key=f"kybdr/{made['object_key']}")["Body"].read()
        copy = s3.get_object(Bucket=dr_bucket, Key=f"kybdr/{made['object_key']}")["Body"].read()
        assert primary == copy
        primary_manifest = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
        assert primary_manifest["replication"]["cross_region"]["bucket"] == dr_bucket

        # Read from the DR region by name; a backup asked not to be copied is left alone by the backfill.
        listed = agent.request("GET", "/v1/backup?region=dr").body
        assert [(m["id"], m["locations"]) for m in listed["backups"]] == [(made["id"], ["primary", "dr"])]
        assert listed["regions"]["dr"]["reachable"] is True
        job = _one_job(agent.request("POST", f"/v1/backup/{made['id']}/validate?wait=true", {"region": "dr"}))
        assert job["result"]["region"] == "dr"
        assert job["result"]["ok"] is True
        local_only = _one_job(agent.request("POST", "/v1/backup?wait=true", SEED_BODY))["result"]
        assert local_only["replication"] == {"cross_region": {"status": "not requested"}}
        backfilled = _one_job(agent.request("POST", "/v1/backup/backfill?wait=true", {}))["result"]
        assert backfilled == {"copied": [], "failed": {}, "still_missing": 0}
        shown = agent.request("GET", f"/v1/backup/{local_only['id']}").body
        assert shown["locations"] == ["primary"]
    finally:
        assert agent.stop() == 0


def test_cross_region_request_without_configuration_is_refused(daemon: Daemon) -> None:
    resp = daemon.request("POST", "/v1/backup", {**SEED_BODY, "cross_region": True})
    assert resp.status == 422
    assert resp.body["type"].endswith("/cross-region-unavailable")
    assert daemon.request("GET", "/v1/jobs").body["jobs"] == []
    resp = daemon.request("GET", "/v1/backup?region=dr")
    assert resp.status == 422
    assert resp.body["type"].endswith("/region-unavailable")
    assert daemon.request("GET", "/v1/backup?region=west").status == 400
    assert daemon.request("POST", "/v1/backup/backfill", {}).status == 422


def test_missed_slots_after_downtime_run_once(pg: Cluster, tmp_path: Path, key_file: Path, app_db: str) -> None:
    """Three days down under a daily policy: one catch-up backup, not three, then nothing until the next slot."""
    policy = f'[[backup.policies]]\nname = "nightly"\nschedule = "0 2 * * *"\ndatabases = ["{app_db}"]\n'
    config, socket_path = daemon_config(tmp_path, pg, key_file, databases=[app_db], policies=policy)
    state = tmp_path / "state"
    state.mkdir()
    three_days_ago = datetime.now(UTC) - timedelta(days=3)
    (state / "scheduler.json").write_text(json.dumps({f"backup:nightly:{app_db}": three_days_ago.isoformat()}))
    agent = start_daemon(config, socket_path, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            jobs = [j for j in agent.request("GET", "/v1/jobs").body["jobs"] if j["params"].get("policy") == "nightly"]
            if jobs and all(j["status"] == "succeeded" for j in jobs):
                break
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        time.sleep(2 * 0.5 + 0.5)  # a few more scheduler ticks: nothing else may start
        jobs = [j for j in agent.request("GET", "/v1/jobs").body["jobs"] if j["params"].get("policy") == "nightly"]
        assert len(jobs) == 1, jobs
        slot = datetime.fromisoformat(jobs[0]["params"]["slot"])
        assert slot.hour == 2
        assert datetime.now(UTC) - timedelta(days=1) <= slot <= datetime.now(UTC)
        saved = json.loads((state / "scheduler.json").read_text())
        assert datetime.fromisoformat(saved[f"backup:nightly:{app_db}"]) == slot
    finally:
        assert agent.stop() == 0


def test_cli_shows_progress_on_a_terminal(daemon: Daemon, app_db: str) -> None:
    """Through a real pseudo-terminal: progress lines on the way, then the backup id."""
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [*KYBDR, "--config", str(daemon.config), "backup", "--database", app_db],
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        close_fds=True,
    )
    os.close(child_fd)
    output = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(main_fd)
    assert proc.wait(timeout=60) == 0, output
    text = output.decode()
    assert re.search(r"backup job-[0-9a-f]+: (queued|running|succeeded) [0-9.,]+ MiB", text), text
    assert re.search(r"\d{8}T\d{6}Z-[0-9a-f]{8}", text.split("\x1b[K")[-1]), text


def test_a_file_at_the_socket_path_is_never_replaced(pg: Cluster, tmp_path: Path, key_file: Path, app_db: str) -> None:
    config, socket_path = daemon_config(tmp_path, pg, key_file, databases=[app_db])
    socket_path.write_text("precious\n")
    proc = subprocess.run(
        [*KYBDR, "--config", str(config), "run"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 78
    assert "not a socket" in proc.stderr
    assert socket_path.read_text() == "precious\n"
