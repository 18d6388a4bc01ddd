# S3 replication: every object the agent writes below <prefix>/ in the primary bucket is copied by S3
# to the DR bucket, re-encrypted there with the DR replica of the backup key.
#
# Delete markers: NOT replicated by default (var.replicate_delete_markers = false). A delete in the
# primary region -- by the agent's retention, by mistake, or by an attacker holding the primary's
# credentials -- does not hide the DR copy. The agent applies retention to the DR bucket itself (it has
# DeleteObject there) and the 7-year lifecycle expiry is the backstop. Deletes of a specific version are
# never replicated by S3.
#
# The replication configuration itself is part of the primary bucket's module (var.replication in
# s3.tf), next to the bucket it configures; this file holds the role S3 replicates with.
#
# Replication is one-way. After a failover, agents in the DR region write to the DR bucket (their
# repository.url); add a reverse rule if the service is to stay in the DR region for long.

data "aws_iam_policy_document" "replication_assume" {
  provider = aws.primary

  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["s3.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

data "aws_iam_policy_document" "replication" {
  provider = aws.primary

  statement {
    sid       = "ReadSourceReplicationConfiguration"
    effect    = "Allow"
    actions   = ["s3:GetReplicationConfiguration", "s3:ListBucket"]
    resources = [module.primary_bucket.bucket_arn]
  }

  statement {
    sid    = "ReadSourceObjectVersions"
    effect = "Allow"
    actions = [
      "s3:GetObjectVersionForReplication",
      "s3:GetObjectVersionAcl",
      "s3:GetObjectVersionTagging",
      "s3:GetObjectRetention",
      "s3:GetObjectLegalHold",
    ]
    # Objects below the repository prefix only.
    resources = ["${module.primary_bucket.bucket_arn}/${local.repository_prefix}/*"]
  }

  statement {
    sid    = "WriteReplicasToDr"
    effect = "Allow"
    actions = [
      "s3:ReplicateObject",
      "s3:ReplicateDelete",
      "s3:ReplicateTags",
    ]
    # Objects below the repository prefix only.
    resources = ["${module.dr_bucket.bucket_arn}/${local.repository_prefix}/*"]
  }

  statement {
    sid       = "DecryptSourceObjects"
    effect    = "Allow"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.backup.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.primary_region}.amazonaws.com"]
    }

    condition {
      test     = "StringLike"
      variable = "kms:EncryptionContext:aws:s3:arn"
      # With S3 Bucket Keys the encryption context is the bucket ARN; without, the object ARN.
      values = [
        module.primary_bucket.bucket_arn,
        "${module.primary_bucket.bucket_arn}/${local.repository_prefix}/*", # objects below the prefix
      ]
    }
  }

  statement {
    sid       = "EncryptReplicas"
    effect    = "Allow"
    actions   = ["kms:Encrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_replica_key.backup_dr.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.dr_region}.amazonaws.com"]
    }

    condition {
      test     = "StringLike"
      variable = "kms:EncryptionContext:aws:s3:arn"
      values = [
        module.dr_bucket.bucket_arn,
        "${module.dr_bucket.bucket_arn}/${local.repository_prefix}/*", # objects below the prefix
      ]
    }
  }
}

resource "aws_iam_role" "replication" {
  provider = aws.primary

  name                 = "${local.name}-backup-replication"
  description          = "S3 replication of kybdr-agent backups from ${var.primary_region} to ${var.dr_region}"
  assume_role_policy   = data.aws_iam_policy_document.replication_assume.json
  permissions_boundary = var.iam_permissions_boundary_arn

  lifecycle {
    precondition {
      condition     = var.primary_region != var.dr_region
      error_message = "dr_region must differ from primary_region: a DR copy in the same region protects against nothing regional."
    }
  }
}

resource "aws_iam_role_policy" "replication" {
  provider = aws.primary

  name   = "backup-replication"
  role   = aws_iam_role.replication.id
  policy = data.aws_iam_policy_document.replication.json
}
