# For teams whose PostgreSQL runs on RDS: AWS Backup (vaults in both regions, a plan with continuous
# backup for point-in-time recovery, daily and monthly snapshots copied to the DR vault) and RDS
# cross-region replication of automated backups, so point-in-time recovery also works in the DR region.
#
# This complements the agent's logical (pg_dump) backups; it does not replace them: a logical backup
# restores into any PostgreSQL, survives the loss of the RDS instance and its snapshots' account, and
# is what the agent's restore drills prove.
#
# Prerequisite on each RDS instance (managed wherever the instance is): automated backups on, that is
# backup_retention_period > 0. The postcondition on data.aws_db_instance.protected stops the plan if not.

locals {
  aws_backup_on = var.enable_aws_backup ? 1 : 0
  rds_instances = toset(var.rds_instance_arns)
}

data "aws_db_instance" "protected" {
  for_each = local.rds_instances
  provider = aws.primary

  # arn:aws:rds:<region>:<account>:db:<identifier>
  db_instance_identifier = element(split(":", each.value), 6)

  lifecycle {
    postcondition {
      condition     = self.backup_retention_period > 0
      error_message = "RDS instance ${each.value} has automated backups off (backup_retention_period = 0): point-in-time recovery and its replication need them on."
    }
  }
}

# --------------------------------------------------------------------------------------------------
# AWS Backup
# --------------------------------------------------------------------------------------------------

resource "aws_backup_vault" "primary" {
  count    = local.aws_backup_on
  provider = aws.primary

  name          = "${local.name}-vault"
  kms_key_arn   = aws_kms_key.backup.arn
  force_destroy = false
}

resource "aws_backup_vault" "dr" {
  count    = local.aws_backup_on
  provider = aws.dr

  name          = "${local.name}-vault"
  kms_key_arn   = aws_kms_replica_key.backup_dr.arn
  force_destroy = false
}

# Vault Lock follows the buckets' Object Lock choice: GOVERNANCE locks the vaults in governance mode
# (removable by privileged users), COMPLIANCE in compliance mode after a 3-day grace period (after
# which nobody, including AWS, can remove the lock or shorten retention).
resource "aws_backup_vault_lock_configuration" "primary" {
  count    = var.enable_aws_backup && var.object_lock_mode != null ? 1 : 0
  provider = aws.primary

  backup_vault_name   = aws_backup_vault.primary[0].name
  min_retention_days  = min(var.pitr_retention_days, var.aws_backup_daily_retention_days)
  max_retention_days  = max(var.aws_backup_monthly_retention_days, var.aws_backup_daily_retention_days)
  changeable_for_days = var.object_lock_mode == "COMPLIANCE" ? 3 : null
}

resource "aws_backup_vault_lock_configuration" "dr" {
  count    = var.enable_aws_backup && var.object_lock_mode != null ? 1 : 0
  provider = aws.dr

  backup_vault_name   = aws_backup_vault.dr[0].name
  min_retention_days  = min(var.pitr_retention_days, var.aws_backup_daily_retention_days)
  max_retention_days  = max(var.aws_backup_monthly_retention_days, var.aws_backup_daily_retention_days)
  changeable_for_days = var.object_lock_mode == "COMPLIANCE" ? 3 : null
}

resource "aws_backup_vault_notifications" "primary" {
  count    = local.aws_backup_on
  provider = aws.primary

  backup_vault_name = aws_backup_vault.primary[0].name
  sns_topic_arn     = aws_sns_topic.alerts.arn
  backup_vault_events = [
    "BACKUP_JOB_FAILED",
    "COPY_JOB_FAILED",
    "RESTORE_JOB_FAILED",
  ]

  depends_on = [aws_sns_topic_policy.alerts]
}

resource "aws_backup_plan" "rds" {
  count    = local.aws_backup_on
  provider = aws.primary

  name = "${local.name}-rds"

  # Continuous backup: point-in-time recovery to any second within the window (AWS allows 35 days),
  # plus a daily snapshot on the schedule, which is what gets copied to the DR vault (continuous
  # recovery points are copied as snapshots).
  rule {
    rule_name                = "continuous-pitr-daily"
    target_vault_name        = aws_backup_vault.primary[0].name
    schedule                 = var.aws_backup_daily_schedule
    enable_continuous_backup = true
    start_window             = 60
    completion_window        = 360

    lifecycle {
      delete_after = var.pitr_retention_days
    }

    copy_action {
      destination_vault_arn = aws_backup_vault.dr[0].arn

      lifecycle {
        delete_after = var.aws_backup_daily_retention_days
      }
    }
  }

  rule {
    rule_name         = "monthly"
    target_vault_name = aws_backup_vault.primary[0].name
    schedule          = "cron(0 4 1 * ? *)"
    start_window      = 60
    completion_window = 720

    lifecycle {
      delete_after = var.aws_backup_monthly_retention_days
    }

    copy_action {
      destination_vault_arn = aws_backup_vault.dr[0].arn

      lifecycle {
        delete_after = var.aws_backup_monthly_retention_days
      }
    }
  }
}

data "aws_iam_policy_document" "aws_backup_assume" {
  provider = aws.primary

  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["backup.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "aws_backup" {
  count    = local.aws_backup_on
  provider = aws.primary

  name                 = "${local.name}-aws-backup"
  description          = "AWS Backup service role for the ${local.name} RDS backup plan"
  assume_role_policy   = data.aws_iam_policy_document.aws_backup_assume.json
  permissions_boundary = var.iam_permissions_boundary_arn
}

# AWS's own managed policies for the backup service role: they track the services AWS Backup supports,
# which a hand-written copy would not.
resource "aws_iam_role_policy_attachment" "aws_backup" {
  for_each = var.enable_aws_backup ? toset([
    "service-role/AWSBackupServiceRolePolicyForBackup",
    "service-role/AWSBackupServiceRolePolicyForRestores",
  ]) : toset([])
  provider = aws.primary

  role       = aws_iam_role.aws_backup[0].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/${each.value}"
}

resource "aws_backup_selection" "rds" {
  count    = var.enable_aws_backup && length(var.rds_instance_arns) > 0 ? 1 : 0
  provider = aws.primary

  name         = "${local.name}-rds"
  plan_id      = aws_backup_plan.rds[0].id
  iam_role_arn = aws_iam_role.aws_backup[0].arn
  resources    = var.rds_instance_arns
}

# --------------------------------------------------------------------------------------------------
# RDS automated backups replicated to the DR region (point-in-time recovery there)
# --------------------------------------------------------------------------------------------------

resource "aws_db_instance_automated_backups_replication" "dr" {
  for_each = local.rds_instances
  provider = aws.dr

  source_db_instance_arn = each.value
  kms_key_id             = aws_kms_replica_key.backup_dr.arn
  retention_period       = var.rds_replicated_backup_retention_days

  lifecycle {
    precondition {
      condition     = element(split(":", each.value), 3) == var.primary_region
      error_message = "RDS instance ${each.value} is not in primary_region (${var.primary_region})."
    }
    precondition {
      condition     = data.aws_db_instance.protected[each.key].backup_retention_period > 0
      error_message = "RDS instance ${each.value} needs automated backups on before they can be replicated."
    }
  }
}
