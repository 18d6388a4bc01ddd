# Staging example: the same layout as production, cheaper and easier to tear down.
#   terraform plan  -var-file=environments/staging.tfvars
#   terraform apply -var-file=environments/staging.tfvars

environment    = "staging"
primary_region = "us-west-2"
dr_region      = "us-east-2"

tags = {
  Owner = "platform-engineering"
}

repository_prefix = "kybdr"

# Short retention: 90 days, with the minimum tiering that S3 allows.
transition_to_ia_days      = 30
transition_to_glacier_days = 60
glacier_storage_class      = "GLACIER_IR"
backup_expiration_days     = 90

noncurrent_version_expiration_days     = 7
abort_incomplete_multipart_upload_days = 2
access_log_retention_days              = 30
force_destroy                          = true

# Governance mode: protects against accidents, but an administrator with
# s3:BypassGovernanceRetention can still clean up.
object_lock_mode           = "GOVERNANCE"
object_lock_retention_days = 7

replication_time_control = false
replicate_delete_markers = true

route53_zone_id           = "Z9876543210ZYXWVUTSRQ"
route53_domain            = "api.staging.kyb.example.com"
failover_domain           = null
primary_load_balancer_arn = "arn:aws:elasticloadbalancing:us-west-2:123456789012:loadbalancer/app/kyb-api-staging/0123456789abcdef"
dr_load_balancer_arn      = "arn:aws:elasticloadbalancing:us-east-2:123456789012:loadbalancer/app/kyb-api-staging-dr/fedcba9876543210"
health_check_path         = "/health"

alert_subscriptions = [
  { protocol = "email", endpoint = "platform-staging@kyb.example.com" },
]

backup_max_age_seconds  = 93600
dr_region_backup_alarms = false

enable_aws_backup = false
