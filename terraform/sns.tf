# Alert topics, one per region, encrypted with customer-managed keys (kms.tf). The agent publishes its
# alerts to the topic of its region (notify.sns_topic_arn); the CloudWatch alarms of each region and
# the AWS Backup vault notifications publish to the same topic. A topic per region keeps alerts flowing
# from the DR region when the primary region is impaired -- exactly when they matter.

resource "aws_sns_topic" "alerts" {
  provider = aws.primary

  name              = "${local.name}-alerts"
  display_name      = "${var.project} ${var.environment} backup/DR alerts"
  kms_master_key_id = aws_kms_key.alerts.arn
}

resource "aws_sns_topic" "alerts_dr" {
  provider = aws.dr

  name              = "${local.name}-alerts"
  display_name      = "${var.project} ${var.environment} backup/DR alerts (DR region)"
  kms_master_key_id = aws_kms_key.alerts_dr.arn
}

locals {
  alert_topic_arns = {
    primary = aws_sns_topic.alerts.arn
    dr      = aws_sns_topic.alerts_dr.arn
  }

  alert_subscriptions = { for s in var.alert_subscriptions : "${s.protocol}:${s.endpoint}" => s }
}

# The agent publishes through its IAM policy (same account), so the topic policy only needs to let the
# two AWS services in, and to refuse unencrypted transport.
data "aws_iam_policy_document" "alerts_topic" {
  for_each = local.alert_topic_arns
  provider = aws.primary

  statement {
    sid       = "AllowCloudWatchAlarmsOfThisAccount"
    effect    = "Allow"
    actions   = ["sns:Publish"]
    resources = [each.value]

    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }

  statement {
    sid       = "AllowAwsBackupVaultNotifications"
    effect    = "Allow"
    actions   = ["sns:Publish"]
    resources = [each.value]

    principals {
      type        = "Service"
      identifiers = ["backup.amazonaws.com"]
    }
  }

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["sns:Publish"]
    resources = [each.value]

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

resource "aws_sns_topic_policy" "alerts" {
  provider = aws.primary

  arn    = aws_sns_topic.alerts.arn
  policy = data.aws_iam_policy_document.alerts_topic["primary"].json
}

resource "aws_sns_topic_policy" "alerts_dr" {
  provider = aws.dr

  arn    = aws_sns_topic.alerts_dr.arn
  policy = data.aws_iam_policy_document.alerts_topic["dr"].json
}

resource "aws_sns_topic_subscription" "alerts" {
  for_each = local.alert_subscriptions
  provider = aws.primary

  topic_arn = aws_sns_topic.alerts.arn
  protocol  = each.value.protocol
  endpoint  = each.value.endpoint
}

resource "aws_sns_topic_subscription" "alerts_dr" {
  for_each = local.alert_subscriptions
  provider = aws.dr

  topic_arn = aws_sns_topic.alerts_dr.arn
  protocol  = each.value.protocol
  endpoint  = each.value.endpoint
}
