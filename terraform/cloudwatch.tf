# CloudWatch: alarms on the agent's metrics in each region (modules/agent_alarms), alarms on what S3
# itself reports (replication failures, storage), and the seed's three dashboards:
#   <name>-backup       backup job status, success and failures, age per database, storage used
#   <name>-dr-health    primary and DR health as the agent and Route53 see them, failovers
#   <name>-performance  backup duration, restore drill times (measured RTO), endpoint latency
#
# Agents publish to CloudWatch in their own region, so each region gets its own alarm set: the DR
# region's alarms (and topic) keep working when the primary region is impaired. The dashboards live in
# the primary region and show both regions side by side.

module "alarms_primary" {
  source = "./modules/agent_alarms"
  providers = {
    aws = aws.primary
  }

  name_prefix                    = local.name
  region_label                   = "primary"
  metrics_namespace              = var.metrics_namespace
  alarm_topic_arn                = aws_sns_topic.alerts.arn
  backup_alarms                  = true
  backup_max_age_seconds         = var.backup_max_age_seconds
  backup_duration_target_seconds = var.backup_duration_target_seconds
  restore_rto_seconds            = var.restore_rto_seconds
  dr_unhealthy_minutes           = var.dr_unhealthy_minutes
}

module "alarms_dr" {
  source = "./modules/agent_alarms"
  providers = {
    aws = aws.dr
  }

  name_prefix                    = local.name
  region_label                   = "dr"
  metrics_namespace              = var.metrics_namespace
  alarm_topic_arn                = aws_sns_topic.alerts_dr.arn
  backup_alarms                  = var.dr_region_backup_alarms
  backup_max_age_seconds         = var.backup_max_age_seconds
  backup_duration_target_seconds = var.backup_duration_target_seconds
  restore_rto_seconds            = var.restore_rto_seconds
  dr_unhealthy_minutes           = var.dr_unhealthy_minutes
}

# S3 reports replication metrics in the source region once Replication Time Control is on.
resource "aws_cloudwatch_metric_alarm" "replication_failed" {
  count    = var.replication_time_control ? 1 : 0
  provider = aws.primary

  alarm_name          = "${local.name}-primary-replication-failed"
  alarm_description   = "S3 failed to replicate backup objects to the DR bucket (OperationsFailedReplication > 0)."
  namespace           = "AWS/S3"
  metric_name         = "OperationsFailedReplication"
  statistic           = "Sum"
  period              = 300
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"
  actions_enabled     = true
  alarm_actions       = [aws_sns_topic.alerts.arn]
  ok_actions          = [aws_sns_topic.alerts.arn]

  dimensions = {
    SourceBucket      = module.primary_bucket.bucket_id
    DestinationBucket = module.dr_bucket.bucket_id
    RuleId            = module.primary_bucket.replication_rule_id
  }
}

locals {
  # S3 reports BucketSizeBytes once a day, per storage class.
  storage_types = [
    "StandardStorage",
    "StandardIAStorage",
    "GlacierInstantRetrievalStorage",
    "GlacierStorage",
    "DeepArchiveStorage",
  ]
}

# The seed's storage alert: the primary bucket holds more than the configured budget.
resource "aws_cloudwatch_metric_alarm" "backup_storage" {
  count    = var.backup_storage_alarm_bytes == null ? 0 : 1
  provider = aws.primary

  alarm_name          = "${local.name}-primary-backup-storage"
  alarm_description   = "The primary backup bucket holds more than ${coalesce(var.backup_storage_alarm_bytes, 0)} bytes (all storage classes)."
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.backup_storage_alarm_bytes
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"
  actions_enabled     = true
  alarm_actions       = [aws_sns_topic.alerts.arn]
  ok_actions          = [aws_sns_topic.alerts.arn]

  metric_query {
    id          = "total"
    expression  = "SUM(METRICS())"
    label       = "Bytes stored"
    return_data = true
  }

  dynamic "metric_query" {
    for_each = local.storage_types
    content {
      id          = "m${metric_query.key}"
      return_data = false
      metric {
        namespace   = "AWS/S3"
        metric_name = "BucketSizeBytes"
        period      = 86400
        stat        = "Average"
        dimensions = {
          BucketName  = module.primary_bucket.bucket_id
          StorageType = metric_query.value
        }
      }
    }
  }
}

# --------------------------------------------------------------------------------------------------
# Dashboards
# --------------------------------------------------------------------------------------------------

locals {
  ns      = "\"${var.metrics_namespace}\""
  regions = { primary = var.primary_region, dr = var.dr_region }
  buckets = { primary = module.primary_bucket.bucket_id, dr = module.dr_bucket.bucket_id }

  backup_alarm_arns = {
    (var.primary_region) = module.alarms_primary.backup_alarm_arns
    (var.dr_region)      = module.alarms_dr.backup_alarm_arns
  }
  dr_alarm_arns = {
    (var.primary_region) = module.alarms_primary.dr_alarm_arns
    (var.dr_region)      = module.alarms_dr.dr_alarm_arns
  }

  # Route53 health-check metrics exist only in us-east-1, whatever the regions of the endpoints.
  route53_metrics_region = "us-east-1"

  backup_dashboard = {
    widgets = concat(
      [
        {
          type   = "text"
          width  = 24
          height = 2
          properties = {
            markdown = "## ${local.name}: backups\nJob outcomes, age of the newest good backup per database (alarm above ${var.backup_max_age_seconds} s), bytes stored, and S3 storage per region. Source: namespace `${var.metrics_namespace}` and AWS/S3."
          }
        },
      ],
      # One alarm-status widget per region that has backup alarms.
      [for region, arns in local.backup_alarm_arns : {
        type   = "alarm"
        width  = 12
        height = 3
        properties = {
          title  = "Backup alarms (${region})"
          alarms = arns
        }
      } if length(arns) > 0],
      flatten([for key, region in local.regions : [
        {
          type   = "metric"
          width  = 12
          height = 6
          properties = {
            title  = "Backups succeeded and failed (${region})"
            region = region
            view   = "timeSeries"
            period = 3600
            metrics = [
              [{ id = "ok", label = "BackupSucceeded", expression = "SELECT SUM(BackupSucceeded) FROM ${local.ns}" }],
              [{ id = "failed", label = "BackupFailures", expression = "SELECT SUM(BackupFailures) FROM ${local.ns}", color = "#d62728" }],
            ]
          }
        },
        {
          type   = "metric"
          width  = 12
          height = 6
          properties = {
            title  = "Age of the newest good backup, per database (${region})"
            region = region
            view   = "timeSeries"
            period = 300
            metrics = [
              [{ id = "age", expression = "SELECT MAX(BackupAgeSeconds) FROM ${local.ns} GROUP BY Database" }],
            ]
            annotations = { horizontal = [{ label = "alarm", value = var.backup_max_age_seconds }] }
          }
        },
        {
          type   = "metric"
          width  = 12
          height = 6
          properties = {
            title  = "Bytes stored per backup, per database (${region})"
            region = region
            view   = "timeSeries"
            period = 3600
            metrics = [
              [{ id = "bytes", expression = "SELECT MAX(BackupStoredBytes) FROM ${local.ns} GROUP BY Database" }],
            ]
          }
        },
        {
          type   = "metric"
          width  = 12
          height = 6
          properties = {
            title   = "Backup bucket size by storage class (${region})"
            region  = region
            view    = "timeSeries"
            period  = 86400
            stat    = "Average"
            metrics = [for t in local.storage_types : ["AWS/S3", "BucketSizeBytes", "BucketName", local.buckets[key], "StorageType", t]]
          }
        },
      ]]),
    )
  }

  dr_dashboard = {
    widgets = concat(
      [
        {
          type   = "text"
          width  = 24
          height = 2
          properties = {
            markdown = "## ${local.name}: DR health\nPrimary health as the agents in each region see it (DRPrimaryHealthy, 1 = healthy), Route53's view of both endpoints, and failovers. Switched record: `${var.route53_domain}`."
          }
        },
      ],
      [for region, arns in local.dr_alarm_arns : {
        type   = "alarm"
        width  = 12
        height = 3
        properties = {
          title  = "DR alarms (${region})"
          alarms = arns
        }
      }],
      [
        {
          type   = "metric"
          width  = 12
          height = 6
          properties = {
            title  = "Route53 health checks (1 = healthy)"
            region = local.route53_metrics_region
            view   = "timeSeries"
            period = 60
            stat   = "Minimum"
            metrics = [
              ["AWS/Route53", "HealthCheckStatus", "HealthCheckId", aws_route53_health_check.primary.id, { label = "primary (${var.primary_region})" }],
              ["AWS/Route53", "HealthCheckStatus", "HealthCheckId", aws_route53_health_check.dr.id, { label = "DR (${var.dr_region})" }],
            ]
          }
        },
        {
          type   = "metric"
          width  = 12
          height = 6
          properties = {
            title  = "Route53 checkers reporting healthy (%)"
            region = local.route53_metrics_region
            view   = "timeSeries"
            period = 60
            stat   = "Average"
            metrics = [
              ["AWS/Route53", "HealthCheckPercentageHealthy", "HealthCheckId", aws_route53_health_check.primary.id, { label = "primary" }],
              ["AWS/Route53", "HealthCheckPercentageHealthy", "HealthCheckId", aws_route53_health_check.dr.id, { label = "DR" }],
            ]
          }
        },
      ],
      flatten([for key, region in local.regions : [
        {
          type   = "metric"
          width  = 12
          height = 6
          properties = {
            title  = "Primary healthy according to the agents in ${region}"
            region = region
            view   = "timeSeries"
            period = 60
            metrics = [
              [{ id = "healthy", label = "DRPrimaryHealthy (min)", expression = "SELECT MIN(DRPrimaryHealthy) FROM ${local.ns}" }],
            ]
            yAxis = { left = { min = 0, max = 1 } }
          }
        },
        {
          type   = "metric"
          width  = 12
          height = 6
          properties = {
            title  = "Failovers (${region})"
            region = region
            view   = "singleValue"
            period = 86400
            metrics = [
              [{ id = "failovers", label = "DRFailovers (24 h)", expression = "SELECT SUM(DRFailovers) FROM ${local.ns}" }],
            ]
          }
        },
      ]]),
    )
  }

  performance_dashboard = {
    widgets = concat(
      [
        {
          type   = "text"
          width  = 24
          height = 2
          properties = {
            markdown = "## ${local.name}: performance\nBackup duration per database (target ${var.backup_duration_target_seconds} s), restore drill time as the measured recovery time (target ${var.restore_rto_seconds} s), and endpoint latency seen by Route53."
          }
        },
      ],
      flatten([for key, region in local.regions : [
        {
          type   = "metric"
          width  = 12
          height = 6
          properties = {
            title  = "Backup duration per database (${region})"
            region = region
            view   = "timeSeries"
            period = 3600
            metrics = [
              [{ id = "duration", expression = "SELECT MAX(BackupDurationSeconds) FROM ${local.ns} GROUP BY Database" }],
            ]
            annotations = { horizontal = [{ label = "target", value = var.backup_duration_target_seconds }] }
          }
        },
        {
          type   = "metric"
          width  = 12
          height = 6
          properties = {
            title  = "Restore drill time, the measured RTO (${region})"
            region = region
            view   = "timeSeries"
            period = 3600
            metrics = [
              [{ id = "drill", expression = "SELECT MAX(RestoreDrillSeconds) FROM ${local.ns} GROUP BY Database" }],
            ]
            annotations = { horizontal = [{ label = "RTO target", value = var.restore_rto_seconds }] }
          }
        },
      ]]),
      [
        {
          type   = "metric"
          width  = 24
          height = 6
          properties = {
            title  = "Endpoint time to first byte seen by Route53 (ms)"
            region = local.route53_metrics_region
            view   = "timeSeries"
            period = 60
            stat   = "Average"
            metrics = [
              ["AWS/Route53", "TimeToFirstByte", "HealthCheckId", aws_route53_health_check.primary.id, { label = "primary" }],
              ["AWS/Route53", "TimeToFirstByte", "HealthCheckId", aws_route53_health_check.dr.id, { label = "DR" }],
            ]
          }
        },
      ],
    )
  }
}

resource "aws_cloudwatch_dashboard" "backup" {
  provider = aws.primary

  dashboard_name = "${local.name}-backup"
  dashboard_body = jsonencode(local.backup_dashboard)
}

resource "aws_cloudwatch_dashboard" "dr_health" {
  provider = aws.primary

  dashboard_name = "${local.name}-dr-health"
  dashboard_body = jsonencode(local.dr_dashboard)
}

resource "aws_cloudwatch_dashboard" "performance" {
  provider = aws.primary

  dashboard_name = "${local.name}-performance"
  dashboard_body = jsonencode(local.performance_dashboard)
}
