# Input variables. Every variable has a description and, where a wrong value would only be caught by
# AWS at apply time (or not at all), a validation block. Checks that relate two variables live in
# preconditions next to the resource that needs them (see modules/backup_bucket/main.tf, backup.tf).

# --------------------------------------------------------------------------------------------------
# Naming and placement
# --------------------------------------------------------------------------------------------------

variable "project" {
  description = "Short name used as the prefix of every resource name (buckets, keys, roles, alarms, dashboards)."
  type        = string
  default     = "kybdr"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,19}$", var.project))
    error_message = "project must be 2-20 characters of lowercase letters, digits and '-', starting with a letter."
  }
}

variable "environment" {
  description = "Environment name (for example production or staging); part of every resource name and the Environment tag."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,15}$", var.environment))
    error_message = "environment must be 2-16 characters of lowercase letters, digits and '-', starting with a letter."
  }
}

variable "primary_region" {
  description = "AWS region where the databases and the agent normally run (agent config: dr.primary_region, repository.region)."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]$", var.primary_region))
    error_message = "primary_region must be an AWS region name such as eu-central-1."
  }
}

variable "dr_region" {
  description = "AWS region that receives replicated backups and takes over on failover (agent config: dr.dr_region). Must differ from primary_region (enforced by a precondition on the replication role)."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]$", var.dr_region))
    error_message = "dr_region must be an AWS region name such as eu-west-1."
  }
}

variable "tags" {
  description = "Extra tags applied to every resource (merged over Project, Environment and ManagedBy)."
  type        = map(string)
  default     = {}
}

# --------------------------------------------------------------------------------------------------
# Backup buckets
# --------------------------------------------------------------------------------------------------

variable "primary_bucket_name" {
  description = "Name of the primary-region backup bucket. null derives <project>-<environment>-backups-<account id>-<primary region>."
  type        = string
  default     = null

  validation {
    condition     = var.primary_bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,57}[a-z0-9]$", var.primary_bucket_name))
    error_message = "primary_bucket_name must be a valid S3 bucket name of 3-59 characters (room is left for the -logs suffix)."
  }
}

variable "dr_bucket_name" {
  description = "Name of the DR-region backup bucket. null derives <project>-<environment>-backups-<account id>-<dr region>."
  type        = string
  default     = null

  validation {
    condition     = var.dr_bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,57}[a-z0-9]$", var.dr_bucket_name))
    error_message = "dr_bucket_name must be a valid S3 bucket name of 3-59 characters (room is left for the -logs suffix)."
  }
}

variable "repository_prefix" {
  description = "Key prefix of the agent's repository inside each bucket (the path part of repository.url). The agent writes <prefix>/backups/, <prefix>/dr/ and <prefix>/audit/ below it; the IAM policy, lifecycle rules and replication are all scoped to it."
  type        = string
  default     = "kybdr"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$", var.repository_prefix))
    error_message = "repository_prefix must be one or more '/'-separated segments of lowercase letters, digits, '.', '_' and '-', without a leading or trailing '/'."
  }
}

variable "force_destroy" {
  description = "Allow `terraform destroy` to delete non-empty buckets. Keep false for anything that holds real backups (Object Lock protects locked versions regardless)."
  type        = bool
  default     = false
}

# --------------------------------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------------------------------

variable "transition_to_ia_days" {
  description = "Days after creation when backup objects move to S3 Standard-IA. S3 requires at least 30."
  type        = number
  default     = 30

  validation {
    condition     = var.transition_to_ia_days >= 30 && floor(var.transition_to_ia_days) == var.transition_to_ia_days
    error_message = "transition_to_ia_days must be a whole number of at least 30 (an S3 minimum for Standard-IA)."
  }
}

variable "transition_to_glacier_days" {
  description = "Days after creation when backup objects move to the Glacier storage class chosen by glacier_storage_class. Must be at least transition_to_ia_days + 30 (checked by a precondition)."
  type        = number
  default     = 90

  validation {
    condition     = var.transition_to_glacier_days >= 60 && floor(var.transition_to_glacier_days) == var.transition_to_glacier_days
    error_message = "transition_to_glacier_days must be a whole number of at least 60."
  }
}

variable "glacier_storage_class" {
  description = <<-EOT
    Storage class of the second transition. GLACIER_IR (Glacier Instant Retrieval, the default) keeps
    millisecond reads, so the agent can list, validate, drill and restore old backups directly.
    GLACIER and DEEP_ARCHIVE are cheaper but their objects must be restored (S3 RestoreObject, hours)
    before the agent can read them; manifests stay readable either way because only objects larger
    than transition_min_object_size_bytes are transitioned.
  EOT
  type    = string
  default = "GLACIER_IR"

  validation {
    condition     = contains(["GLACIER_IR", "GLACIER", "DEEP_ARCHIVE"], var.glacier_storage_class)
    error_message = "glacier_storage_class must be GLACIER_IR, GLACIER or DEEP_ARCHIVE."
  }
}

variable "transition_min_object_size_bytes" {
  description = "Only objects larger than this are transitioned to Standard-IA and Glacier, so manifests (small JSON) stay in S3 Standard and remain instantly readable."
  type        = number
  default     = 131072

  validation {
    condition     = var.transition_min_object_size_bytes >= 0
    error_message = "transition_min_object_size_bytes must not be negative."
  }
}

variable "backup_expiration_days" {
  description = "Days after creation when S3 expires objects under <prefix>/backups/ (7 years = 2557 days, the seed's retention). This is a backstop behind the agent's own GFS retention, so it must be at least the agent's longest retention (retention max age)."
  type        = number
  default     = 2557

  validation {
    condition     = var.backup_expiration_days >= 1 && floor(var.backup_expiration_days) == var.backup_expiration_days
    error_message = "backup_expiration_days must be a whole number of at least 1."
  }
}

variable "noncurrent_version_expiration_days" {
  description = "Days a version stays after it stopped being current (overwritten or deleted by the agent's retention) before S3 removes it. This is the window in which a mistaken or malicious delete can be undone by removing the delete marker."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1 && floor(var.noncurrent_version_expiration_days) == var.noncurrent_version_expiration_days
    error_message = "noncurrent_version_expiration_days must be a whole number of at least 1."
  }
}

variable "abort_incomplete_multipart_upload_days" {
  description = "Days after which S3 aborts multipart uploads that were never completed (parts of a killed agent's backup). Must be longer than the longest backup takes; the agent also aborts its own leftovers at startup."
  type        = number
  default     = 3

  validation {
    condition     = var.abort_incomplete_multipart_upload_days >= 1 && var.abort_incomplete_multipart_upload_days <= 30
    error_message = "abort_incomplete_multipart_upload_days must be between 1 and 30."
  }
}

variable "access_log_retention_days" {
  description = "Days S3 server access logs of the backup buckets are kept in the log buckets."
  type        = number
  default     = 365

  validation {
    condition     = var.access_log_retention_days >= 1
    error_message = "access_log_retention_days must be at least 1."
  }
}

# --------------------------------------------------------------------------------------------------
# Object Lock (ransomware protection)
# --------------------------------------------------------------------------------------------------

variable "object_lock_mode" {
  description = <<-EOT
    null (default) leaves Object Lock off. GOVERNANCE or COMPLIANCE creates both backup buckets with
    Object Lock enabled and a default retention of object_lock_retention_days on every new object
    version: no one (COMPLIANCE), or no one without s3:BypassGovernanceRetention (GOVERNANCE), can
    delete a version before then. Object Lock can only be enabled when a bucket is created, so
    switching it on later replaces the buckets. With COMPLIANCE the AWS Backup vaults are also locked.
  EOT
  type    = string
  default = null

  validation {
    condition     = var.object_lock_mode == null ? true : contains(["GOVERNANCE", "COMPLIANCE"], var.object_lock_mode)
    error_message = "object_lock_mode must be null, GOVERNANCE or COMPLIANCE."
  }
}

variable "object_lock_retention_days" {
  description = "Default Object Lock retention of every new object version, in days, when object_lock_mode is set. Must be shorter than backup_expiration_days (checked by a precondition)."
  type        = number
  default     = 35

  validation {
    condition     = var.object_lock_retention_days >= 1 && var.object_lock_retention_days <= 36500
    error_message = "object_lock_retention_days must be between 1 and 36500."
  }
}

# --------------------------------------------------------------------------------------------------
# Replication
# --------------------------------------------------------------------------------------------------

variable "replication_time_control" {
  description = "Enable S3 Replication Time Control: 99.99 % of objects replicated within 15 minutes, with replication metrics and a failed-replication alarm. Costs extra per GB."
  type        = bool
  default     = false
}

variable "replicate_delete_markers" {
  description = <<-EOT
    Replicate delete markers from the primary bucket to the DR bucket. false (default): a delete in
    the primary region (the agent's retention, a mistake, or an attacker with the primary's
    credentials) never hides the DR copy; the agent applies retention to the DR bucket itself and the
    lifecycle expiry is the backstop. true: DR mirrors the primary's deletes. Permanent deletes of a
    specific version are never replicated by S3, whatever this says.
  EOT
  type    = bool
  default = false
}

# --------------------------------------------------------------------------------------------------
# KMS
# --------------------------------------------------------------------------------------------------

variable "kms_deletion_window_days" {
  description = "Waiting period before a scheduled KMS key deletion takes effect. Deleting the backup key makes every backup unreadable, so keep the maximum."
  type        = number
  default     = 30

  validation {
    condition     = var.kms_deletion_window_days >= 7 && var.kms_deletion_window_days <= 30
    error_message = "kms_deletion_window_days must be between 7 and 30."
  }
}

# --------------------------------------------------------------------------------------------------
# The agent's identity
# --------------------------------------------------------------------------------------------------

variable "agent_trusted_services" {
  description = "AWS service principals allowed to assume the agent role (ec2.amazonaws.com for agents on EC2 hosts through the instance profile)."
  type        = list(string)
  default     = ["ec2.amazonaws.com"]

  validation {
    condition     = alltrue([for s in var.agent_trusted_services : can(regex("^[a-z0-9.-]+\\.amazonaws\\.com(\\.cn)?$", s))])
    error_message = "agent_trusted_services must be AWS service principals such as ec2.amazonaws.com."
  }
}

variable "agent_trusted_role_arns" {
  description = "IAM role ARNs allowed to assume the agent role (for example a role used through IAM Roles Anywhere by agents outside EC2). Empty by default."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.agent_trusted_role_arns : can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$", a))])
    error_message = "agent_trusted_role_arns must be IAM role ARNs."
  }
}

variable "agent_resolves_load_balancers" {
  description = "Grant the agent elasticloadbalancing:DescribeLoadBalancers so it can turn dr.load_balancer_arn and dr.dr_load_balancer_arn into the alias target (DNS name and hosted zone) it writes on failover. Set false if your agent reads the alias targets some other way."
  type        = bool
  default     = true
}

variable "iam_permissions_boundary_arn" {
  description = "Permissions boundary attached to every IAM role this configuration creates, if your organisation requires one."
  type        = string
  default     = null

  validation {
    condition     = var.iam_permissions_boundary_arn == null || can(regex("^arn:aws[a-z-]*:iam::([0-9]{12}|aws):policy/.+$", var.iam_permissions_boundary_arn))
    error_message = "iam_permissions_boundary_arn must be an IAM policy ARN."
  }
}

# --------------------------------------------------------------------------------------------------
# Route53 and the load balancers
# --------------------------------------------------------------------------------------------------

variable "route53_zone_id" {
  description = "ID of the existing public hosted zone that holds the service records (agent config: dr.route53_zone_id)."
  type        = string

  validation {
    condition     = can(regex("^Z[A-Z0-9]{1,31}$", var.route53_zone_id))
    error_message = "route53_zone_id must be a Route53 hosted zone ID such as Z0123456789ABCDEFGHIJ."
  }
}

variable "route53_domain" {
  description = "Fully qualified name of the record the agent switches on failover and failback (agent config: dr.route53_domain), for example api.example.com: the service name whose traffic must follow the database. Terraform creates it pointing at the primary load balancer and then leaves its target to the agent. The agent may change only this record (and the test record)."
  type        = string

  validation {
    condition     = can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}\\.?$", var.route53_domain))
    error_message = "route53_domain must be a lowercase fully qualified domain name."
  }
}

variable "failover_domain" {
  description = "Fully qualified name for Route53 failover routing (PRIMARY -> primary load balancer, SECONDARY -> DR load balancer, chosen by the Route53 health checks, without the agent), for example app.example.com. null creates no failover records; the health checks are still created and feed the dashboard."
  type        = string
  default     = null

  validation {
    condition     = var.failover_domain == null || can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}\\.?$", var.failover_domain))
    error_message = "failover_domain must be null or a lowercase fully qualified domain name."
  }
}

variable "route53_test_record_label" {
  description = "Label of the record the agent's test failover writes and deletes, under route53_domain's parent zone: <label>.<route53_domain>. The agent may UPSERT and DELETE only this record besides route53_domain."
  type        = string
  default     = "kybdr-failover-test"

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.route53_test_record_label))
    error_message = "route53_test_record_label must be a single lowercase DNS label."
  }
}

variable "primary_load_balancer_arn" {
  description = "ARN of the existing load balancer in the primary region (agent config: dr.load_balancer_arn)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:elasticloadbalancing:[a-z0-9-]+:[0-9]{12}:loadbalancer/.+$", var.primary_load_balancer_arn))
    error_message = "primary_load_balancer_arn must be an Elastic Load Balancing load balancer ARN."
  }
}

variable "dr_load_balancer_arn" {
  description = "ARN of the existing load balancer in the DR region (agent config: dr.dr_load_balancer_arn)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:elasticloadbalancing:[a-z0-9-]+:[0-9]{12}:loadbalancer/.+$", var.dr_load_balancer_arn))
    error_message = "dr_load_balancer_arn must be an Elastic Load Balancing load balancer ARN."
  }
}

variable "primary_health_check_fqdn" {
  description = "Host name the primary health check (and the agent, through dr.health_check_url) probes. null uses the primary load balancer's DNS name."
  type        = string
  default     = null

  validation {
    condition     = var.primary_health_check_fqdn == null || can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}$", var.primary_health_check_fqdn))
    error_message = "primary_health_check_fqdn must be null or a lowercase fully qualified host name."
  }
}

variable "dr_health_check_fqdn" {
  description = "Host name the DR health check probes. null uses the DR load balancer's DNS name."
  type        = string
  default     = null

  validation {
    condition     = var.dr_health_check_fqdn == null || can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}$", var.dr_health_check_fqdn))
    error_message = "dr_health_check_fqdn must be null or a lowercase fully qualified host name."
  }
}

variable "health_check_protocol" {
  description = "Protocol of the Route53 health checks and of dr.health_check_url."
  type        = string
  default     = "HTTPS"

  validation {
    condition     = contains(["HTTP", "HTTPS"], var.health_check_protocol)
    error_message = "health_check_protocol must be HTTP or HTTPS."
  }
}

variable "health_check_port" {
  description = "Port of the Route53 health checks."
  type        = number
  default     = 443

  validation {
    condition     = var.health_check_port >= 1 && var.health_check_port <= 65535
    error_message = "health_check_port must be a TCP port number."
  }
}

variable "health_check_path" {
  description = "Path of the Route53 health checks and of dr.health_check_url."
  type        = string
  default     = "/health"

  validation {
    condition     = can(regex("^/", var.health_check_path))
    error_message = "health_check_path must start with '/'."
  }
}

variable "health_check_failure_threshold" {
  description = "Consecutive failed Route53 checks before an endpoint counts as unhealthy (and back)."
  type        = number
  default     = 3

  validation {
    condition     = var.health_check_failure_threshold >= 1 && var.health_check_failure_threshold <= 10
    error_message = "health_check_failure_threshold must be between 1 and 10."
  }
}

variable "health_check_request_interval" {
  description = "Seconds between Route53 checks from each checker: 30 (standard) or 10 (fast, extra cost)."
  type        = number
  default     = 30

  validation {
    condition     = contains([10, 30], var.health_check_request_interval)
    error_message = "health_check_request_interval must be 10 or 30."
  }
}

# --------------------------------------------------------------------------------------------------
# Alerts
# --------------------------------------------------------------------------------------------------

variable "alert_subscriptions" {
  description = "Subscriptions added to the alert topics in both regions. Email subscriptions must be confirmed by their recipients before they receive anything."
  type = list(object({
    protocol = string
    endpoint = string
  }))
  default = []

  validation {
    condition     = alltrue([for s in var.alert_subscriptions : contains(["email", "email-json", "https", "sqs", "lambda", "sms", "firehose"], s.protocol)])
    error_message = "alert_subscriptions protocols must be one of email, email-json, https, sqs, lambda, sms, firehose (plain http is refused)."
  }
}

# --------------------------------------------------------------------------------------------------
# CloudWatch
# --------------------------------------------------------------------------------------------------

variable "metrics_namespace" {
  description = "CloudWatch namespace the agent publishes its metrics to. The agent's PutMetricData permission is limited to it."
  type        = string
  default     = "KybdrAgent"

  validation {
    condition     = can(regex("^[A-Za-z0-9_./#:-]{1,255}$", var.metrics_namespace)) && !startswith(var.metrics_namespace, "AWS/")
    error_message = "metrics_namespace must be a custom CloudWatch namespace (not AWS/...)."
  }
}

variable "backup_max_age_seconds" {
  description = "Alarm when any database's newest good backup (BackupAgeSeconds) is older than this. The default, 26 hours, is a daily schedule plus two hours' slack."
  type        = number
  default     = 93600

  validation {
    condition     = var.backup_max_age_seconds >= 3600
    error_message = "backup_max_age_seconds must be at least 3600."
  }
}

variable "backup_duration_target_seconds" {
  description = "Alarm when a backup takes longer than this (BackupDurationSeconds). The seed's target is under 30 minutes."
  type        = number
  default     = 1800

  validation {
    condition     = var.backup_duration_target_seconds >= 60
    error_message = "backup_duration_target_seconds must be at least 60."
  }
}

variable "restore_rto_seconds" {
  description = "Alarm when a restore drill takes longer than this (RestoreDrillSeconds). The seed's target is under 2 hours."
  type        = number
  default     = 7200

  validation {
    condition     = var.restore_rto_seconds >= 60
    error_message = "restore_rto_seconds must be at least 60."
  }
}

variable "dr_unhealthy_minutes" {
  description = "Alarm when the agent has reported the primary unhealthy (DRPrimaryHealthy = 0) for this many consecutive minutes."
  type        = number
  default     = 3

  validation {
    condition     = var.dr_unhealthy_minutes >= 1 && var.dr_unhealthy_minutes <= 60
    error_message = "dr_unhealthy_minutes must be between 1 and 60."
  }
}

variable "dr_region_backup_alarms" {
  description = "Also create the backup alarms (failures, age, duration, restore drill) in the DR region. Turn on when agents in the DR region run backups, for example after a failover. DR health and failover alarms always exist in both regions."
  type        = bool
  default     = false
}

variable "backup_storage_alarm_bytes" {
  description = "Alarm when the primary backup bucket holds more than this many bytes (the seed's storage alert; S3 reports it once a day). null creates no storage alarm."
  type        = number
  default     = null

  validation {
    condition     = var.backup_storage_alarm_bytes == null ? true : var.backup_storage_alarm_bytes > 0
    error_message = "backup_storage_alarm_bytes must be null or positive."
  }
}

# --------------------------------------------------------------------------------------------------
# AWS Backup and RDS (for teams whose databases run on RDS)
# --------------------------------------------------------------------------------------------------

variable "enable_aws_backup" {
  description = "Create AWS Backup vaults (both regions, encrypted with the backup keys) and a plan for rds_instance_arns: continuous backup (point-in-time recovery) with daily snapshots, monthly snapshots, copies of both to the DR vault."
  type        = bool
  default     = false
}

variable "rds_instance_arns" {
  description = "ARNs of RDS DB instances in the primary region to protect: they are selected by the AWS Backup plan and their automated backups (point-in-time recovery) are replicated to the DR region. Each must have automated backups on (backup_retention_period > 0)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.rds_instance_arns : can(regex("^arn:aws[a-z-]*:rds:[a-z0-9-]+:[0-9]{12}:db:[a-zA-Z][a-zA-Z0-9-]{0,62}$", a))])
    error_message = "rds_instance_arns must be RDS DB instance ARNs (arn:aws:rds:<region>:<account>:db:<name>)."
  }
}

variable "aws_backup_daily_schedule" {
  description = "Schedule of the AWS Backup daily rule (AWS cron syntax, UTC)."
  type        = string
  default     = "cron(0 3 * * ? *)"

  validation {
    condition     = can(regex("^cron\\(.+\\)$", var.aws_backup_daily_schedule))
    error_message = "aws_backup_daily_schedule must be an AWS cron expression such as cron(0 3 * * ? *)."
  }
}

variable "aws_backup_daily_retention_days" {
  description = "Days the daily snapshot copies are kept in the DR vault (the primary vault keeps point-in-time recovery for pitr_retention_days)."
  type        = number
  default     = 35

  validation {
    condition     = var.aws_backup_daily_retention_days >= 1
    error_message = "aws_backup_daily_retention_days must be at least 1."
  }
}

variable "aws_backup_monthly_retention_days" {
  description = "Days AWS Backup keeps monthly recovery points (in both vaults). 7 years by default, like the S3 backups."
  type        = number
  default     = 2557

  validation {
    condition     = var.aws_backup_monthly_retention_days >= 1
    error_message = "aws_backup_monthly_retention_days must be at least 1."
  }
}

variable "pitr_retention_days" {
  description = "Days of continuous backup (point-in-time recovery) AWS Backup keeps for the RDS instances. AWS allows at most 35."
  type        = number
  default     = 35

  validation {
    condition     = var.pitr_retention_days >= 1 && var.pitr_retention_days <= 35
    error_message = "pitr_retention_days must be between 1 and 35."
  }
}

variable "rds_replicated_backup_retention_days" {
  description = "Days of RDS automated backups (point-in-time recovery) kept in the DR region by cross-region automated backup replication."
  type        = number
  default     = 7

  validation {
    condition     = var.rds_replicated_backup_retention_days >= 1 && var.rds_replicated_backup_retention_days <= 35
    error_message = "rds_replicated_backup_retention_days must be between 1 and 35."
  }
}
