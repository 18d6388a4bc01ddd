# The backup repository: one bucket in each region, built by the same module so the two cannot drift
# apart. The primary bucket is the agent's repository (repository.url); the DR bucket receives the
# replicated copies (replication.tf) and the agent's own cross-region copies (backup.cross_region_bucket),
# and holds the DR lease object (<prefix>/dr/lease) that lets only one agent act on a failover.

module "primary_bucket" {
  source = "./modules/backup_bucket"
  providers = {
    aws = aws.primary
  }

  bucket_name       = local.primary_bucket_name
  region_role       = "primary"
  kms_key_arn       = aws_kms_key.backup.arn
  repository_prefix = local.repository_prefix
  force_destroy     = var.force_destroy

  transition_to_ia_days                  = var.transition_to_ia_days
  transition_to_glacier_days             = var.transition_to_glacier_days
  glacier_storage_class                  = var.glacier_storage_class
  transition_min_object_size_bytes       = var.transition_min_object_size_bytes
  expiration_days                        = var.backup_expiration_days
  noncurrent_version_expiration_days     = var.noncurrent_version_expiration_days
  abort_incomplete_multipart_upload_days = var.abort_incomplete_multipart_upload_days
  access_log_retention_days              = var.access_log_retention_days

  object_lock_mode           = var.object_lock_mode
  object_lock_retention_days = var.object_lock_retention_days

  # Primary -> DR replication (role and delete-marker policy: replication.tf).
  replication = {
    role_arn                 = aws_iam_role.replication.arn
    role_policy_id           = aws_iam_role_policy.replication.id
    destination_bucket_arn   = module.dr_bucket.bucket_arn
    destination_versioning   = module.dr_bucket.versioning_status
    replica_kms_key_arn      = aws_kms_replica_key.backup_dr.arn
    replicate_delete_markers = var.replicate_delete_markers
    replication_time_control = var.replication_time_control
  }
}

module "dr_bucket" {
  source = "./modules/backup_bucket"
  providers = {
    aws = aws.dr
  }

  bucket_name       = local.dr_bucket_name
  region_role       = "dr"
  kms_key_arn       = aws_kms_replica_key.backup_dr.arn
  repository_prefix = local.repository_prefix
  force_destroy     = var.force_destroy

  transition_to_ia_days                  = var.transition_to_ia_days
  transition_to_glacier_days             = var.transition_to_glacier_days
  glacier_storage_class                  = var.glacier_storage_class
  transition_min_object_size_bytes       = var.transition_min_object_size_bytes
  expiration_days                        = var.backup_expiration_days
  noncurrent_version_expiration_days     = var.noncurrent_version_expiration_days
  abort_incomplete_multipart_upload_days = var.abort_incomplete_multipart_upload_days
  access_log_retention_days              = var.access_log_retention_days

  # Replication into a bucket requires Object Lock on the destination whenever the source has it.
  object_lock_mode           = var.object_lock_mode
  object_lock_retention_days = var.object_lock_retention_days

  # The destination: it replicates nowhere (see replication.tf for why there is no reverse rule).
  replication = null
}
