# Inputs of one region's alarm set. The root module passes its own variables through; their
# descriptions and validations there are the reference (../../variables.tf).

variable "name_prefix" {
  description = "Prefix of every alarm name (<project>-<environment>)."
  type        = string
}

variable "region_label" {
  description = "primary or dr: which region's agents these alarms watch (part of the alarm names)."
  type        = string

  validation {
    condition     = contains(["primary", "dr"], var.region_label)
    error_message = "region_label must be primary or dr."
  }
}

variable "metrics_namespace" {
  description = "CloudWatch namespace the agent publishes to (KybdrAgent)."
  type        = string
}

variable "alarm_topic_arn" {
  description = "SNS topic in this region that receives ALARM and OK notifications."
  type        = string
}

variable "backup_alarms" {
  description = "Create the backup alarms (failures, age, duration, restore drill) in this region. The DR health and failover alarms are always created."
  type        = bool
}

variable "backup_max_age_seconds" {
  description = "Threshold of the backup age alarm (BackupAgeSeconds)."
  type        = number
}

variable "backup_duration_target_seconds" {
  description = "Threshold of the backup duration alarm (BackupDurationSeconds)."
  type        = number
}

variable "restore_rto_seconds" {
  description = "Threshold of the restore drill alarm (RestoreDrillSeconds)."
  type        = number
}

variable "dr_unhealthy_minutes" {
  description = "Consecutive one-minute periods of DRPrimaryHealthy = 0 before the DR health alarm fires."
  type        = number
}
