# Terraform and provider versions.
#
# State is kept locally by default so that the three documented commands work on a fresh checkout
# (`terraform init`, `terraform plan -var-file=environments/production.tfvars`, `terraform apply ...`).
# A platform team will usually add a remote backend here, for example:
#
#   backend "s3" {
#     bucket         = "my-terraform-state"
#     key            = "kybdr-agent/production.tfstate"
#     region         = "us-east-1"
#     dynamodb_table = "terraform-locks"   # or use_lockfile = true on Terraform >= 1.10
#     encrypt        = true
#   }
terraform {
  # 1.5: preconditions/postconditions and optional() object attributes are used throughout.
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.x: the split S3 bucket resources (aws_s3_bucket_*), aws_kms_replica_key, partitioned
      # access-log keys and aws_db_instance_automated_backups_replication all exist in this line.
      version = ">= 5.40.0, < 6.0.0"
    }
  }
}
