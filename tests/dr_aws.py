"""The AWS side of a DR deployment on moto_server: a hosted zone, a load balancer in each region, and the
switched record aliasing the primary one, as terraform creates it. Shared by the DNS tests, the IAM test, the
end-to-end DR harness and the failover benchmark."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import boto3

from kybdr_agent.dr.dns import record_name
from tests.support import MotoServer

PRIMARY_REGION = "us-east-1"
DR_REGION = "us-west-2"
REGIONS = {"primary": PRIMARY_REGION, "dr": DR_REGION}


def aws(moto: MotoServer, service: str, region: str = PRIMARY_REGION) -> Any:
    return boto3.client(
        service,
        endpoint_url=moto.endpoint,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@dataclass
class World:
    moto: MotoServer
    zone_id: str
    domain: str
    arns: dict[str, str]
    dns_names: dict[str, str]
    zone_ids: dict[str, str]

    def alias(self, place: str) -> dict[str, Any]:
        return {"DNSName": self.dns_names[place], "HostedZoneId": self.zone_ids[place], "EvaluateTargetHealth": True}

    def records(self) -> list[dict[str, Any]]:
        route53 = aws(self.moto, "route53")
        records: list[dict[str, Any]] = route53.list_resource_record_sets(HostedZoneId=self.zone_id)[
            "ResourceRecordSets"
        ]
        return records

    def record(self, name: str) -> dict[str, Any] | None:
        matches = [r for r in self.records() if record_name(r["Name"]) == name and r["Type"] == "A"]
        return matches[0] if matches else None

    def target(self, name: str | None = None) -> str | None:
        """Which load balancer ("primary", "dr") the record ``name`` (default: the switched one) aliases."""
        record = self.record(record_name(name or self.domain))
        if record is None:
            return None
        alias = record.get("AliasTarget", {}).get("DNSName", "").rstrip(".").lower().removeprefix("dualstack.")
        for place, dns_name in self.dns_names.items():
            if alias == dns_name.rstrip(".").lower():
                return place
        return alias


def build_world(moto: MotoServer, *, switched_record: bool = True) -> World:
    """A zone, two ALBs in two regions, and (as terraform creates it) the switched record → primary."""
    tag = secrets.token_hex(4)
    zone_name = f"kybdr-{tag}.example.com"
    route53 = aws(moto, "route53")
    # The bare id, as a configuration names it (the agent's config refuses the "/hostedzone/" form).
    zone_id = route53.create_hosted_zone(Name=zone_name + ".", CallerReference=tag)["HostedZone"]["Id"]
    zone_id = zone_id.removeprefix("/hostedzone/")
    arns, names, zones = {}, {}, {}
    for place, region in REGIONS.items():
        ec2 = aws(moto, "ec2", region)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        zones_available = [z["ZoneName"] for z in ec2.describe_availability_zones()["AvailabilityZones"]][:2]
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=az)["Subnet"]["SubnetId"]
            for i, az in enumerate(zones_available)
        ]
        lb = aws(moto, "elbv2", region).create_load_balancer(Name=f"kybdr-{place}-{tag}", Subnets=subnets)
        lb = lb["LoadBalancers"][0]
        arns[place], names[place], zones[place] = lb["LoadBalancerArn"], lb["DNSName"], lb["CanonicalHostedZoneId"]
    world = World(moto, zone_id, f"db.{zone_name}", arns, names, zones)
    if switched_record:
        upsert(world, world.domain, world.alias("primary"))
    return world


def upsert(world: World, name: str, alias: dict[str, Any]) -> None:
    aws(world.moto, "route53").change_resource_record_sets(
        HostedZoneId=world.zone_id,
        ChangeBatch={
            "Changes": [{"Action": "UPSERT", "ResourceRecordSet": {"Name": name, "Type": "A", "AliasTarget": alias}}]
        },
    )
