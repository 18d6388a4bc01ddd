output "bucket_id" {
  description = "Name of the backup bucket."
  value       = aws_s3_bucket.this.id
}

output "bucket_arn" {
  description = "ARN of the backup bucket."
  value       = aws_s3_bucket.this.arn
}

output "log_bucket_id" {
  description = "Name of the bucket that receives the backup bucket's S3 server access logs."
  value       = aws_s3_bucket.logs.id
}

output "log_bucket_arn" {
  description = "ARN of the access-log bucket."
  value       = aws_s3_bucket.logs.arn
}

output "versioning_status" {
  description = "Versioning status of the backup bucket; replication must wait for it to be Enabled."
  value       = aws_s3_bucket_versioning.this.versioning_configuration[0].status
}

output "replication_rule_id" {
  description = "ID of the replication rule (for S3 replication metrics), or null when this bucket does not replicate."
  value       = var.replication == null ? null : "backups-to-dr-region"
}
