# Inputs of one regional backup bucket. The root module passes its own variables through; their
# descriptions and validations there are the reference (../../variables.tf).

variable "bucket_name" {
  description = "Name of the backup bucket. Its access-log bucket is named <bucket_name>-logs."
  type        = string
}

variable "region_role" {
  description = "primary or dr: which side of the pair this bucket is (tags and descriptions only)."
  type        = string

  validation {
    condition     = contains(["primary", "dr"], var.region_role)
    error_message = "region_role must be primary or dr."
  }
}

variable "kms_key_arn" {
  description = "ARN of the customer-managed KMS key in this bucket's region used for default SSE-KMS encryption."
  type        = string
}

variable "repository_prefix" {
  description = "The agent's key prefix; lifecycle rules for backups apply below <prefix>/backups/."
  type        = string
}

variable "transition_to_ia_days" {
  description = "Days after creation when backup objects move to Standard-IA."
  type        = number
}

variable "transition_to_glacier_days" {
  description = "Days after creation when backup objects move to glacier_storage_class."
  type        = number
}

variable "glacier_storage_class" {
  description = "GLACIER_IR, GLACIER or DEEP_ARCHIVE."
  type        = string
}

variable "transition_min_object_size_bytes" {
  description = "Only objects larger than this are transitioned (manifests stay in Standard)."
  type        = number
}

variable "expiration_days" {
  description = "Days after creation when objects under <prefix>/backups/ expire (the 7-year backstop)."
  type        = number
}

variable "noncurrent_version_expiration_days" {
  description = "Days a noncurrent version is kept before S3 removes it."
  type        = number
}

variable "abort_incomplete_multipart_upload_days" {
  description = "Days after which incomplete multipart uploads are aborted."
  type        = number
}

variable "object_lock_mode" {
  description = "null (no Object Lock), GOVERNANCE or COMPLIANCE."
  type        = string
  default     = null
}

variable "object_lock_retention_days" {
  description = "Default Object Lock retention in days when object_lock_mode is set."
  type        = number
}

variable "access_log_retention_days" {
  description = "Days S3 server access logs are kept."
  type        = number
}

variable "force_destroy" {
  description = "Allow deleting non-empty buckets on destroy."
  type        = bool
  default     = false
}

variable "replication" {
  description = <<-EOT
    null: this bucket replicates nowhere (the DR bucket, which is the destination). Otherwise S3
    replicates every object below <repository_prefix>/ to destination_bucket_arn, re-encrypted with
    replica_kms_key_arn, using role_arn. role_policy_id and destination_versioning are passed so that
    replication is configured only once the role can act and the destination is versioned.
  EOT
  type = object({
    role_arn                 = string
    role_policy_id           = string
    destination_bucket_arn   = string
    destination_versioning   = string
    replica_kms_key_arn      = string
    replicate_delete_markers = bool
    replication_time_control = bool
  })
  default = null
}
