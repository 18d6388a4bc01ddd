# Outputs.
#
# The first group maps one to one onto the agent's configuration: each output is named
# <section>_<field> after the TOML field it feeds (section.field) and holds the value for an agent
# running in the primary region. `terraform output -json agent_config` gives all of them at once, keyed
# by "section.field"; `dr_region_agent_config` gives the same fields for agents running in the DR region.
#
# The second group is infrastructure the platform team needs (role, instance profile, ARNs) but that
# no agent config field takes.

# --------------------------------------------------------------------------------------------------
# Agent configuration fields
# --------------------------------------------------------------------------------------------------

output "repository_url" {
  description = "Agent config repository.url: the primary backup bucket and key prefix, s3://<bucket>/<prefix>."
  value       = "s3://${module.primary_bucket.bucket_id}/${local.repository_prefix}"
}

output "repository_region" {
  description = "Agent config repository.region: region of the repository bucket."
  value       = var.primary_region
}

output "backup_cross_region_bucket" {
  description = "Agent config backup.cross_region_bucket: the DR-region bucket the agent copies backups to (the same prefix is used there)."
  value       = module.dr_bucket.bucket_id
}

output "encryption_key_provider" {
  description = "Agent config encryption.key_provider: \"kms\", so each backup's data key comes from KMS (GenerateDataKey) and no key file is needed."
  value       = "kms"
}

output "encryption_kms_key_id" {
  description = "Agent config encryption.kms_key_id: ARN of the multi-Region KMS key that wraps each backup's data key (its DR replica has the same key ID)."
  value       = aws_kms_key.backup.arn
}

output "dr_primary_region" {
  description = "Agent config dr.primary_region."
  value       = var.primary_region
}

output "dr_dr_region" {
  description = "Agent config dr.dr_region."
  value       = var.dr_region
}

output "dr_health_check_url" {
  description = "Agent config dr.health_check_url: the primary endpoint's health URL, the same one the Route53 primary health check probes."
  value       = local.health_check_url
}

output "dr_route53_zone_id" {
  description = "Agent config dr.route53_zone_id: hosted zone of the switched record."
  value       = var.route53_zone_id
}

output "dr_route53_domain" {
  description = "Agent config dr.route53_domain: the record the agent switches on failover and failback (its IAM policy allows changing only this record and the test record)."
  value       = local.switched_record_name
}

output "dr_load_balancer_arn" {
  description = "Agent config dr.load_balancer_arn: the primary region's load balancer."
  value       = var.primary_load_balancer_arn
}

output "dr_dr_load_balancer_arn" {
  description = "Agent config dr.dr_load_balancer_arn: the DR region's load balancer."
  value       = var.dr_load_balancer_arn
}

output "notify_sns_topic_arn" {
  description = "Agent config notify.sns_topic_arn: the encrypted alert topic in the primary region."
  value       = aws_sns_topic.alerts.arn
}

output "agent_config" {
  description = "All agent config fields above for agents in the primary region, keyed by section.field."
  value = {
    "repository.url"             = "s3://${module.primary_bucket.bucket_id}/${local.repository_prefix}"
    "repository.region"          = var.primary_region
    "backup.cross_region_bucket" = module.dr_bucket.bucket_id
    "encryption.key_provider"    = "kms"
    "encryption.kms_key_id"      = aws_kms_key.backup.arn
    "dr.primary_region"          = var.primary_region
    "dr.dr_region"               = var.dr_region
    "dr.health_check_url"        = local.health_check_url
    "dr.route53_zone_id"         = var.route53_zone_id
    "dr.route53_domain"          = local.switched_record_name
    "dr.load_balancer_arn"       = var.primary_load_balancer_arn
    "dr.dr_load_balancer_arn"    = var.dr_load_balancer_arn
    "notify.sns_topic_arn"       = aws_sns_topic.alerts.arn
  }
}

output "dr_region_agent_config" {
  description = "The same fields for agents running in the DR region (the standby's host, or every agent after a failover): the DR bucket as repository, the DR replica of the key, the DR topic, and the primary bucket as the cross-region copy target."
  value = {
    "repository.url"             = "s3://${module.dr_bucket.bucket_id}/${local.repository_prefix}"
    "repository.region"          = var.dr_region
    "backup.cross_region_bucket" = module.primary_bucket.bucket_id
    "encryption.key_provider"    = "kms"
    "encryption.kms_key_id"      = aws_kms_replica_key.backup_dr.arn
    "dr.primary_region"          = var.primary_region
    "dr.dr_region"               = var.dr_region
    "dr.health_check_url"        = local.health_check_url
    "dr.route53_zone_id"         = var.route53_zone_id
    "dr.route53_domain"          = local.switched_record_name
    "dr.load_balancer_arn"       = var.primary_load_balancer_arn
    "dr.dr_load_balancer_arn"    = var.dr_load_balancer_arn
    "notify.sns_topic_arn"       = aws_sns_topic.alerts_dr.arn
  }
}

# --------------------------------------------------------------------------------------------------
# Infrastructure (no agent config field)
# --------------------------------------------------------------------------------------------------

output "agent_role_arn" {
  description = "IAM role the agent runs as."
  value       = aws_iam_role.agent.arn
}

output "agent_instance_profile_name" {
  description = "Instance profile to attach to the PostgreSQL hosts on EC2."
  value       = aws_iam_instance_profile.agent.name
}

output "agent_policy_arn" {
  description = "The agent's least-privilege policy, to attach to another principal if the agent does not run on EC2."
  value       = aws_iam_policy.agent.arn
}

output "primary_bucket_arn" {
  description = "ARN of the primary backup bucket."
  value       = module.primary_bucket.bucket_arn
}

output "dr_bucket_arn" {
  description = "ARN of the DR backup bucket."
  value       = module.dr_bucket.bucket_arn
}

output "dr_kms_key_arn" {
  description = "ARN of the DR-region replica of the backup key."
  value       = aws_kms_replica_key.backup_dr.arn
}

output "dr_region_health_check_url" {
  description = "Health URL of the DR endpoint (what the Route53 DR health check probes)."
  value       = local.dr_health_check_url
}

output "health_check_ids" {
  description = "Route53 health check IDs of the primary and DR endpoints."
  value = {
    primary = aws_route53_health_check.primary.id
    dr      = aws_route53_health_check.dr.id
  }
}

output "dr_alert_topic_arn" {
  description = "Encrypted alert topic in the DR region (notify.sns_topic_arn of agents running there)."
  value       = aws_sns_topic.alerts_dr.arn
}

output "dashboard_names" {
  description = "The three CloudWatch dashboards (primary region)."
  value = [
    aws_cloudwatch_dashboard.backup.dashboard_name,
    aws_cloudwatch_dashboard.dr_health.dashboard_name,
    aws_cloudwatch_dashboard.performance.dashboard_name,
  ]
}

output "aws_backup_vault_arns" {
  description = "AWS Backup vaults (primary and DR), when enable_aws_backup is true."
  value = {
    primary = one(aws_backup_vault.primary[*].arn)
    dr      = one(aws_backup_vault.dr[*].arn)
  }
}
