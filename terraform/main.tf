# Shared lookups and names. The resources live in the file named after their service:
#   kms.tf          customer-managed keys (backup data, alert topics)
#   s3.tf           the two backup buckets (modules/backup_bucket, used once per region)
#   replication.tf  primary -> DR bucket replication
#   iam.tf          the agent's role and least-privilege policy
#   route53.tf      health checks, failover records, the record the agent switches
#   sns.tf          encrypted alert topics and subscriptions
#   cloudwatch.tf   alarms on the agent's metrics (modules/agent_alarms) and the three dashboards
#   backup.tf       AWS Backup vaults and plan, RDS automated backup replication (PITR)
#   outputs.tf      one output per agent config field

data "aws_caller_identity" "current" {
  provider = aws.primary
}

data "aws_partition" "current" {
  provider = aws.primary
}

# The seed's load balancers: looked up so the Route53 records can alias them.
data "aws_lb" "primary" {
  provider = aws.primary
  arn      = var.primary_load_balancer_arn
}

data "aws_lb" "dr" {
  provider = aws.dr
  arn      = var.dr_load_balancer_arn
}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  name       = "${var.project}-${var.environment}"

  tags = merge(
    {
      Project     = var.project
      Environment = var.environment
      ManagedBy   = "terraform"
      Component   = "kybdr-agent-backup-dr"
    },
    var.tags,
  )

  primary_bucket_name = coalesce(var.primary_bucket_name, "${local.name}-backups-${local.account_id}-${var.primary_region}")
  dr_bucket_name      = coalesce(var.dr_bucket_name, "${local.name}-backups-${local.account_id}-${var.dr_region}")

  # Everything the agent writes lives below this prefix; the IAM policy, lifecycle and replication
  # are scoped to it.
  repository_prefix = var.repository_prefix

  # Route53 compares record names in lower case without the trailing dot
  # (route53:ChangeResourceRecordSetsNormalizedRecordNames).
  switched_record_name = lower(trimsuffix(var.route53_domain, "."))
  test_record_name     = "${var.route53_test_record_label}.${local.switched_record_name}"

  primary_health_check_fqdn = coalesce(var.primary_health_check_fqdn, data.aws_lb.primary.dns_name)
  dr_health_check_fqdn      = coalesce(var.dr_health_check_fqdn, data.aws_lb.dr.dns_name)
  default_port              = var.health_check_protocol == "HTTPS" ? 443 : 80
  health_check_port_suffix  = var.health_check_port == local.default_port ? "" : ":${var.health_check_port}"
  health_check_url          = "${lower(var.health_check_protocol)}://${local.primary_health_check_fqdn}${local.health_check_port_suffix}${var.health_check_path}"
  dr_health_check_url       = "${lower(var.health_check_protocol)}://${local.dr_health_check_fqdn}${local.health_check_port_suffix}${var.health_check_path}"
}
