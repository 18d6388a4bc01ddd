"""Offline checks of terraform/: no Terraform binary or provider can be downloaded here.

Every file is parsed with python-hcl2 and its structure asserted (buckets in two regions, lifecycle,
replication, a least-privilege agent policy, Route53, alarms, dashboards, AWS Backup, outputs that map
onto the agent's config fields, example tfvars that pass the variables' validations); then checkov,
installed in its own tool virtualenv, must report no failed check.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2.utils import SerializationOptions

REPO = Path(__file__).resolve().parents[2]
TF = REPO / "terraform"
BUCKET_MODULE = TF / "modules" / "backup_bucket"
ALARMS_MODULE = TF / "modules" / "agent_alarms"

PRIMARY = "${aws.primary}"
DR = "${aws.dr}"

# The metrics the agent publishes (namespace KybdrAgent).
AGENT_METRICS = (
    "BackupFailures",
    "BackupSucceeded",
    "BackupAgeSeconds",
    "BackupDurationSeconds",
    "BackupStoredBytes",
    "DRPrimaryHealthy",
    "DRFailovers",
    "RestoreDrillSeconds",
)

# Agent config field (TOML section.field) -> the output that feeds it.
CONFIG_OUTPUTS = {
    "repository.url": "repository_url",
    "repository.region": "repository_region",
    "backup.cross_region_bucket": "backup_cross_region_bucket",
    "encryption.key_provider": "encryption_key_provider",
    "encryption.kms_key_id": "encryption_kms_key_id",
    "dr.primary_region": "dr_primary_region",
    "dr.dr_region": "dr_dr_region",
    "dr.health_check_url": "dr_health_check_url",
    "dr.route53_zone_id": "dr_route53_zone_id",
    "dr.route53_domain": "dr_route53_domain",
    "dr.load_balancer_arn": "dr_load_balancer_arn",
    "dr.dr_load_balancer_arn": "dr_dr_load_balancer_arn",
    "notify.sns_topic_arn": "notify_sns_topic_arn",
}

# Exactly the calls the agent makes (see terraform/iam.tf).
AGENT_ACTIONS = {
    "s3:ListBucket",
    "s3:ListBucketMultipartUploads",
    "s3:GetObject",
    "s3:PutObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
    "s3:DeleteObject",
    "kms:GenerateDataKey",
    "kms:Decrypt",
    "kms:Encrypt",
    "route53:ChangeResourceRecordSets",
    "route53:ListResourceRecordSets",
    "route53:GetChange",
    "sns:Publish",
    "cloudwatch:PutMetricData",
    "elasticloadbalancing:DescribeLoadBalancers",
}

# Statements whose only possible resource is "*" (the API has no resource-level permissions), and the
# condition key that narrows each of them instead.
STAR_RESOURCE_STATEMENTS = {
    "PublishAgentMetrics": "cloudwatch:namespace",
    "ResolveLoadBalancerAliasTargets": "aws:RequestedRegion",
}

_OPTIONS = SerializationOptions(strip_string_quotes=True, with_comments=False, explicit_blocks=False)


# --------------------------------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------------------------------


@functools.cache
def parse(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        parsed: dict[str, Any] = hcl2.load(f, serialization_options=_OPTIONS)
    return parsed


class Config:
    """The blocks of one Terraform module directory, indexed by kind and name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files = sorted(directory.glob("*.tf"))
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.data: dict[tuple[str, str], dict[str, Any]] = {}
        self.modules: dict[str, dict[str, Any]] = {}
        self.variables: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.locals: dict[str, Any] = {}
        self.providers: list[dict[str, Any]] = []
        for path in self.files:
            doc = parse(path)
            for kind, index in (("resource", self.resources), ("data", self.data)):
                for block in doc.get(kind, []):
                    for rtype, named in block.items():
                        for name, body in named.items():
                            assert (rtype, name) not in index, f"{kind} {rtype}.{name} declared twice"
                            index[(rtype, name)] = body
            for kind, flat in (("module", self.modules), ("variable", self.variables), ("output", self.outputs)):
                for block in doc.get(kind, []):
                    for name, body in block.items():
                        assert name not in flat, f"{kind} {name} declared twice"
                        flat[name] = body
            for block in doc.get("locals", []):
                self.locals.update(block)
            for block in doc.get("provider", []):
                for name, body in block.items():
                    self.providers.append({"name": name, **body})

    def resource(self, rtype: str, name: str) -> dict[str, Any]:
        assert (rtype, name) in self.resources, f"missing resource {rtype}.{name} in {self.directory}"
        return self.resources[(rtype, name)]

    def of_type(self, rtype: str) -> dict[str, dict[str, Any]]:
        return {name: body for (t, name), body in self.resources.items() if t == rtype}

    def text(self) -> str:
        return "\n".join(p.read_text(encoding="utf-8") for p in self.files)


@functools.cache
def root() -> Config:
    return Config(TF)


@functools.cache
def bucket_module() -> Config:
    return Config(BUCKET_MODULE)


@functools.cache
def alarms_module() -> Config:
    return Config(ALARMS_MODULE)


def one(blocks: Any) -> dict[str, Any]:
    """A nested block that must appear exactly once (python-hcl2 gives repeated blocks as a list)."""
    assert isinstance(blocks, list), blocks
    assert len(blocks) == 1, blocks
    block = blocks[0]
    assert isinstance(block, dict)
    return block


def statements(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Statements of an aws_iam_policy_document, including those inside dynamic blocks."""
    yield from document.get("statement", [])
    for dynamic in document.get("dynamic", []):
        yield from dynamic.get("statement", {}).get("content", [])


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def conditions(statement: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["variable"]: c for c in statement.get("condition", [])}


def unescape(hcl_string: str) -> str:
    """Undo HCL string escapes (python-hcl2 keeps them in expressions)."""
    return re.sub(r"\\(.)", r"\1", hcl_string)


def load_tfvars(name: str) -> dict[str, Any]:
    return parse(TF / "environments" / f"{name}.tfvars")


# --------------------------------------------------------------------------------------------------
# Layout, providers, documentation
# --------------------------------------------------------------------------------------------------


def test_every_file_parses() -> None:
    files = sorted(p for p in TF.rglob("*") if p.suffix in {".tf", ".tfvars"})
    names = {p.relative_to(TF).as_posix() for p in files}
    expected = {
        "versions.tf",
        "providers.tf",
        "variables.tf",
        "kms.tf",
        "s3.tf",
        "replication.tf",
        "iam.tf",
        "route53.tf",
        "sns.tf",
        "cloudwatch.tf",
        "backup.tf",
        "outputs.tf",
        "environments/production.tfvars",
        "environments/staging.tfvars",
    }
    assert expected <= names
    for path in files:
        assert isinstance(parse(path), dict), path


def test_two_aliased_providers_and_every_block_names_one() -> None:
    cfg = root()
    aws = [p for p in cfg.providers if p["name"] == "aws"]
    assert {p.get("alias") for p in aws} == {"primary", "dr"}, "exactly two aliased AWS providers, no default"
    regions = {p["alias"]: p["region"] for p in aws}
    assert regions == {"primary": "${var.primary_region}", "dr": "${var.dr_region}"}

    for (rtype, name), body in {**cfg.resources, **cfg.data}.items():
        assert body.get("provider") in {PRIMARY, DR}, f"{rtype}.{name} must name aws.primary or aws.dr"
    for name, body in cfg.modules.items():
        assert body.get("providers", {}).get("aws") in {PRIMARY, DR}, f"module {name} must pass a provider"

    required = one(parse(TF / "versions.tf")["terraform"])
    assert "required_version" in required
    assert one(required["required_providers"])["aws"]["source"] == "hashicorp/aws"


def test_every_variable_and_output_is_described_and_every_variable_used() -> None:
    for cfg in (root(), bucket_module(), alarms_module()):
        for name, body in cfg.variables.items():
            assert str(body.get("description", "")).strip(), f"variable {name} in {cfg.directory} lacks a description"
            assert "type" in body, f"variable {name} in {cfg.directory} lacks a type"
        for name, body in cfg.outputs.items():
            assert str(body.get("description", "")).strip(), f"output {name} in {cfg.directory} lacks a description"
        code = "\n".join(p.read_text(encoding="utf-8") for p in cfg.files if p.name != "variables.tf")
        unused = [name for name in cfg.variables if not re.search(rf"\bvar\.{name}\b", code)]
        assert not unused, f"unused variables in {cfg.directory}: {unused}"


def test_variables_with_constrained_values_are_validated() -> None:
    variables = root().variables
    must_validate = [
        "environment",
        "primary_region",
        "dr_region",
        "repository_prefix",
        "transition_to_ia_days",
        "glacier_storage_class",
        "backup_expiration_days",
        "object_lock_mode",
        "route53_zone_id",
        "route53_domain",
        "primary_load_balancer_arn",
        "dr_load_balancer_arn",
        "alert_subscriptions",
        "health_check_request_interval",
        "pitr_retention_days",
        "rds_instance_arns",
    ]
    for name in must_validate:
        assert variables[name].get("validation"), f"variable {name} needs a validation block"
    assert len([v for v in variables.values() if v.get("validation")]) >= 40


# --------------------------------------------------------------------------------------------------
# S3: two buckets, hardening, lifecycle, Object Lock, logging
# --------------------------------------------------------------------------------------------------


def test_backup_buckets_in_two_regions_with_their_own_keys() -> None:
    cfg = root()
    buckets = {n: m for n, m in cfg.modules.items() if m["source"] == "./modules/backup_bucket"}
    assert set(buckets) == {"primary_bucket", "dr_bucket"}
    assert buckets["primary_bucket"]["providers"]["aws"] == PRIMARY
    assert buckets["dr_bucket"]["providers"]["aws"] == DR
    assert buckets["primary_bucket"]["kms_key_arn"] == "${aws_kms_key.backup.arn}"
    assert buckets["dr_bucket"]["kms_key_arn"] == "${aws_kms_replica_key.backup_dr.arn}"
    assert "${var.primary_region}" in cfg.locals["primary_bucket_name"]
    assert "${var.dr_region}" in cfg.locals["dr_bucket_name"]

    key = cfg.resource("aws_kms_key", "backup")
    assert key["provider"] == PRIMARY
    assert key["multi_region"] is True, "the DR region must be able to unwrap data keys wrapped in the primary"
    assert key["enable_key_rotation"] is True
    replica = cfg.resource("aws_kms_replica_key", "backup_dr")
    assert replica["provider"] == DR
    assert replica["primary_key_arn"] == "${aws_kms_key.backup.arn}"
    for name, body in cfg.of_type("aws_kms_key").items():
        assert body["enable_key_rotation"] is True, name
        assert "policy" in body, f"KMS key {name} needs an explicit key policy"


def test_bucket_module_hardening() -> None:
    mod = bucket_module()
    versioning = mod.resource("aws_s3_bucket_versioning", "this")
    assert one(versioning["versioning_configuration"])["status"] == "Enabled"

    sse_rule = one(mod.resource("aws_s3_bucket_server_side_encryption_configuration", "this")["rule"])
    default = one(sse_rule["apply_server_side_encryption_by_default"])
    assert default == {"sse_algorithm": "aws:kms", "kms_master_key_id": "${var.kms_key_arn}"}
    assert sse_rule["bucket_key_enabled"] is True

    for name in ("this", "logs"):
        pab = mod.resource("aws_s3_bucket_public_access_block", name)
        for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
            assert pab[flag] is True, f"{name}: {flag}"
        ownership = one(mod.resource("aws_s3_bucket_ownership_controls", name)["rule"])
        assert ownership["object_ownership"] == "BucketOwnerEnforced"

    # TLS only: a Deny of every request without aws:SecureTransport, and of TLS < 1.2.
    policy = mod.data[("aws_iam_policy_document", "this")]
    denies = {s["sid"]: s for s in statements(policy) if s["effect"] == "Deny"}
    insecure = conditions(denies["DenyInsecureTransport"])["aws:SecureTransport"]
    assert insecure["test"] == "Bool"
    assert insecure["values"] == ["false"]
    tls = conditions(denies["DenyOutdatedTls"])["s3:TlsVersion"]
    assert tls["test"] == "NumericLessThan"
    assert tls["values"] == ["1.2"]
    assert mod.resource("aws_s3_bucket_policy", "this")["policy"] == "${data.aws_iam_policy_document.this.json}"

    logging = mod.resource("aws_s3_bucket_logging", "this")
    assert logging["bucket"] == "${aws_s3_bucket.this.id}"
    assert logging["target_bucket"] == "${aws_s3_bucket.logs.id}"


def test_optional_object_lock() -> None:
    mod = bucket_module()
    assert mod.resource("aws_s3_bucket", "this")["object_lock_enabled"] == "${local.object_lock_on}"
    assert mod.locals["object_lock_on"] == "${var.object_lock_mode != null}"
    lock = mod.resource("aws_s3_bucket_object_lock_configuration", "this")
    assert lock["count"] == "${local.object_lock_on ? 1 : 0}"
    retention = one(one(lock["rule"])["default_retention"])
    assert retention == {"mode": "${var.object_lock_mode}", "days": "${var.object_lock_retention_days}"}

    mode = root().variables["object_lock_mode"]
    assert mode["default"] is None
    condition = one(mode["validation"])["condition"]
    assert '"GOVERNANCE"' in condition
    assert '"COMPLIANCE"' in condition
    for name in ("primary_bucket", "dr_bucket"):
        assert root().modules[name]["object_lock_mode"] == "${var.object_lock_mode}"


def test_lifecycle_expiry_matches_the_variable() -> None:
    mod = bucket_module()
    rules = {r["id"]: r for r in mod.resource("aws_s3_bucket_lifecycle_configuration", "this")["rule"]}
    assert set(rules) == {"expire-backups", "tier-backups", "housekeeping"}
    for rule in rules.values():
        assert rule["status"] == "Enabled"

    expire = rules["expire-backups"]
    assert one(expire["expiration"]) == {"days": "${var.expiration_days}"}
    assert one(expire["filter"]) == {"prefix": "${local.backups_prefix}"}
    assert mod.locals["backups_prefix"] == "${var.repository_prefix}/backups/"

    tier = rules["tier-backups"]
    assert [t["storage_class"] for t in tier["transition"]] == ["STANDARD_IA", "${var.glacier_storage_class}"]
    assert [t["days"] for t in tier["transition"]] == [
        "${var.transition_to_ia_days}",
        "${var.transition_to_glacier_days}",
    ]

    housekeeping = rules["housekeeping"]
    assert one(housekeeping["abort_incomplete_multipart_upload"]) == {
        "days_after_initiation": "${var.abort_incomplete_multipart_upload_days}"
    }
    assert one(housekeeping["noncurrent_version_expiration"]) == {
        "noncurrent_days": "${var.noncurrent_version_expiration_days}"
    }
    assert one(housekeeping["expiration"]) == {"expired_object_delete_marker": True}

    # Both buckets get the same root variable, whose default is the seed's seven years.
    for name in ("primary_bucket", "dr_bucket"):
        module = root().modules[name]
        assert module["expiration_days"] == "${var.backup_expiration_days}"
        assert module["transition_to_glacier_days"] == "${var.transition_to_glacier_days}"
        assert module["abort_incomplete_multipart_upload_days"] == "${var.abort_incomplete_multipart_upload_days}"
    seven_years = 7 * 365 + 2  # two leap days in any seven consecutive years
    assert root().variables["backup_expiration_days"]["default"] == seven_years
    assert load_tfvars("production")["backup_expiration_days"] == seven_years
    assert 1 <= root().variables["abort_incomplete_multipart_upload_days"]["default"] <= 7


# --------------------------------------------------------------------------------------------------
# Replication
# --------------------------------------------------------------------------------------------------


def test_replication_primary_to_dr() -> None:
    cfg = root()
    replication = cfg.modules["primary_bucket"]["replication"]
    assert replication["destination_bucket_arn"] == "${module.dr_bucket.bucket_arn}"
    assert replication["destination_versioning"] == "${module.dr_bucket.versioning_status}"
    assert replication["replica_kms_key_arn"] == "${aws_kms_replica_key.backup_dr.arn}"
    assert replication["role_arn"] == "${aws_iam_role.replication.arn}"
    assert replication["replicate_delete_markers"] == "${var.replicate_delete_markers}"
    assert cfg.modules["dr_bucket"]["replication"] is None, "replication is one-way, primary -> DR"
    assert cfg.variables["replicate_delete_markers"]["default"] is False

    config = bucket_module().resource("aws_s3_bucket_replication_configuration", "this")
    assert config["count"] == "${var.replication == null ? 0 : 1}"
    assert config["bucket"] == "${aws_s3_bucket.this.id}"
    rule = one(config["rule"])
    assert rule["status"] == "Enabled"
    assert one(rule["filter"]) == {"prefix": "${var.repository_prefix}/"}
    assert one(rule["delete_marker_replication"])["status"] == (
        '${var.replication.replicate_delete_markers ? "Enabled" : "Disabled"}'
    )
    criteria = one(one(rule["source_selection_criteria"])["sse_kms_encrypted_objects"])
    assert criteria["status"] == "Enabled"
    destination = one(rule["destination"])
    assert destination["bucket"] == "${var.replication.destination_bucket_arn}"
    assert one(destination["encryption_configuration"]) == {
        "replica_kms_key_id": "${var.replication.replica_kms_key_arn}"
    }

    role = cfg.resource("aws_iam_role", "replication")
    assert role["assume_role_policy"] == "${data.aws_iam_policy_document.replication_assume.json}"
    policy = {s["sid"]: s for s in statements(cfg.data[("aws_iam_policy_document", "replication")])}
    assert policy["WriteReplicasToDr"]["resources"] == ["${module.dr_bucket.bucket_arn}/${local.repository_prefix}/*"]
    assert conditions(policy["DecryptSourceObjects"])["kms:ViaService"]["values"] == [
        "s3.${var.primary_region}.amazonaws.com"
    ]
    assert conditions(policy["EncryptReplicas"])["kms:ViaService"]["values"] == ["s3.${var.dr_region}.amazonaws.com"]
    for statement in policy.values():
        assert not any("*" in a for a in statement["actions"]), statement["sid"]
        assert "*" not in as_list(statement["resources"]), statement["sid"]


# --------------------------------------------------------------------------------------------------
# The agent's IAM policy
# --------------------------------------------------------------------------------------------------


def agent_statements() -> list[dict[str, Any]]:
    return list(statements(root().data[("aws_iam_policy_document", "agent")]))


def test_agent_policy_grants_exactly_what_the_agent_calls() -> None:
    granted = {action for s in agent_statements() for action in s["actions"]}
    assert granted == AGENT_ACTIONS
    assert all(s["effect"] == "Allow" for s in agent_statements())
    cfg = root()
    assert cfg.resource("aws_iam_policy", "agent")["policy"] == "${data.aws_iam_policy_document.agent.json}"
    attachment = cfg.resource("aws_iam_role_policy_attachment", "agent")
    assert attachment["role"] == "${aws_iam_role.agent.name}"
    assert attachment["policy_arn"] == "${aws_iam_policy.agent.arn}"
    assert cfg.resource("aws_iam_instance_profile", "agent")["role"] == "${aws_iam_role.agent.name}"


def test_agent_policy_has_no_wildcard_where_a_narrower_one_works() -> None:
    for statement in agent_statements():
        sid = statement["sid"]
        for action in statement["actions"]:
            assert "*" not in action, f"{sid}: wildcard action {action}"
        resources = as_list(statement["resources"])
        if "*" in resources:
            assert sid in STAR_RESOURCE_STATEMENTS, f"{sid}: Resource '*' where a narrower one works"
            assert resources == ["*"]
            assert STAR_RESOURCE_STATEMENTS[sid] in conditions(statement), f"{sid}: '*' must be narrowed"
            continue
        for resource in resources:
            if "*" not in resource:
                continue
            # Globs only below the repository prefix, or over Route53 change IDs (unknowable in advance).
            scoped = resource.endswith("/${local.repository_prefix}/*") or resource.endswith(
                "/${local.repository_prefix}/backups/*"
            )
            assert scoped or resource == "arn:${local.partition}:route53:::change/*", f"{sid}: {resource}"

    by_sid = {s["sid"]: s for s in agent_statements()}
    assert conditions(by_sid["PublishAgentMetrics"])["cloudwatch:namespace"]["values"] == ["${var.metrics_namespace}"]
    assert root().variables["metrics_namespace"]["default"] == "KybdrAgent"
    assert conditions(by_sid["ResolveLoadBalancerAliasTargets"])["aws:RequestedRegion"]["values"] == [
        "${var.primary_region}",
        "${var.dr_region}",
    ]


def test_agent_policy_scopes_s3_kms_route53_and_sns() -> None:
    by_sid = {s["sid"]: s for s in agent_statements()}
    buckets = "${local.repository_bucket_arns}"

    listing = by_sid["ListRepositoryPrefix"]
    assert listing["resources"] == buckets
    assert conditions(listing)["s3:prefix"]["values"] == ["${local.repository_prefix}", "${local.repository_prefix}/*"]
    assert root().locals["repository_bucket_arns"] == [
        "${module.primary_bucket.bucket_arn}",
        "${module.dr_bucket.bucket_arn}",
    ]

    # Deleting is for retention (backups) and the DR lease, never the audit trail or DR history.
    deletes = by_sid["DeleteBackupsAndReleaseLease"]["resources"]
    assert deletes == [
        "${module.primary_bucket.bucket_arn}/${local.repository_prefix}/backups/*",
        "${module.dr_bucket.bucket_arn}/${local.repository_prefix}/backups/*",
        "${module.dr_bucket.bucket_arn}/${local.repository_prefix}/dr/lease",
    ]

    assert by_sid["UseBackupKeys"]["resources"] == ["${aws_kms_key.backup.arn}", "${aws_kms_replica_key.backup_dr.arn}"]
    assert "kms:ViaService" in conditions(by_sid["UseAlertTopicKeysThroughSns"])
    assert by_sid["PublishAlerts"]["resources"] == ["${aws_sns_topic.alerts.arn}", "${aws_sns_topic.alerts_dr.arn}"]

    # Route53: every ChangeResourceRecordSets grant is pinned to record names, types and actions.
    changes = [s for s in agent_statements() if "route53:ChangeResourceRecordSets" in s["actions"]]
    assert {s["sid"] for s in changes} == {"SwitchServiceRecord", "WriteTestFailoverRecord"}
    for statement in changes:
        assert statement["resources"] == ["${local.zone_arn}"]
        keys = conditions(statement)
        for key in ("NormalizedRecordNames", "RecordTypes", "Actions"):
            condition = keys[f"route53:ChangeResourceRecordSets{key}"]
            assert condition["test"] == "ForAllValues:StringEquals"
    switch = conditions(by_sid["SwitchServiceRecord"])
    assert switch["route53:ChangeResourceRecordSetsNormalizedRecordNames"]["values"] == [
        "${local.switched_record_name}"
    ]
    assert switch["route53:ChangeResourceRecordSetsActions"]["values"] == ["UPSERT"]
    assert root().locals["switched_record_name"] == '${lower(trimsuffix(var.route53_domain, "."))}'
    assert root().locals["zone_arn"] == "arn:${local.partition}:route53:::hostedzone/${var.route53_zone_id}"


def split_comment(line: str) -> tuple[str, str]:
    """Split an HCL line into code and trailing '#' comment, ignoring '#' inside strings."""
    in_string = False
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            in_string = not in_string
        elif char == "#" and not in_string:
            return line[:index], line[index + 1 :].strip()
    return line, ""


def test_every_wildcard_in_the_configuration_carries_a_comment() -> None:
    """A string ending in '*' (an action, resource, principal or prefix glob) must say why."""
    offenders = []
    for path in sorted(TF.rglob("*.tf")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            code, comment = split_comment(line)
            if '*"' not in code:
                continue
            previous_code, previous_comment = split_comment(lines[number - 2]) if number > 1 else ("", "")
            if not comment and not (previous_comment and not previous_code.strip()):
                offenders.append(f"{path.relative_to(TF)}:{number}: {line.strip()}")
    assert not offenders, "wildcards without a comment:\n" + "\n".join(offenders)
    assert split_comment('  x = ["*"] # why') == ('  x = ["*"] ', "why")
    assert split_comment('  x = "a#b"') == ('  x = "a#b"', "")


# --------------------------------------------------------------------------------------------------
# Route53, SNS, CloudWatch
# --------------------------------------------------------------------------------------------------


def test_route53_health_checks_failover_records_and_switched_record() -> None:
    cfg = root()
    checks = cfg.of_type("aws_route53_health_check")
    assert set(checks) == {"primary", "dr"}
    assert checks["primary"]["fqdn"] == "${local.primary_health_check_fqdn}"
    assert checks["dr"]["fqdn"] == "${local.dr_health_check_fqdn}"
    for check in checks.values():
        assert check["resource_path"] == "${var.health_check_path}"
        assert check["failure_threshold"] == "${var.health_check_failure_threshold}"

    for name, kind, side in (("failover_primary", "PRIMARY", "primary"), ("failover_secondary", "SECONDARY", "dr")):
        record = cfg.resource("aws_route53_record", name)
        assert one(record["failover_routing_policy"])["type"] == kind
        assert record["health_check_id"] == f"${{aws_route53_health_check.{side}.id}}"
        alias = one(record["alias"])
        assert alias["name"] == f"${{data.aws_lb.{side}.dns_name}}"
        assert alias["zone_id"] == f"${{data.aws_lb.{side}.zone_id}}"
        assert record["zone_id"] == "${var.route53_zone_id}"
    assert cfg.data[("aws_lb", "primary")]["arn"] == "${var.primary_load_balancer_arn}"
    assert cfg.data[("aws_lb", "dr")]["arn"] == "${var.dr_load_balancer_arn}"
    assert cfg.data[("aws_lb", "dr")]["provider"] == DR

    switched = cfg.resource("aws_route53_record", "switched")
    assert switched["name"] == "${var.route53_domain}"
    assert switched["type"] == "A"
    assert one(switched["lifecycle"])["ignore_changes"] == ["alias"], "the agent owns the target after creation"


def test_alert_topics_are_encrypted_with_subscriptions_from_a_variable() -> None:
    cfg = root()
    topics = cfg.of_type("aws_sns_topic")
    assert {n: t["provider"] for n, t in topics.items()} == {"alerts": PRIMARY, "alerts_dr": DR}
    assert topics["alerts"]["kms_master_key_id"] == "${aws_kms_key.alerts.arn}"
    assert topics["alerts_dr"]["kms_master_key_id"] == "${aws_kms_key.alerts_dr.arn}"
    assert cfg.resource("aws_kms_key", "alerts_dr")["provider"] == DR
    for name in ("alerts", "alerts_dr"):
        assert cfg.resource("aws_sns_topic_subscription", name)["for_each"] == "${local.alert_subscriptions}"
        assert cfg.resource("aws_sns_topic_policy", name)["arn"] == f"${{aws_sns_topic.{name}.arn}}"
    assert "var.alert_subscriptions" in cfg.locals["alert_subscriptions"]


def test_alarms_on_the_agents_metrics_in_both_regions() -> None:
    cfg = root()
    alarms = {n: m for n, m in cfg.modules.items() if m["source"] == "./modules/agent_alarms"}
    assert {n: (m["providers"]["aws"], m["alarm_topic_arn"]) for n, m in alarms.items()} == {
        "alarms_primary": (PRIMARY, "${aws_sns_topic.alerts.arn}"),
        "alarms_dr": (DR, "${aws_sns_topic.alerts_dr.arn}"),
    }
    for module in alarms.values():
        assert module["metrics_namespace"] == "${var.metrics_namespace}"

    mod = alarms_module()
    assert mod.locals["actions"] == ["${var.alarm_topic_arn}"]
    expressions = {}
    for name, alarm in mod.of_type("aws_cloudwatch_metric_alarm").items():
        assert alarm["alarm_actions"] == "${local.actions}", name
        assert alarm["actions_enabled"] is True, name
        query = one(alarm["metric_query"])
        assert query["return_data"] is True
        expressions[name] = query["expression"]
    # Backup failures, backup age, DR health and failovers -- the four -- plus the seed's targets.
    wanted = {
        "backup_failures": "SUM(BackupFailures)",
        "backup_age": "MAX(BackupAgeSeconds)",
        "dr_primary_unhealthy": "MIN(DRPrimaryHealthy)",
        "dr_failover": "SUM(DRFailovers)",
        "backup_duration": "MAX(BackupDurationSeconds)",
        "restore_drill": "MAX(RestoreDrillSeconds)",
    }
    for name, fragment in wanted.items():
        assert expressions[name] == f"SELECT {fragment} FROM ${{local.namespace}}", name
    age = mod.resource("aws_cloudwatch_metric_alarm", "backup_age")
    assert age["threshold"] == "${var.backup_max_age_seconds}"
    assert age["treat_missing_data"] == "breaching", "an agent that stops reporting must raise the age alarm"


def test_three_dashboards_cover_every_agent_metric() -> None:
    cfg = root()
    dashboards = cfg.of_type("aws_cloudwatch_dashboard")
    assert {n: d["dashboard_name"] for n, d in dashboards.items()} == {
        "backup": "${local.name}-backup",
        "dr_health": "${local.name}-dr-health",
        "performance": "${local.name}-performance",
    }
    bodies = {
        "backup": json.dumps(cfg.locals["backup_dashboard"]),
        "dr_health": json.dumps(cfg.locals["dr_dashboard"]),
        "performance": json.dumps(cfg.locals["performance_dashboard"]),
    }
    for name, local in (("backup", "backup"), ("dr_health", "dr"), ("performance", "performance")):
        assert dashboards[name]["dashboard_body"] == f"${{jsonencode(local.{local}_dashboard)}}"
    wanted = {
        "backup": ["BackupSucceeded", "BackupFailures", "BackupAgeSeconds", "BackupStoredBytes", "BucketSizeBytes"],
        "dr_health": ["DRPrimaryHealthy", "DRFailovers", "HealthCheckStatus"],
        "performance": ["BackupDurationSeconds", "RestoreDrillSeconds", "TimeToFirstByte"],
    }
    for name, metrics in wanted.items():
        for metric in metrics:
            assert metric in bodies[name], f"{name} dashboard lacks {metric}"
    everything = " ".join(bodies.values())
    assert all(metric in everything for metric in AGENT_METRICS)


# --------------------------------------------------------------------------------------------------
# AWS Backup and RDS
# --------------------------------------------------------------------------------------------------


def test_aws_backup_vaults_plan_and_rds_pitr() -> None:
    cfg = root()
    vaults = cfg.of_type("aws_backup_vault")
    assert {n: (v["provider"], v["kms_key_arn"]) for n, v in vaults.items()} == {
        "primary": (PRIMARY, "${aws_kms_key.backup.arn}"),
        "dr": (DR, "${aws_kms_replica_key.backup_dr.arn}"),
    }
    rules = {r["rule_name"]: r for r in cfg.resource("aws_backup_plan", "rds")["rule"]}
    pitr = rules["continuous-pitr-daily"]
    assert pitr["enable_continuous_backup"] is True
    assert one(pitr["lifecycle"])["delete_after"] == "${var.pitr_retention_days}"
    for rule in rules.values():
        assert one(rule["copy_action"])["destination_vault_arn"] == "${aws_backup_vault.dr[0].arn}"
    selection = cfg.resource("aws_backup_selection", "rds")
    assert selection["resources"] == "${var.rds_instance_arns}"

    replication = cfg.resource("aws_db_instance_automated_backups_replication", "dr")
    assert replication["provider"] == DR
    assert replication["kms_key_id"] == "${aws_kms_replica_key.backup_dr.arn}"
    assert replication["retention_period"] == "${var.rds_replicated_backup_retention_days}"
    assert replication["source_db_instance_arn"] == "${each.value}"


# --------------------------------------------------------------------------------------------------
# Outputs and example variable files
# --------------------------------------------------------------------------------------------------


def test_outputs_map_one_to_one_onto_agent_config_fields() -> None:
    outputs = root().outputs
    for field, name in CONFIG_OUTPUTS.items():
        assert name == field.replace(".", "_"), "outputs are named <section>_<field>"
        assert name in outputs, f"no output for {field}"
        assert outputs[name]["description"].startswith(f"Agent config {field}"), name
    config_outputs = {n for n, o in outputs.items() if o["description"].startswith("Agent config ")}
    assert config_outputs == set(CONFIG_OUTPUTS.values()), "one output per field, and only those"

    for aggregate in ("agent_config", "dr_region_agent_config"):
        assert set(outputs[aggregate]["value"]) == set(CONFIG_OUTPUTS), aggregate
    per_field = {field: outputs[name]["value"] for field, name in CONFIG_OUTPUTS.items()}
    assert outputs["agent_config"]["value"] == per_field, "agent_config must repeat the per-field outputs"

    assert per_field["repository.url"] == "s3://${module.primary_bucket.bucket_id}/${local.repository_prefix}"
    assert per_field["backup.cross_region_bucket"] == "${module.dr_bucket.bucket_id}"
    assert per_field["encryption.kms_key_id"] == "${aws_kms_key.backup.arn}"
    assert per_field["notify.sns_topic_arn"] == "${aws_sns_topic.alerts.arn}"
    assert per_field["dr.route53_domain"] == "${local.switched_record_name}"
    dr_side = outputs["dr_region_agent_config"]["value"]
    assert dr_side["repository.url"] == "s3://${module.dr_bucket.bucket_id}/${local.repository_prefix}"
    assert dr_side["encryption.kms_key_id"] == "${aws_kms_replica_key.backup_dr.arn}"
    assert dr_side["notify.sns_topic_arn"] == "${aws_sns_topic.alerts_dr.arn}"


_REGEX = re.compile(r'^\$\{(?:var\.(\w+) == null \|\| )?can\(regex\("(.*)", var\.(\w+)\)\)\}$')
_LIST_REGEX = re.compile(r'^\$\{alltrue\(\[for (\w+) in var\.(\w+) : can\(regex\("(.*)", \1\)\)\]\)\}$')
_CONTAINS = re.compile(r"^\$\{(?:var\.(\w+) == null \? true : )?contains\(\[(.*)\], var\.(\w+)\)\}$")
_COMPARISON = re.compile(r"^var\.(\w+) (>=|<=|>|<) (\d+)$")
_WHOLE = re.compile(r"^floor\(var\.(\w+)\) == var\.(\w+)$")


def check_validation(condition: str, name: str, value: Any) -> bool | None:
    """Evaluate the common validation shapes used in variables.tf; None when the shape is not known."""
    if match := _REGEX.match(condition):
        if match[1] and value is None:
            return True
        return re.search(unescape(match[2]), value) is not None
    if match := _LIST_REGEX.match(condition):
        return all(re.search(unescape(match[3]), item) for item in value)
    if match := _CONTAINS.match(condition):
        if match[1] and value is None:
            return True
        return value in json.loads(f"[{match[2]}]")
    inner = condition.removeprefix("${").removesuffix("}")
    parts = inner.split(" && ")
    results = []
    for part in parts:
        if match := _COMPARISON.match(part):
            bound = int(match[3])
            results.append(
                {">=": value >= bound, "<=": value <= bound, ">": value > bound, "<": value < bound}[match[2]]
            )
        elif _WHOLE.match(part):
            results.append(float(value).is_integer())
        else:
            return None
    return all(results)


@pytest.mark.parametrize("environment", ["production", "staging"])
def test_example_tfvars_set_every_required_variable_and_pass_validation(environment: str) -> None:
    variables = root().variables
    values = load_tfvars(environment)
    assert values["environment"] == environment
    unknown = set(values) - set(variables)
    assert not unknown, f"{environment}.tfvars sets undeclared variables: {unknown}"
    missing = {n for n, v in variables.items() if "default" not in v} - set(values)
    assert not missing, f"{environment}.tfvars misses required variables: {missing}"

    checked = 0
    for name, value in values.items():
        for validation in variables[name].get("validation", []):
            verdict = check_validation(validation["condition"], name, value)
            if verdict is None:
                continue
            checked += 1
            assert verdict, f"{environment}.tfvars: {name} = {value!r} fails: {validation['error_message']}"
    assert checked >= 15, "the validation checker recognised too few conditions to mean anything"

    # The preconditions that relate two variables.
    merged: dict[str, Any] = {n: v.get("default") for n, v in variables.items()} | values
    assert merged["primary_region"] != merged["dr_region"]
    assert merged["transition_to_glacier_days"] >= merged["transition_to_ia_days"] + 30
    for arn in merged["rds_instance_arns"]:
        assert arn.split(":")[3] == merged["primary_region"], arn
    assert f":{merged['primary_region']}:" in merged["primary_load_balancer_arn"]
    assert f":{merged['dr_region']}:" in merged["dr_load_balancer_arn"]


def test_validation_checker_rejects_bad_values() -> None:
    """The tfvars test above means something only if the checker can say no."""
    variables = root().variables

    def verdict(name: str, value: Any) -> bool | None:
        return check_validation(one(variables[name]["validation"])["condition"], name, value)

    assert verdict("primary_region", "eu-central-1") is True
    assert verdict("primary_region", "Frankfurt") is False
    assert verdict("glacier_storage_class", "STANDARD") is False
    assert verdict("object_lock_mode", None) is True
    assert verdict("object_lock_mode", "LEGAL") is False
    assert verdict("transition_to_ia_days", 29) is False
    assert verdict("transition_to_ia_days", 30.5) is False
    assert verdict("route53_domain", "db.example.com") is True
    assert verdict("route53_domain", "not a name") is False
    assert verdict("rds_instance_arns", ["arn:aws:rds:us-west-2:123456789012:db:kyb"]) is True
    assert verdict("rds_instance_arns", ["arn:aws:rds:us-west-2:123456789012:cluster:kyb"]) is False


# --------------------------------------------------------------------------------------------------
# checkov
# --------------------------------------------------------------------------------------------------

_SKIP = re.compile(r"#checkov:skip=(CKV2?_AWS_\d+):(.*)$")


def inline_skips(path: Path) -> list[tuple[str, str]]:
    return [(m[1], m[2].strip()) for line in path.read_text(encoding="utf-8").splitlines() if (m := _SKIP.search(line))]


def test_every_inline_checkov_skip_gives_a_reason() -> None:
    skips = [skip for path in sorted(TF.rglob("*.tf")) for skip in inline_skips(path)]
    assert skips, "expected the documented skips (see terraform/README.md)"
    for check, reason in skips:
        assert len(reason) >= 30, f"{check}: the reason must explain why the check does not apply"
    readme = (TF / "README.md").read_text(encoding="utf-8")
    for check, _ in skips:
        assert check in readme, f"{check} is skipped inline but not explained in terraform/README.md"


def checkov_binary() -> Path:
    binary = Path(os.environ.get("KYBDR_CHECKOV") or REPO / ".tools" / "checkov" / "bin" / "checkov")
    if not binary.is_file():
        message = f"checkov not found at {binary}; run scripts/bootstrap --tools (scripts/test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def test_checkov_reports_no_failed_check() -> None:
    binary = checkov_binary()
    command = [
        str(binary),
        *("-d", "terraform", "--framework", "terraform"),
        *("--compact", "--quiet", "--skip-download", "-o", "json"),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode in {0, 1}, f"checkov crashed ({result.returncode}):\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    terraform = [r for r in reports if r.get("check_type") == "terraform"]
    assert len(terraform) == 1, result.stdout[:2000]
    summary = terraform[0]["summary"]
    failed = terraform[0]["results"].get("failed_checks", [])
    described = [f"{c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range']})" for c in failed]
    assert summary["failed"] == 0, "checkov failed checks:\n" + "\n".join(described)
    assert result.returncode == 0
    assert summary["parsing_errors"] == 0
    assert summary["passed"] >= 200, summary

    # Every skip is one of ours: root skips count once, bucket-module skips once per bucket module.
    bucket_modules = sum(1 for m in root().modules.values() if m["source"] == "./modules/backup_bucket")
    expected = sum(len(inline_skips(p)) for p in TF.glob("*.tf"))
    expected += bucket_modules * sum(len(inline_skips(p)) for p in BUCKET_MODULE.glob("*.tf"))
    expected += sum(len(inline_skips(p)) for p in ALARMS_MODULE.glob("*.tf"))
    assert summary["skipped"] == expected, summary
