# Customer-managed KMS keys.
#
# backup / backup_dr: one multi-Region key and its replica in the DR region. They encrypt the backup
#   buckets (SSE-KMS with S3 Bucket Keys), the AWS Backup vaults and the replicated RDS automated
#   backups, and they are the agent's envelope key (encryption.kms_key_id): the agent wraps each
#   backup's data key with GenerateDataKey. Because the replica shares the key material and key ID,
#   a data key wrapped in the primary region can be unwrapped in the DR region when the primary region
#   is gone -- which is the point of a DR copy.
# alerts / alerts_dr: encrypt the SNS alert topics. Separate from the backup key so that CloudWatch
#   and AWS Backup, which must be allowed to use the topic key, get no access to backup data.
#
# Key policies: in a key policy, "Resource": "*" means "this key" -- it is the only value AWS
# accepts there. Each policy keeps AWS's default account-root statement, which is what lets IAM
# policies (the agent's, the replication role's, administrators') grant use of the key; without it
# the key could become unmanageable.

data "aws_iam_policy_document" "backup_key" {
  provider = aws.primary
  # checkov reads key policies as identity policies. In a key policy "Resource": "*" is the key itself
  # and the account-root statement is AWS's default, so these three findings do not apply:
  #checkov:skip=CKV_AWS_111:Key policy, not an identity policy: Resource "*" is this key only, and the root statement delegates to IAM.
  #checkov:skip=CKV_AWS_356:Key policy: "*" is the only Resource value AWS accepts and it means this key.
  #checkov:skip=CKV_AWS_109:Key policy: the account-root statement is AWS's default; permission management stays with this account's IAM.

  statement {
    sid     = "EnableIamPoliciesForThisAccount"
    effect  = "Allow"
    actions = ["kms:*"] # AWS's default root statement: delegates every permission on this key to IAM in this account.
    # In a key policy "*" is this key.
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }
}

resource "aws_kms_key" "backup" {
  provider = aws.primary

  description             = "${local.name}: backup data (S3 SSE-KMS, agent envelope key, AWS Backup, RDS) - multi-Region primary"
  key_usage               = "ENCRYPT_DECRYPT"
  multi_region            = true
  enable_key_rotation     = true
  deletion_window_in_days = var.kms_deletion_window_days
  policy                  = data.aws_iam_policy_document.backup_key.json
}

resource "aws_kms_alias" "backup" {
  provider = aws.primary

  name          = "alias/${local.name}-backup"
  target_key_id = aws_kms_key.backup.key_id
}

resource "aws_kms_replica_key" "backup_dr" {
  provider = aws.dr

  description             = "${local.name}: backup data - multi-Region replica in the DR region"
  primary_key_arn         = aws_kms_key.backup.arn
  deletion_window_in_days = var.kms_deletion_window_days
  policy                  = data.aws_iam_policy_document.backup_key.json
}

resource "aws_kms_alias" "backup_dr" {
  provider = aws.dr

  name          = "alias/${local.name}-backup"
  target_key_id = aws_kms_replica_key.backup_dr.key_id
}

# The alert topic keys: CloudWatch alarms and AWS Backup notifications publish to encrypted topics, so
# those two services need GenerateDataKey and Decrypt on the topic key (the AWS-managed aws/sns key
# cannot grant them that).
data "aws_iam_policy_document" "alerts_key" {
  provider = aws.primary
  # checkov reads key policies as identity policies. In a key policy "Resource": "*" is the key itself
  # and the account-root statement is AWS's default, so these three findings do not apply:
  #checkov:skip=CKV_AWS_111:Key policy, not an identity policy: Resource "*" is this key only, and the root statement delegates to IAM.
  #checkov:skip=CKV_AWS_356:Key policy: "*" is the only Resource value AWS accepts and it means this key.
  #checkov:skip=CKV_AWS_109:Key policy: the account-root statement is AWS's default; permission management stays with this account's IAM.

  statement {
    sid     = "EnableIamPoliciesForThisAccount"
    effect  = "Allow"
    actions = ["kms:*"] # AWS's default root statement: delegates every permission on this key to IAM in this account.
    # In a key policy "*" is this key.
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid       = "AllowAlarmAndBackupNotificationsToEncryptedTopics"
    effect    = "Allow"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = ["*"] # In a key policy "*" is this key.

    # AWS's documented form for alarms and vault notifications: no condition, because SNS makes these
    # KMS calls on the services' behalf. Which topics they may publish to is decided by the topic
    # policies (sns.tf); this key encrypts nothing but those topics.
    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com", "backup.amazonaws.com"]
    }
  }
}

resource "aws_kms_key" "alerts" {
  provider = aws.primary

  description             = "${local.name}: SNS alert topic (primary region)"
  enable_key_rotation     = true
  deletion_window_in_days = var.kms_deletion_window_days
  policy                  = data.aws_iam_policy_document.alerts_key.json
}

resource "aws_kms_alias" "alerts" {
  provider = aws.primary

  name          = "alias/${local.name}-alerts"
  target_key_id = aws_kms_key.alerts.key_id
}

resource "aws_kms_key" "alerts_dr" {
  provider = aws.dr

  description             = "${local.name}: SNS alert topic (DR region)"
  enable_key_rotation     = true
  deletion_window_in_days = var.kms_deletion_window_days
  policy                  = data.aws_iam_policy_document.alerts_key.json
}

resource "aws_kms_alias" "alerts_dr" {
  provider = aws.dr

  name          = "alias/${local.name}-alerts"
  target_key_id = aws_kms_key.alerts_dr.key_id
}
