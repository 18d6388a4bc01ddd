# Route53: health checks on the primary and DR endpoints, optional automatic failover records for the
# service's public name, and the record the agent itself switches on failover and failback.
#
# Two different mechanisms, on two different names:
#   failover_domain  (optional) PRIMARY/SECONDARY failover records. Route53's own health checkers
#                    choose the target, in its data plane, without the agent -- the seed's "Route53
#                    failover configuration". Suits stateless front ends.
#   route53_domain   (dr.route53_domain) a plain alias record the agent UPSERTs once it has fenced the
#                    old primary and promoted the standby -- so traffic moves only when the database
#                    has moved. Terraform creates it pointing at the primary load balancer and from then
#                    on ignores its target, so an apply after a failover never undoes the failover.

resource "aws_route53_health_check" "primary" {
  provider = aws.primary

  type              = var.health_check_protocol
  fqdn              = local.primary_health_check_fqdn
  port              = var.health_check_port
  resource_path     = var.health_check_path
  failure_threshold = var.health_check_failure_threshold
  request_interval  = var.health_check_request_interval
  measure_latency   = true
  enable_sni        = var.health_check_protocol == "HTTPS"

  tags = {
    Name = "${local.name}-primary-${var.primary_region}"
  }
}

resource "aws_route53_health_check" "dr" {
  provider = aws.primary

  type              = var.health_check_protocol
  fqdn              = local.dr_health_check_fqdn
  port              = var.health_check_port
  resource_path     = var.health_check_path
  failure_threshold = var.health_check_failure_threshold
  request_interval  = var.health_check_request_interval
  measure_latency   = true
  enable_sni        = var.health_check_protocol == "HTTPS"

  tags = {
    Name = "${local.name}-dr-${var.dr_region}"
  }
}

resource "aws_route53_record" "failover_primary" {
  count    = var.failover_domain == null ? 0 : 1
  provider = aws.primary

  zone_id         = var.route53_zone_id
  name            = var.failover_domain
  type            = "A"
  set_identifier  = "${local.name}-primary"
  health_check_id = aws_route53_health_check.primary.id

  failover_routing_policy {
    type = "PRIMARY"
  }

  alias {
    name                   = data.aws_lb.primary.dns_name
    zone_id                = data.aws_lb.primary.zone_id
    evaluate_target_health = true
  }
}

resource "aws_route53_record" "failover_secondary" {
  count    = var.failover_domain == null ? 0 : 1
  provider = aws.primary

  zone_id         = var.route53_zone_id
  name            = var.failover_domain
  type            = "A"
  set_identifier  = "${local.name}-dr"
  health_check_id = aws_route53_health_check.dr.id

  failover_routing_policy {
    type = "SECONDARY"
  }

  alias {
    name                   = data.aws_lb.dr.dns_name
    zone_id                = data.aws_lb.dr.zone_id
    evaluate_target_health = true
  }
}

# The record the agent switches (dr.route53_domain). The agent's IAM policy allows UPSERT of exactly
# this name and type (iam.tf).
resource "aws_route53_record" "switched" {
  provider = aws.primary

  zone_id = var.route53_zone_id
  name    = var.route53_domain
  type    = "A"

  alias {
    name                   = data.aws_lb.primary.dns_name
    zone_id                = data.aws_lb.primary.zone_id
    evaluate_target_health = true
  }

  lifecycle {
    # After creation the target belongs to the agent: it points this record at the DR load balancer on
    # failover and back on failback. Without this, the next apply would silently fail the service back.
    ignore_changes = [alias]

    precondition {
      condition     = var.failover_domain == null ? true : lower(trimsuffix(var.failover_domain, ".")) != local.switched_record_name
      error_message = "failover_domain and route53_domain must be different names: Route53 cannot hold failover records and a plain record under one name."
    }
  }
}
