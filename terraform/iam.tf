# The agent's identity: a role (with an instance profile for EC2 hosts) and a least-privilege policy
# holding exactly the calls the agent makes, on exactly the resources it makes them on:
#
#   S3   CreateMultipartUpload/UploadPart/CompleteMultipartUpload (s3:PutObject), AbortMultipartUpload,
#        ListParts (s3:ListMultipartUploadParts), ListMultipartUploads (startup sweep), GetObject
#        (ranged reads, HeadObject), ListObjectsV2 (s3:ListBucket, only below the repository prefix),
#        CopyObject/UploadPartCopy to the DR bucket (GetObject on the source + PutObject on the target),
#        conditional PutObject of the DR lease <prefix>/dr/lease, DeleteObject for retention and cleanup
#        -- only of backups and of the lease, never of the audit trail or DR history.
#   KMS  GenerateDataKey and Decrypt on the backup key and its DR replica (the agent's envelope
#        encryption and SSE-KMS on the buckets); on the alert topic keys only through SNS.
#   R53  ChangeResourceRecordSets limited to the switched record (UPSERT) and the test record
#        (UPSERT, DELETE), ListResourceRecordSets on the zone, GetChange.
#   SNS  Publish to the two alert topics.
#   CW   PutMetricData to the agent's namespace only.
#   ELB  DescribeLoadBalancers (optional, see var.agent_resolves_load_balancers).

data "aws_iam_policy_document" "agent_assume" {
  provider = aws.primary

  statement {
    sid     = "AgentHosts"
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = var.agent_trusted_services
    }
  }

  dynamic "statement" {
    for_each = length(var.agent_trusted_role_arns) > 0 ? [1] : []
    content {
      sid     = "TrustedRoles"
      effect  = "Allow"
      actions = ["sts:AssumeRole"]

      principals {
        type        = "AWS"
        identifiers = var.agent_trusted_role_arns
      }
    }
  }
}

locals {
  repository_bucket_arns = [module.primary_bucket.bucket_arn, module.dr_bucket.bucket_arn]
  zone_arn               = "arn:${local.partition}:route53:::hostedzone/${var.route53_zone_id}"
}

data "aws_iam_policy_document" "agent" {
  provider = aws.primary

  # ---- S3 -----------------------------------------------------------------------------------------

  statement {
    sid       = "ListRepositoryPrefix"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = local.repository_bucket_arns

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      # Listing is allowed only at or below the repository prefix.
      values = [local.repository_prefix, "${local.repository_prefix}/*"]
    }
  }

  statement {
    # The startup sweep finds multipart uploads a killed agent left behind. ListMultipartUploads has no
    # s3:prefix condition key, so it is scoped to the two buckets only.
    sid       = "FindAbandonedUploads"
    effect    = "Allow"
    actions   = ["s3:ListBucketMultipartUploads"]
    resources = local.repository_bucket_arns
  }

  statement {
    sid    = "ReadWriteRepositoryObjects"
    effect = "Allow"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [
      "${module.primary_bucket.bucket_arn}/${local.repository_prefix}/*", # everything the agent writes lives below its prefix
      "${module.dr_bucket.bucket_arn}/${local.repository_prefix}/*",      # same prefix in the DR bucket
    ]
  }

  statement {
    sid     = "DeleteBackupsAndReleaseLease"
    effect  = "Allow"
    actions = ["s3:DeleteObject"]
    resources = [
      "${module.primary_bucket.bucket_arn}/${local.repository_prefix}/backups/*", # retention and cleanup remove whole backups
      "${module.dr_bucket.bucket_arn}/${local.repository_prefix}/backups/*",      # same in the DR bucket
      "${module.dr_bucket.bucket_arn}/${local.repository_prefix}/dr/lease",
    ]
  }

  # ---- KMS ----------------------------------------------------------------------------------------

  statement {
    sid    = "UseBackupKeys"
    effect = "Allow"
    # Encrypt: `kybdr-agent key rotate` re-wraps data keys of file-key backups under the KMS key.
    actions = ["kms:GenerateDataKey", "kms:Decrypt", "kms:Encrypt"]
    resources = [
      aws_kms_key.backup.arn,
      aws_kms_replica_key.backup_dr.arn,
    ]
  }

  statement {
    sid       = "UseAlertTopicKeysThroughSns"
    effect    = "Allow"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.alerts.arn, aws_kms_key.alerts_dr.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["sns.${var.primary_region}.amazonaws.com", "sns.${var.dr_region}.amazonaws.com"]
    }
  }

  # ---- Route53 ------------------------------------------------------------------------------------

  statement {
    sid       = "SwitchServiceRecord"
    effect    = "Allow"
    actions   = ["route53:ChangeResourceRecordSets"]
    resources = [local.zone_arn]

    condition {
      test     = "ForAllValues:StringEquals"
      variable = "route53:ChangeResourceRecordSetsNormalizedRecordNames"
      values   = [local.switched_record_name]
    }

    condition {
      test     = "ForAllValues:StringEquals"
      variable = "route53:ChangeResourceRecordSetsRecordTypes"
      values   = ["A"]
    }

    condition {
      test     = "ForAllValues:StringEquals"
      variable = "route53:ChangeResourceRecordSetsActions"
      values   = ["UPSERT"]
    }
  }

  statement {
    sid       = "WriteTestFailoverRecord"
    effect    = "Allow"
    actions   = ["route53:ChangeResourceRecordSets"]
    resources = [local.zone_arn]

    condition {
      test     = "ForAllValues:StringEquals"
      variable = "route53:ChangeResourceRecordSetsNormalizedRecordNames"
      values   = [local.test_record_name]
    }

    condition {
      test     = "ForAllValues:StringEquals"
      variable = "route53:ChangeResourceRecordSetsRecordTypes"
      values   = ["A"]
    }

    condition {
      test     = "ForAllValues:StringEquals"
      variable = "route53:ChangeResourceRecordSetsActions"
      values   = ["UPSERT", "DELETE"]
    }
  }

  statement {
    sid       = "ReadZoneRecords"
    effect    = "Allow"
    actions   = ["route53:ListResourceRecordSets"]
    resources = [local.zone_arn]
  }

  statement {
    sid     = "WaitForDnsChange"
    effect  = "Allow"
    actions = ["route53:GetChange"]
    # Change IDs are created by each ChangeResourceRecordSets call and cannot be known in advance.
    resources = ["arn:${local.partition}:route53:::change/*"]
  }

  # ---- SNS ----------------------------------------------------------------------------------------

  statement {
    sid       = "PublishAlerts"
    effect    = "Allow"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alerts.arn, aws_sns_topic.alerts_dr.arn]
  }

  # ---- CloudWatch ---------------------------------------------------------------------------------

  statement {
    sid     = "PublishAgentMetrics"
    effect  = "Allow"
    actions = ["cloudwatch:PutMetricData"]
    # PutMetricData supports no resource-level permissions: "*" is the only accepted resource. The
    # namespace condition below is what limits it to the agent's own metrics.
    resources = ["*"]

    condition {
      test     = "StringEquals"
      variable = "cloudwatch:namespace"
      values   = [var.metrics_namespace]
    }
  }

  # ---- Elastic Load Balancing (optional) ----------------------------------------------------------

  dynamic "statement" {
    for_each = var.agent_resolves_load_balancers ? [1] : []
    content {
      sid     = "ResolveLoadBalancerAliasTargets"
      effect  = "Allow"
      actions = ["elasticloadbalancing:DescribeLoadBalancers"]
      # Describe* calls of Elastic Load Balancing support no resource-level permissions: "*" is the
      # only accepted resource. The call is read-only and limited to the two regions below.
      resources = ["*"]

      condition {
        test     = "StringEquals"
        variable = "aws:RequestedRegion"
        values   = [var.primary_region, var.dr_region]
      }
    }
  }
}

resource "aws_iam_role" "agent" {
  provider = aws.primary

  name                 = "${local.name}-agent"
  description          = "kybdr-agent on the PostgreSQL hosts: backups to S3, DR failover through Route53"
  assume_role_policy   = data.aws_iam_policy_document.agent_assume.json
  permissions_boundary = var.iam_permissions_boundary_arn
}

resource "aws_iam_policy" "agent" {
  provider = aws.primary

  name        = "${local.name}-agent"
  description = "Least privilege for kybdr-agent: its repository prefix in two buckets, two KMS keys, one Route53 record, the alert topics and its metrics namespace"
  policy      = data.aws_iam_policy_document.agent.json
}

resource "aws_iam_role_policy_attachment" "agent" {
  provider = aws.primary

  role       = aws_iam_role.agent.name
  policy_arn = aws_iam_policy.agent.arn
}

resource "aws_iam_instance_profile" "agent" {
  provider = aws.primary

  name = "${local.name}-agent"
  role = aws_iam_role.agent.name
}
