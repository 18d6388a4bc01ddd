output "alarm_arns" {
  description = "ARNs of every alarm of this region, for dashboard alarm-status widgets."
  value = concat(
    aws_cloudwatch_metric_alarm.backup_failures[*].arn,
    aws_cloudwatch_metric_alarm.backup_age[*].arn,
    aws_cloudwatch_metric_alarm.backup_duration[*].arn,
    aws_cloudwatch_metric_alarm.restore_drill[*].arn,
    [aws_cloudwatch_metric_alarm.dr_primary_unhealthy.arn, aws_cloudwatch_metric_alarm.dr_failover.arn],
  )
}

output "backup_alarm_arns" {
  description = "ARNs of the backup alarms (empty when backup_alarms is false)."
  value = concat(
    aws_cloudwatch_metric_alarm.backup_failures[*].arn,
    aws_cloudwatch_metric_alarm.backup_age[*].arn,
    aws_cloudwatch_metric_alarm.backup_duration[*].arn,
    aws_cloudwatch_metric_alarm.restore_drill[*].arn,
  )
}

output "dr_alarm_arns" {
  description = "ARNs of the DR health and failover alarms."
  value       = [aws_cloudwatch_metric_alarm.dr_primary_unhealthy.arn, aws_cloudwatch_metric_alarm.dr_failover.arn]
}
