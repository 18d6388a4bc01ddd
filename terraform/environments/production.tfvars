# Production example. Copy, replace the placeholders (zone, load balancers, RDS, subscribers), then:
#   terraform init
#   terraform plan  -var-file=environments/production.tfvars
#   terraform apply -var-file=environments/production.tfvars

environment    = "production"
primary_region = "us-west-2"
dr_region      = "us-east-1"

tags = {
  Owner      = "platform-engineering"
  CostCenter = "kyb-platform"
}

# The repository: s3://<derived bucket name>/kybdr
repository_prefix = "kybdr"

# Lifecycle: Standard-IA after 30 days, Glacier Instant Retrieval after 90, expiry after 7 years.
transition_to_ia_days      = 30
transition_to_glacier_days = 90
glacier_storage_class      = "GLACIER_IR"
backup_expiration_days     = 2557

noncurrent_version_expiration_days     = 30
abort_incomplete_multipart_upload_days = 3
access_log_retention_days              = 365

# Ransomware protection: no one can delete a backup version for 35 days, not even the account root.
object_lock_mode           = "COMPLIANCE"
object_lock_retention_days = 35

replication_time_control = true
replicate_delete_markers = false

# Route53 and the seed's load balancers. The agent moves api.kyb.example.com once the database has
# failed over; Route53 alone moves static.kyb.example.com (a stateless front end) by its health checks.
route53_zone_id           = "Z0123456789ABCDEFGHIJ"
route53_domain            = "api.kyb.example.com"
failover_domain           = "static.kyb.example.com"
primary_load_balancer_arn = "arn:aws:elasticloadbalancing:us-west-2:123456789012:loadbalancer/app/kyb-api-primary/0123456789abcdef"
dr_load_balancer_arn      = "arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/kyb-api-dr/fedcba9876543210"
primary_health_check_fqdn = "api-primary.kyb.example.com"
dr_health_check_fqdn      = "api-dr.kyb.example.com"
health_check_path         = "/health"

health_check_request_interval  = 10
health_check_failure_threshold = 3

alert_subscriptions = [
  { protocol = "email", endpoint = "oncall@kyb.example.com" },
  { protocol = "https", endpoint = "https://events.pagerduty.com/integration/0123456789abcdef0123456789abcdef/enqueue" },
]

# Alarm thresholds (the seed's targets).
backup_max_age_seconds         = 93600
backup_duration_target_seconds = 1800
restore_rto_seconds            = 7200
dr_unhealthy_minutes           = 3
dr_region_backup_alarms        = true
backup_storage_alarm_bytes     = 5000000000000

# RDS: AWS Backup with point-in-time recovery, automated backups replicated to the DR region.
enable_aws_backup                    = true
rds_instance_arns                    = ["arn:aws:rds:us-west-2:123456789012:db:kyb-platform"]
pitr_retention_days                  = 35
aws_backup_daily_retention_days      = 35
aws_backup_monthly_retention_days    = 2557
rds_replicated_backup_retention_days = 14
