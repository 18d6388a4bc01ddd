"""Config meets terraform: every key of the ``agent_config`` and ``dr_region_agent_config`` outputs is a field
``kybdr-agent config check`` accepts, with a value of the shape terraform gives it. The keys are read from
``terraform/outputs.tf`` itself, so an output added there without the agent learning the field fails here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2.utils import SerializationOptions

from tests.support import KYBDR

ROOT = Path(__file__).resolve().parents[2]
_OPTIONS = SerializationOptions(strip_string_quotes=True, with_comments=False, explicit_blocks=False)

# What each output is in a real deployment (terraform computes these; the agent must take them as they are).
SAMPLE_VALUES: dict[str, Any] = {
    "repository.url": "s3://acme-kybdr-backups-use1/kybdr",
    "repository.region": "us-east-1",
    "backup.cross_region_bucket": "acme-kybdr-backups-usw2",
    "encryption.key_provider": "kms",
    "encryption.kms_key_id": "arn:aws:kms:us-east-1:123456789012:key/mrk-0123456789abcdef0123456789abcdef",
    "dr.primary_region": "us-east-1",
    "dr.dr_region": "us-west-2",
    "dr.health_check_url": "https://db-primary.example.com:443/health",
    "dr.route53_zone_id": "Z0123456789ABCDEFGHIJ",
    "dr.route53_domain": "db.example.com",
    "dr.load_balancer_arn": (
        "arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/primary/0123456789abcdef"
    ),
    "dr.dr_load_balancer_arn": (
        "arn:aws:elasticloadbalancing:us-west-2:123456789012:loadbalancer/app/dr/0123456789abcdef"
    ),
    "notify.sns_topic_arn": "arn:aws:sns:us-east-1:123456789012:kybdr-alerts",
}


def output_keys(name: str) -> list[str]:
    with (ROOT / "terraform" / "outputs.tf").open() as f:
        parsed = hcl2.load(f, serialization_options=_OPTIONS)
    for block in parsed["output"]:
        if name in block:
            value = block[name]["value"]
            assert isinstance(value, dict), f"output {name} is not a map"
            return list(value)
    raise AssertionError(f"terraform/outputs.tf has no output {name}")


def toml_of(keys: list[str], key_file: Path) -> str:
    # The outputs name a KMS key ring; without one (older outputs) a key file completes the configuration.
    sections: dict[str, dict[str, Any]] = {}
    if "encryption.key_provider" not in keys:
        sections["encryption"] = {"key_file": str(key_file)}
    for key in keys:
        section, _, field = key.partition(".")
        assert key in SAMPLE_VALUES, f"no sample value for terraform output key {key}: add one"
        sections.setdefault(section, {})[field] = SAMPLE_VALUES[key]
    lines: list[str] = []
    for section, fields in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{field} = {json.dumps(value)}" for field, value in fields.items())
        lines.append("")
    return "\n".join(lines)


@pytest.mark.parametrize("output", ["agent_config", "dr_region_agent_config"])
def test_config_check_accepts_every_terraform_output_key(output: str, tmp_path: Path, key_file: Path) -> None:
    keys = output_keys(output)
    assert {"notify.sns_topic_arn", "encryption.kms_key_id", "dr.route53_domain"} <= set(keys)
    config = tmp_path / "agent.toml"
    config.write_text(toml_of(keys, key_file))
    proc = subprocess.run(
        [*KYBDR, "--config", str(config), "config", "check", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    effective = shown.get("settings", shown)
    for key in keys:
        section, _, field = key.partition(".")
        assert effective[section][field] == SAMPLE_VALUES[key], key


def test_kms_key_alone_asks_for_the_kms_provider(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[encryption]\nkms_key_id = "{SAMPLE_VALUES["encryption.kms_key_id"]}"\n')
    proc = subprocess.run(
        [*KYBDR, "--config", str(config), "config", "check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 78
    assert 'key_provider = "kms"' in proc.stderr
    config.write_text(f'[encryption]\nkey_provider = "kms"\nkms_key_id = "{SAMPLE_VALUES["encryption.kms_key_id"]}"\n')
    proc = subprocess.run(
        [*KYBDR, "--config", str(config), "config", "check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr  # terraform's key ARN alone is a complete key configuration
