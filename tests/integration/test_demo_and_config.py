"""The README's main-job command, the example configuration, and the facts recorded in the snapshot."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from kybdr_agent.config import AgentSettings, PolicySettings, TokenSettings, load_settings
from kybdr_agent.postgres.cluster import Cluster
from tests.support import REPO_ROOT, agent_config, cli_json, create_mixed_database, run_cli, unique_db


def test_readme_main_job_runs_the_whole_path_on_the_embedded_default(tmp_path: Path) -> None:
    """`scripts/demo` with nothing configured: throwaway cluster, local folder, backup/validate/restore."""
    workdir = tmp_path / "demo"
    clusters_before = set(Path("/tmp").glob("kybdr-pg-*"))
    proc = subprocess.run(
        [str(REPO_ROOT / "scripts" / "demo"), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo complete" in proc.stdout
    assert "match table by table" in proc.stdout
    manifests = list((workdir / "repo").rglob("manifest.json"))
    assert len(manifests) == 1
    # Other tests (or another suite on this host) make clusters meanwhile: only the demo's own must be gone.
    # Its socket directory is the only one with a socket named for the port it printed.
    port = re.search(r"cluster up on port (\d+)", proc.stdout)
    assert port is not None, proc.stdout
    left = [
        d
        for d in set(Path("/tmp").glob("kybdr-pg-*")) - clusters_before
        if (d / "sock" / f".s.PGSQL.{port[1]}").exists()
    ]
    assert not left, f"the throwaway cluster was not removed: {left}"


def test_demo_uses_a_configured_database_instead(pg: Cluster, tmp_path: Path, key_file: Path) -> None:
    name = unique_db("configured")
    create_mixed_database(pg, name, rows=500)
    repo = tmp_path / "repo"
    config = agent_config(tmp_path, pg, repository=f'url = "file://{repo}"', key_file=key_file)
    config.write_text(config.read_text().replace("[database]", f'[database]\ndatabases = ["{name}"]'))
    proc = run_cli(config, "demo", "--workdir", str(tmp_path / "unused"))
    assert proc.returncode == 0, proc.stderr
    assert f"of {name}" in proc.stdout
    assert "row counts of" in proc.stdout
    assert len(list(repo.rglob("manifest.json"))) == 1
    leftovers = pg.psql("postgres", "select datname from pg_database where datname like 'kybdr\\_%'")
    assert leftovers.strip() == ""


def test_row_counts_are_recorded_in_the_dump_snapshot(pg: Cluster, tmp_path: Path, key_file: Path) -> None:
    name = unique_db("counts")
    create_mixed_database(pg, name, rows=1234)
    config = agent_config(tmp_path, pg, repository=f'url = "file://{tmp_path / "repo"}"', key_file=key_file)
    made = cli_json(config, "backup", "--database", name)
    assert made["row_counts"] == {"public.accounts": 1234, "public.events": 1234, "audit.log": 100}
    assert made["snapshot"]


def test_example_config_documents_every_field_and_loads(tmp_path: Path) -> None:
    example = REPO_ROOT / "config" / "agent.example.toml"
    text = example.read_text()
    nested = {"policies": PolicySettings, "tokens": TokenSettings}
    for section_name, section in AgentSettings.model_fields.items():
        assert f"[{section_name}]" in text, section_name
        model = section.annotation
        assert model is not None
        for field in model.model_fields:  # type: ignore[union-attr]
            if field in nested:
                assert re.search(rf"^#? ?\[\[{section_name}\.{field}\]\]", text, re.MULTILINE), field
                for inner in nested[field].model_fields:
                    assert re.search(rf"^#? ?{inner} = ", text, re.MULTILINE), f"{field}.{inner} undocumented"
                continue
            assert re.search(rf"^#? ?{field} = ", text, re.MULTILINE), f"{section_name}.{field} undocumented"
    settings = load_settings(example)
    assert settings.repository.url == "file:///var/lib/kybdr/repo"
    assert settings.backup.retention_days == 2557
    assert [p.name for p in settings.backup.policies] == ["daily", "weekly", "monthly"]
    assert settings.control.socket_mode == 0o660
