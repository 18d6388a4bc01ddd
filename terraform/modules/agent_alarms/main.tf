# CloudWatch alarms on the metrics the agent publishes (namespace KybdrAgent), for one region.
#
# The agent publishes:
#   BackupFailures (Count)        one per failed backup job
#   BackupSucceeded (Count)       one per verified, completed backup
#   BackupAgeSeconds              age of the newest good backup, per Database dimension
#   BackupDurationSeconds         wall time of each backup
#   BackupStoredBytes             bytes stored by each backup
#   DRPrimaryHealthy              1 while the primary passes its probes, 0 while it fails them
#   DRFailovers (Count)           one per completed failover
#   RestoreDrillSeconds           measured time of each restore drill (the measured RTO)
#
# The alarms use CloudWatch Metrics Insights queries (SELECT ... FROM "<namespace>") so that they
# aggregate over every dimension the agent attaches (Database, host, ...) without listing databases
# here: a new database is covered the moment the agent reports it.

locals {
  namespace = "\"${var.metrics_namespace}\""
  prefix    = "${var.name_prefix}-${var.region_label}"
  actions   = [var.alarm_topic_arn]
}

resource "aws_cloudwatch_metric_alarm" "backup_failures" {
  count = var.backup_alarms ? 1 : 0

  alarm_name          = "${local.prefix}-backup-failures"
  alarm_description   = "A kybdr-agent backup job failed (BackupFailures > 0 in 5 minutes). See the agent's logs and GET /v1/backup/stats."
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  evaluation_periods  = 1
  datapoints_to_alarm = 1
  treat_missing_data  = "notBreaching"
  actions_enabled     = true
  alarm_actions       = local.actions
  ok_actions          = local.actions

  metric_query {
    id          = "failures"
    expression  = "SELECT SUM(BackupFailures) FROM ${local.namespace}"
    period      = 300
    label       = "Backup failures"
    return_data = true
  }
}

resource "aws_cloudwatch_metric_alarm" "backup_age" {
  count = var.backup_alarms ? 1 : 0

  alarm_name          = "${local.prefix}-backup-age"
  alarm_description   = "The newest good backup of at least one database is older than ${var.backup_max_age_seconds} s (BackupAgeSeconds), or the agent stopped reporting it: no recent restorable backup exists."
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.backup_max_age_seconds
  evaluation_periods  = 3
  datapoints_to_alarm = 3
  # No data means no agent proving that backups are recent: that is an alarm too.
  treat_missing_data = "breaching"
  actions_enabled    = true
  alarm_actions      = local.actions
  ok_actions         = local.actions

  metric_query {
    id          = "age"
    expression  = "SELECT MAX(BackupAgeSeconds) FROM ${local.namespace}"
    period      = 300
    label       = "Age of the oldest newest-backup"
    return_data = true
  }
}

resource "aws_cloudwatch_metric_alarm" "backup_duration" {
  count = var.backup_alarms ? 1 : 0

  alarm_name          = "${local.prefix}-backup-duration"
  alarm_description   = "A backup took longer than the ${var.backup_duration_target_seconds} s target (BackupDurationSeconds)."
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.backup_duration_target_seconds
  evaluation_periods  = 1
  datapoints_to_alarm = 1
  treat_missing_data  = "notBreaching"
  actions_enabled     = true
  alarm_actions       = local.actions
  ok_actions          = local.actions

  metric_query {
    id          = "duration"
    expression  = "SELECT MAX(BackupDurationSeconds) FROM ${local.namespace}"
    period      = 300
    label       = "Longest backup"
    return_data = true
  }
}

resource "aws_cloudwatch_metric_alarm" "restore_drill" {
  count = var.backup_alarms ? 1 : 0

  alarm_name          = "${local.prefix}-restore-drill-rto"
  alarm_description   = "A restore drill took longer than the ${var.restore_rto_seconds} s recovery-time target (RestoreDrillSeconds)."
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.restore_rto_seconds
  evaluation_periods  = 1
  datapoints_to_alarm = 1
  treat_missing_data  = "notBreaching"
  actions_enabled     = true
  alarm_actions       = local.actions
  ok_actions          = local.actions

  metric_query {
    id          = "drill"
    expression  = "SELECT MAX(RestoreDrillSeconds) FROM ${local.namespace}"
    period      = 300
    label       = "Longest restore drill"
    return_data = true
  }
}

resource "aws_cloudwatch_metric_alarm" "dr_primary_unhealthy" {
  alarm_name          = "${local.prefix}-dr-primary-unhealthy"
  alarm_description   = "The agent has seen the primary fail its health probes for ${var.dr_unhealthy_minutes} consecutive minutes (DRPrimaryHealthy = 0). A failover follows if auto-failover is on."
  comparison_operator = "LessThanThreshold"
  threshold           = 1
  evaluation_periods  = var.dr_unhealthy_minutes
  datapoints_to_alarm = var.dr_unhealthy_minutes
  treat_missing_data  = "notBreaching"
  actions_enabled     = true
  alarm_actions       = local.actions
  ok_actions          = local.actions

  metric_query {
    id          = "healthy"
    expression  = "SELECT MIN(DRPrimaryHealthy) FROM ${local.namespace}"
    period      = 60
    label       = "Primary healthy (1) or not (0)"
    return_data = true
  }
}

resource "aws_cloudwatch_metric_alarm" "dr_failover" {
  alarm_name          = "${local.prefix}-dr-failover"
  alarm_description   = "The agent failed the service over (DRFailovers > 0). Check GET /v1/disaster-recovery/status and history."
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  evaluation_periods  = 1
  datapoints_to_alarm = 1
  treat_missing_data  = "notBreaching"
  actions_enabled     = true
  alarm_actions       = local.actions
  ok_actions          = local.actions

  metric_query {
    id          = "failovers"
    expression  = "SELECT SUM(DRFailovers) FROM ${local.namespace}"
    period      = 60
    label       = "Failovers"
    return_data = true
  }
}
