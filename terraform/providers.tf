# Two AWS provider configurations: the primary region, where the databases and the agent normally
# run, and the disaster-recovery region. Every resource, data source and module in this
# configuration names one of them explicitly; there is deliberately no default `aws` provider, so
# nothing can land in an unintended region.
#
# Global services (IAM, Route53) are managed through the primary configuration.

provider "aws" {
  alias  = "primary"
  region = var.primary_region

  default_tags {
    tags = local.tags
  }
}

provider "aws" {
  alias  = "dr"
  region = var.dr_region

  default_tags {
    tags = local.tags
  }
}
