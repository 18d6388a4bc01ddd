# One regional backup bucket for the kybdr agent, and the bucket that receives its access logs.
#
# The backup bucket: versioned, SSE-KMS with a customer-managed key (S3 Bucket Keys on), every kind of
# public access blocked, ACLs disabled, TLS 1.2+ only, lifecycle (Standard-IA, then Glacier, expiry of
# backups after 7 years, cleanup of noncurrent versions, delete markers and abandoned multipart
# uploads), optional Object Lock, server access logging and EventBridge notifications.
#
# The root module instantiates this twice, once per region (see ../../s3.tf).

locals {
  log_bucket_name = "${var.bucket_name}-logs"
  backups_prefix  = "${var.repository_prefix}/backups/"
  access_log_path = "s3-access-logs/"
  object_lock_on  = var.object_lock_mode != null
}

# --------------------------------------------------------------------------------------------------
# The backup bucket
# --------------------------------------------------------------------------------------------------

resource "aws_s3_bucket" "this" {
  bucket        = var.bucket_name
  force_destroy = var.force_destroy

  # Object Lock can only be turned on when the bucket is created: changing object_lock_mode from
  # null to a mode replaces the bucket.
  object_lock_enabled = local.object_lock_on

  tags = {
    Name       = var.bucket_name
    RegionRole = var.region_role
    Purpose    = "kybdr-agent backups"
  }

  lifecycle {
    precondition {
      condition     = length(local.log_bucket_name) <= 63
      error_message = "Bucket name ${var.bucket_name} is too long: its access-log bucket <name>-logs must fit S3's 63 characters. Shorten project/environment or set the bucket name variables."
    }
  }
}

resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    # ACLs disabled: the bucket owner owns every object, including replicas.
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket = aws_s3_bucket.this.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    # One KMS call per bucket key instead of per object: cheaper and no KMS throttling when the agent
    # uploads many parts at once.
    bucket_key_enabled = true
  }
}

data "aws_iam_policy_document" "this" {
  statement {
    sid    = "DenyInsecureTransport"
    effect = "Deny"
    # A deny on every S3 action and principal is the point: plain HTTP is refused for everyone.
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.this.arn,
      "${aws_s3_bucket.this.arn}/*", # every object in this bucket
    ]

    principals {
      type        = "*"   # deny applies to every principal
      identifiers = ["*"] # every principal, denied
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid    = "DenyOutdatedTls"
    effect = "Deny"
    # Same scope as above: no one may use TLS older than 1.2.
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.this.arn,
      "${aws_s3_bucket.this.arn}/*", # every object in this bucket
    ]

    principals {
      type        = "*"   # deny applies to every principal
      identifiers = ["*"] # every principal, denied
    }

    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket = aws_s3_bucket.this.id
  policy = data.aws_iam_policy_document.this.json

  # S3 rejects a bucket policy while the public access block is being created.
  depends_on = [aws_s3_bucket_public_access_block.this]
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  # The 7-year backstop behind the agent's own retention. Manifests and data objects alike, so a
  # backup never loses its manifest before its data.
  rule {
    id     = "expire-backups"
    status = "Enabled"

    filter {
      prefix = local.backups_prefix
    }

    expiration {
      days = var.expiration_days
    }
  }

  # Cost tiers for the large data objects only: manifests (small JSON) stay in S3 Standard so that
  # listing, validating and choosing a backup never needs a Glacier restore.
  rule {
    id     = "tier-backups"
    status = "Enabled"

    filter {
      and {
        prefix                   = local.backups_prefix
        object_size_greater_than = var.transition_min_object_size_bytes
      }
    }

    transition {
      days          = var.transition_to_ia_days
      storage_class = "STANDARD_IA"
    }

    transition {
      days          = var.transition_to_glacier_days
      storage_class = var.glacier_storage_class
    }
  }

  # Whole bucket: parts of uploads a killed agent never completed, versions the agent's retention (or
  # anyone) replaced or deleted once their undo window has passed (Object Lock still protects locked
  # versions until their retention ends), and delete markers left with no version behind them.
  rule {
    id     = "housekeeping"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_upload_days
    }

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }

    expiration {
      expired_object_delete_marker = true
    }
  }

  # Lifecycle rules on a bucket without versioning would behave differently.
  depends_on = [aws_s3_bucket_versioning.this]

  lifecycle {
    precondition {
      condition     = var.transition_to_glacier_days >= var.transition_to_ia_days + 30
      error_message = "transition_to_glacier_days must be at least transition_to_ia_days + 30: S3 keeps objects in Standard-IA for 30 days before the next transition."
    }
  }
}

resource "aws_s3_bucket_object_lock_configuration" "this" {
  count = local.object_lock_on ? 1 : 0

  bucket = aws_s3_bucket.this.id

  rule {
    default_retention {
      mode = var.object_lock_mode
      days = var.object_lock_retention_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

resource "aws_s3_bucket_logging" "this" {
  bucket = aws_s3_bucket.this.id

  target_bucket = aws_s3_bucket.logs.id
  target_prefix = local.access_log_path

  target_object_key_format {
    partitioned_prefix {
      partition_date_source = "EventTime"
    }
  }

  depends_on = [aws_s3_bucket_policy.logs]
}

# Object-level events go to EventBridge (no cost until a rule consumes them), so a team can react to
# deletes or replication failures without changing this configuration.
resource "aws_s3_bucket_notification" "this" {
  bucket      = aws_s3_bucket.this.id
  eventbridge = true
}

# --------------------------------------------------------------------------------------------------
# The access-log bucket (same region: S3 delivers server access logs only within a region)
# --------------------------------------------------------------------------------------------------

resource "aws_s3_bucket" "logs" {
  #checkov:skip=CKV_AWS_18:This is the access-log target; logging it into itself (or a third bucket) would loop or only move the problem.
  #checkov:skip=CKV_AWS_144:Access logs describe requests in this region; they are not backup data and are not replicated.
  #checkov:skip=CKV_AWS_145:S3 server access log delivery supports only SSE-S3 (AES256) default encryption on the target bucket, not SSE-KMS.
  #checkov:skip=CKV2_AWS_62:Nothing reacts to access-log objects arriving; event notifications would only add noise.
  bucket        = local.log_bucket_name
  force_destroy = var.force_destroy

  tags = {
    Name       = local.log_bucket_name
    RegionRole = var.region_role
    Purpose    = "kybdr-agent backup bucket access logs"
  }
}

resource "aws_s3_bucket_ownership_controls" "logs" {
  bucket = aws_s3_bucket.logs.id

  rule {
    # With ACLs disabled, log delivery is authorised by the bucket policy below.
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "logs" {
  bucket = aws_s3_bucket.logs.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "logs" {
  bucket = aws_s3_bucket.logs.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id

  rule {
    apply_server_side_encryption_by_default {
      # The only default encryption S3 server access log delivery supports.
      sse_algorithm = "AES256"
    }
  }
}

data "aws_iam_policy_document" "logs" {
  statement {
    sid     = "AllowS3ServerAccessLogDelivery"
    effect  = "Allow"
    actions = ["s3:PutObject"]
    # Log objects are written below the access-log prefix only.
    resources = ["${aws_s3_bucket.logs.arn}/${local.access_log_path}*"]

    principals {
      type        = "Service"
      identifiers = ["logging.s3.amazonaws.com"]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = [aws_s3_bucket.this.arn]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }

  statement {
    sid    = "DenyInsecureTransport"
    effect = "Deny"
    # A deny on every S3 action and principal is the point: plain HTTP is refused for everyone.
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.logs.arn,
      "${aws_s3_bucket.logs.arn}/*", # every object in this bucket
    ]

    principals {
      type        = "*"   # deny applies to every principal
      identifiers = ["*"] # every principal, denied
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

data "aws_caller_identity" "current" {}

resource "aws_s3_bucket_policy" "logs" {
  bucket = aws_s3_bucket.logs.id
  policy = data.aws_iam_policy_document.logs.json

  depends_on = [aws_s3_bucket_public_access_block.logs]
}

resource "aws_s3_bucket_lifecycle_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id

  rule {
    id     = "expire-access-logs"
    status = "Enabled"

    filter {}

    expiration {
      days = var.access_log_retention_days
    }

    noncurrent_version_expiration {
      noncurrent_days = 7
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  depends_on = [aws_s3_bucket_versioning.logs]
}

# --------------------------------------------------------------------------------------------------
# Replication to the other region (source side only; see ../../replication.tf for the role)
# --------------------------------------------------------------------------------------------------

resource "aws_s3_bucket_replication_configuration" "this" {
  count = var.replication == null ? 0 : 1

  role   = var.replication.role_arn
  bucket = aws_s3_bucket.this.id

  rule {
    id       = "backups-to-dr-region"
    status   = "Enabled"
    priority = 1

    filter {
      prefix = "${var.repository_prefix}/"
    }

    # Not replicated by default: a delete in this region never hides the copy in the other one.
    delete_marker_replication {
      status = var.replication.replicate_delete_markers ? "Enabled" : "Disabled"
    }

    source_selection_criteria {
      # Every object is SSE-KMS (bucket default); without this S3 would skip them all.
      sse_kms_encrypted_objects {
        status = "Enabled"
      }
    }

    destination {
      bucket        = var.replication.destination_bucket_arn
      storage_class = "STANDARD"

      encryption_configuration {
        replica_kms_key_id = var.replication.replica_kms_key_arn
      }

      dynamic "replication_time" {
        for_each = var.replication.replication_time_control ? [1] : []
        content {
          status = "Enabled"
          time {
            minutes = 15
          }
        }
      }

      dynamic "metrics" {
        for_each = var.replication.replication_time_control ? [1] : []
        content {
          status = "Enabled"
          event_threshold {
            minutes = 15
          }
        }
      }
    }
  }

  # Replication requires versioning on the source (here) and on the destination (precondition).
  depends_on = [aws_s3_bucket_versioning.this]

  lifecycle {
    precondition {
      condition     = var.replication.destination_versioning == "Enabled"
      error_message = "The replication destination bucket must have versioning enabled."
    }
    precondition {
      condition     = var.replication.role_policy_id != ""
      error_message = "The replication role needs its permissions policy before replication is configured."
    }
  }
}
