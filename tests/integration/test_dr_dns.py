"""Route53Switcher against moto_server over HTTP: alias switching, INSYNC waits, the test record, faults.

The world is real moto state built through boto3: a hosted zone, a VPC with subnets and two application load
balancers (us-east-1 as the primary region, us-west-2 as the DR region), and the switched record pointing at
the primary load balancer as terraform creates it. moto answers GetChange with INSYNC at once and never
throttles, so the slow and failing control plane comes from ``Route53Proxy``: the suite's ``FaultProxy`` in
front of moto (injected throttling, 5xx, stalls) that can also hold GetChange at PENDING for a number of polls.
The calls themselves are seen through an event hook on an injected aiobotocore session.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from aiobotocore.session import AioSession, get_session

from kybdr_agent.dr.dns import (
    TEST_RECORD_LABEL,
    DnsError,
    DnsRetry,
    DnsSwitcher,
    Route53Switcher,
    alias_name,
    arn_region,
    record_name,
)
from kybdr_agent.postgres.cluster import free_port
from tests.dr_aws import DR_REGION, REGIONS, World, build_world, upsert
from tests.faultproxy import FaultProxy, _Request, fault
from tests.support import MotoServer

FAST_RETRY = DnsRetry(attempts=3, base_delay=0.02, max_delay=0.05)
HANG_GUARD = 60.0  # a broken bound shows up as a failure, not a hung suite


@pytest.fixture
def world(moto_server: MotoServer) -> World:
    return build_world(moto_server)


@dataclass
class Call:
    service: str  # the IAM prefix (the operation model's signing name)
    operation: str
    region: str
    params: dict[str, Any]


@dataclass
class Recorder:
    """Every API call a client made, as the caller's parameters, seen through the session's event hook."""

    calls: list[Call] = field(default_factory=list)

    def record(self, params: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
        service = model.service_model.signing_name
        self.calls.append(Call(service, model.name, str(context.get("client_region")), copy.deepcopy(params)))

    def session(self) -> AioSession:
        session = get_session()
        session.register("provide-client-params", self.record)
        return session

    def named(self, operation: str) -> list[Call]:
        return [c for c in self.calls if c.operation == operation]


class Route53Proxy(FaultProxy):
    """``FaultProxy`` in front of moto that can also answer the next ``pending`` GetChange polls PENDING."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.pending = 0
        self.get_changes = 0

    async def _forward(self, request: _Request, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        status, headers, answer = await super()._forward(request, body)
        if request.method == "GET" and "/change/" in request.target:
            self.get_changes += 1
            if self.pending > 0:
                self.pending -= 1
                answer = answer.replace(b"<Status>INSYNC</Status>", b"<Status>PENDING</Status>")
        return status, headers, answer


@asynccontextmanager
async def switcher(
    world: World,
    *,
    endpoint: str | None = None,
    recorder: Recorder | None = None,
    load_balancers: dict[str, str] | None = None,
    zone_id: str | None = None,
    **options: Any,
) -> AsyncIterator[Route53Switcher]:
    opened = await Route53Switcher.open(
        zone_id=zone_id or world.zone_id,
        domain=world.domain,
        load_balancers=load_balancers or world.arns,  # type: ignore[arg-type]
        regions=REGIONS,  # type: ignore[arg-type]
        endpoint_url=endpoint or world.moto.endpoint,
        sync_timeout=options.pop("sync_timeout", 10.0),
        poll_interval=options.pop("poll_interval", 0.05),
        session=recorder.session() if recorder else None,
        **options,
    )
    try:
        yield opened
    finally:
        await opened.aclose()


def run(body: Callable[[], Any]) -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(HANG_GUARD):
            return await body()

    return anyio.run(bounded)


# --------------------------------------------------------------------------------------------------
# Switching, reading, the test record
# --------------------------------------------------------------------------------------------------


def test_point_at_switches_the_alias_waits_insync_and_verifies(world: World) -> None:
    recorder = Recorder()

    async def body() -> None:
        async with switcher(world, recorder=recorder) as dns:
            assert await dns.current() == "primary"
            result = await dns.point_at("dr")
            assert result.record == world.domain
            assert result.verified
            assert result.change_id
            assert result.target.dns_name == world.dns_names["dr"]
            assert result.target.zone_id == world.zone_ids["dr"]
            assert result.submitted_s >= 0
            assert result.insync_s >= 0
            assert await dns.current() == "dr"
            assert world.record(world.domain) == {
                "Name": world.domain + ".",
                "Type": "A",
                "AliasTarget": world.alias("dr"),
            }
            back = await dns.point_at("primary")
            assert back.verified
            assert await dns.current() == "primary"
            again = await dns.point_at("primary")  # idempotent: an UPSERT to where it already points
            assert again.verified

    run(body)
    # The alias target came from ELBv2 once per load balancer (cached), in the load balancer's own region.
    describes = recorder.named("DescribeLoadBalancers")
    assert sorted((c.region, c.params["LoadBalancerArns"][0]) for c in describes) == sorted(
        (REGIONS[p], world.arns[p]) for p in REGIONS
    )
    # At least one GetChange per change even though moto says INSYNC in the change's own answer.
    assert len(recorder.named("GetChange")) >= len(recorder.named("ChangeResourceRecordSets")) == 3
    for call in recorder.named("ChangeResourceRecordSets"):
        (change,) = call.params["ChangeBatch"]["Changes"]
        assert change["Action"] == "UPSERT"
        assert change["ResourceRecordSet"]["Type"] == "A"
        assert change["ResourceRecordSet"]["AliasTarget"]["EvaluateTargetHealth"] is True
        assert call.region == "us-east-1"
    for call in recorder.named("ListResourceRecordSets"):
        assert call.params["MaxItems"] == "1"
        assert call.params["StartRecordType"] == "A"


def test_current_is_none_without_the_record_or_when_it_names_another_target(moto_server: MotoServer) -> None:
    world = build_world(moto_server, switched_record=False)
    # A record that sorts right after the switched name: the listing returns it, and it must not count.
    upsert(world, f"dba.{world.domain.split('.', 1)[1]}", world.alias("dr"))

    async def body() -> None:
        async with switcher(world) as dns:
            assert await dns.current() is None
            upsert(world, world.domain, {**world.alias("dr"), "DNSName": "elsewhere.example.net"})
            assert await dns.current() is None
            upsert(world, world.domain, {**world.alias("dr"), "DNSName": "DualStack." + world.dns_names["dr"] + "."})
            assert await dns.current() == "dr"  # Route53's dualstack prefix, case and trailing dot normalised

    run(body)


def test_test_record_is_written_verified_and_deleted_and_production_is_untouched(world: World) -> None:
    recorder = Recorder()
    before = world.records()

    async def body() -> None:
        async with switcher(world, recorder=recorder) as dns:
            for place in ("dr", "primary"):
                result, delete_s = await dns.test_record(place)  # type: ignore[arg-type]
                assert result.record == f"{TEST_RECORD_LABEL}.{world.domain}"
                assert result.verified
                assert result.target.dns_name == world.dns_names[place]
                assert delete_s >= 0
                assert world.record(result.record) is None
            assert await dns.current() == "primary"

    run(body)
    assert world.records() == before  # the production record and everything else: unchanged
    changes = [c.params["ChangeBatch"]["Changes"][0] for c in recorder.named("ChangeResourceRecordSets")]
    assert [c["Action"] for c in changes] == ["UPSERT", "DELETE", "UPSERT", "DELETE"]
    for upserted, deleted in (changes[0:2], changes[2:4]):
        assert record_name(upserted["ResourceRecordSet"]["Name"]) == f"{TEST_RECORD_LABEL}.{world.domain}"
        assert deleted["ResourceRecordSet"] == upserted["ResourceRecordSet"]  # DELETE names exactly what we wrote


def test_a_stale_test_record_from_an_interrupted_drill_is_replaced_and_removed(world: World) -> None:
    name = f"{TEST_RECORD_LABEL}.{world.domain}"
    upsert(world, name, {**world.alias("dr"), "DNSName": "left-behind.example.net"})

    async def body() -> None:
        async with switcher(world) as dns:
            result, _ = await dns.test_record("dr")
            assert result.verified

    run(body)
    assert world.record(name) is None


# --------------------------------------------------------------------------------------------------
# A slow, throttled or dead control plane
# --------------------------------------------------------------------------------------------------


def test_point_at_waits_for_insync_across_pending_polls(world: World) -> None:
    with Route53Proxy(world.moto.endpoint) as proxy:
        proxy.pending = 3

        async def body() -> None:
            async with switcher(world, endpoint=proxy.endpoint, poll_interval=0.05) as dns:
                result = await dns.point_at("dr")
                assert result.verified

        run(body)
        assert proxy.get_changes == 4  # three PENDING answers, then INSYNC


def test_a_change_that_never_gets_insync_fails_within_the_sync_timeout(world: World) -> None:
    with Route53Proxy(world.moto.endpoint) as proxy:
        proxy.pending = 10**9

        async def body() -> None:
            async with switcher(world, endpoint=proxy.endpoint, sync_timeout=0.5, poll_interval=0.05) as dns:
                with pytest.raises(DnsError, match=r"was not INSYNC within 0.5 s \(last status: PENDING\)"):
                    await dns.point_at("dr")
                # The test record is cleaned up even when its UPSERT never got INSYNC: the DELETE is
                # submitted, and its own INSYNC wait is what fails, which the error says.
                with pytest.raises(DnsError, match=r"may be left behind"):
                    await dns.test_record("dr")

        run(body)
    assert world.record(f"{TEST_RECORD_LABEL}.{world.domain}") is None


def test_a_hung_getchange_is_cut_by_the_sync_timeout(world: World) -> None:
    with Route53Proxy(world.moto.endpoint) as proxy:
        proxy.add(fault("GetObject", "stall", every=1, where="/change/"))

        async def body() -> None:
            async with switcher(world, endpoint=proxy.endpoint, sync_timeout=1.0, read_timeout=30.0) as dns:
                with pytest.raises(DnsError, match=r"was not INSYNC within 1 s \(last status: unknown\)"):
                    await dns.point_at("dr")

        run(body)


@pytest.mark.parametrize(
    ("kinds", "where", "status", "code"),
    [
        ("Other", "/rrset", 400, "Throttling"),  # ChangeResourceRecordSets throttled
        ("Other", "/rrset", 400, "PriorRequestNotComplete"),  # the previous change still being applied
        ("GetObject", "/change/", 503, "ServiceUnavailable"),  # GetChange
        ("GetObject", "/rrset", 500, "InternalError"),  # ListResourceRecordSets
    ],
)
def test_throttling_and_5xx_are_retried_a_bounded_number_of_times(
    world: World, kinds: str, where: str, status: int, code: str
) -> None:
    with Route53Proxy(world.moto.endpoint) as proxy:
        passing = proxy.add(fault(kinds, "error", every=1, limit=2, where=where, status=status, code=code))

        async def body() -> None:
            async with switcher(world, endpoint=proxy.endpoint, retry=FAST_RETRY) as dns:
                assert (await dns.point_at("dr")).verified
                proxy.remove(passing)
                proxy.add(fault(kinds, "error", every=1, where=where, status=status, code=code))
                with pytest.raises(DnsError, match=rf"failed after 3 attempts: {code}: injected by the test proxy"):
                    await dns.point_at("primary")

        run(body)
        assert passing.hits == 2


def test_elbv2_5xx_is_retried(world: World) -> None:
    with Route53Proxy(world.moto.endpoint) as proxy:
        # The switcher's first POST is DescribeLoadBalancers (route53 changes come after the target is known).
        first = proxy.add(fault("Other", "error", every=1, limit=1, status=503, code="ServiceUnavailable"))

        async def body() -> None:
            async with switcher(world, endpoint=proxy.endpoint, retry=FAST_RETRY) as dns:
                assert (await dns.point_at("dr")).verified

        run(body)
        assert first.hits == 1


def test_a_refused_control_plane_fails_fast_with_a_clear_error(world: World) -> None:
    dead = f"http://127.0.0.1:{free_port()}"

    async def body() -> None:
        async with switcher(world, endpoint=dead, retry=FAST_RETRY) as dns:
            with pytest.raises(DnsError, match=r"DescribeLoadBalancers .* failed after 3 attempts: Could not connect"):
                await dns.point_at("dr")
            with pytest.raises(DnsError, match=r"ListResourceRecordSets .* failed after 3 attempts"):
                await dns.read_record(world.domain)

    run(body)


def test_a_blackholed_control_plane_is_cut_by_the_read_timeout(world: World) -> None:
    with Route53Proxy(world.moto.endpoint) as proxy:
        proxy.add(fault("*", "stall", every=1))

        async def body() -> None:
            async with switcher(world, endpoint=proxy.endpoint, retry=FAST_RETRY, read_timeout=0.3) as dns:
                with pytest.raises(DnsError, match=r"failed after 3 attempts: no answer within 0.3 s"):
                    await dns.current()

        run(body)


def test_api_errors_are_not_retried_and_carry_the_message_but_no_credentials(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "kybdr-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    recorder = Recorder()
    messages: list[str] = []

    async def body() -> None:
        async with switcher(world, recorder=recorder, zone_id="ZNOSUCHZONE") as dns:
            with pytest.raises(DnsError, match=r"ListResourceRecordSets .* failed: NoSuchHostedZone") as info:
                await dns.current()
            messages.append(str(info.value))
            assert info.value.code == "NoSuchHostedZone"
            with pytest.raises(DnsError, match=r"ChangeResourceRecordSets \(UPSERT db\..*\) failed: NoSuchHostedZone"):
                await dns.point_at("dr")
        unknown = world.arns["dr"].rsplit("/", 1)[0] + "/0000000000000000"
        async with switcher(world, load_balancers={**world.arns, "dr": unknown}) as dns:
            with pytest.raises(DnsError, match=rf"\(dr load balancer .* in {DR_REGION}\) failed: LoadBalancerNotFound"):
                await dns.point_at("dr")

    run(body)
    assert len(recorder.named("ListResourceRecordSets")) == 1  # not retried
    assert all(secret not in m and "testing" not in m for m in messages)


def test_a_load_balancer_arn_without_a_region_uses_the_regions_mapping(world: World) -> None:
    regionless = world.arns["dr"].replace(f":{DR_REGION}:", "::")
    assert arn_region(regionless) is None
    assert arn_region(world.arns["dr"]) == DR_REGION

    async def body() -> None:
        async with switcher(world, load_balancers={**world.arns, "dr": regionless}) as dns:
            # Asked in us-west-2 (from the mapping): moto knows no such ARN there, and the error says where.
            with pytest.raises(DnsError, match=rf"in {DR_REGION}\) failed: LoadBalancerNotFound"):
                await dns.target("dr")
            assert (await dns.target("primary")).dns_name == world.dns_names["primary"]

    run(body)


def test_names_are_compared_as_route53_does() -> None:
    assert record_name("DB.Example.COM.") == "db.example.com"
    assert record_name("\\052.example.com.") == "*.example.com"
    assert alias_name("dualstack.My-LB-1.us-west-2.elb.amazonaws.com.") == "my-lb-1.us-west-2.elb.amazonaws.com"
    assert DnsRetry(attempts=9, base_delay=1.0, max_delay=4.0).delay(8) <= 4.0


def test_route53_switcher_is_a_dns_switcher(world: World) -> None:
    async def body() -> None:
        async with switcher(world) as dns:
            typed: DnsSwitcher = dns
            assert await typed.current() == "primary"

    run(body)
