"""Route53: point the service's alias record at a region's load balancer, wait until it is live, verify it.

Failover moves traffic only once the database has moved (fence → promote → DNS), so this module is the last
step and must report exactly what happened: the change was accepted (``submitted_s``), Route53 says it is
propagated to every authoritative server (``GetChange`` → ``INSYNC``, ``insync_s``), and a read-back shows the
record now names that load balancer (``verified``). The record is a plain alias A record, the same shape
terraform creates (``terraform/route53.tf``: alias to the load balancer's DNS name and canonical zone,
``EvaluateTargetHealth`` true), so an agent's UPSERT and terraform's state never disagree about its form.

Only the calls the agent's IAM policy allows are made (``terraform/iam.tf``, checked by
``tests/terraform/test_dr_iam.py``): route53 ``ChangeResourceRecordSets`` (UPSERT of the switched record;
UPSERT and DELETE of the test record), ``ListResourceRecordSets``, ``GetChange``; and
elasticloadbalancing ``DescribeLoadBalancers`` to turn the configured ARNs into alias targets, in the load
balancer's own region (``aws:RequestedRegion`` is limited to the two regions).

Every call has connect and read timeouts; botocore's own retries are off so ours are the only ones:
throttling (``Throttling``, ``PriorRequestNotComplete``…), 5xx answers and transport failures are retried a
bounded number of times with jittered exponential backoff; anything else fails at once. Failures leave as
``DnsError`` with the API's code and message — never credentials, which no API message carries.

DNS sits behind the ``DnsSwitcher`` protocol so the executor does not care whether it talks to Route53, and
tests can wrap the real switcher to add latency, throttling or a dead control plane.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiohttp
import anyio

from kybdr_agent.dr.observations import Region
from kybdr_agent.errors import KybdrError

if TYPE_CHECKING:
    from aiobotocore.session import AioSession

TEST_RECORD_LABEL: Final = "kybdr-failover-test"  # terraform's route53_test_record_label default
ROUTE53_SIGNING_REGION: Final = "us-east-1"  # Route53 is global; its API is signed for us-east-1
CONNECT_TIMEOUT: Final = 5.0
READ_TIMEOUT: Final = 15.0
RETRY_ATTEMPTS: Final = 6  # per call, first attempt included
RETRY_BASE_DELAY: Final = 0.2
RETRY_MAX_DELAY: Final = 5.0  # worst case of all backoffs together: about 0.2+0.4+0.8+1.6+3.2 ≈ 6 s
ALIAS_EVALUATE_TARGET_HEALTH: Final = True  # as terraform/route53.tf creates the record
_RETRYABLE_CODES: Final = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "PriorRequestNotComplete",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "RequestTimeout",
    }
)
_ESCAPE: Final = re.compile(r"\\([0-7]{3})")
_JITTER: Final = random.Random()  # noqa: S311 - backoff jitter needs no cryptographic randomness


class DnsError(KybdrError):
    """A DNS change or lookup failed; ``code`` is the API's error code when there was one."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DnsTarget:
    """The alias target of a load balancer: its DNS name and its canonical hosted zone."""

    dns_name: str
    zone_id: str


@dataclass(frozen=True)
class DnsResult:
    """One change of an alias record, timed: accepted after ``submitted_s``, INSYNC ``insync_s`` later."""

    record: str  # the record's name, lower case, no trailing dot
    target: DnsTarget
    change_id: str
    submitted_s: float  # ChangeResourceRecordSets, retries included
    insync_s: float  # from the accepted change to GetChange answering INSYNC
    verified: bool  # the read-back record is an alias to target.dns_name


class DnsSwitcher(Protocol):
    async def point_at(self, region: Region) -> DnsResult:
        """UPSERT the switched record to ``region``'s load balancer, wait INSYNC, read it back."""
        ...

    async def current(self) -> Region | None:
        """Which region's load balancer the switched record names (None: missing, or neither)."""
        ...

    async def test_record(self, region: Region) -> tuple[DnsResult, float]:
        """The same as ``point_at`` on the test record, then its DELETE; (result, seconds the delete took)."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class DnsRetry:
    """Bounded retries of throttled or failed-in-transit calls: full-jitter exponential backoff."""

    attempts: int = RETRY_ATTEMPTS
    base_delay: float = RETRY_BASE_DELAY
    max_delay: float = RETRY_MAX_DELAY

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("DNS retries need at least one attempt")

    def delay(self, retry: int) -> float:
        """Before the ``retry``-th retry (1-based): half fixed, half jitter, so backoff always grows."""
        cap = min(self.max_delay, self.base_delay * 2.0 ** (retry - 1))
        return cap / 2 + _JITTER.uniform(0, cap / 2)


def record_name(name: str) -> str:
    """A DNS name as Route53 compares it: lower case, no trailing dot, its ``\\ddd`` escapes decoded."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), name).rstrip(".").lower()


def alias_name(dns_name: str) -> str:
    """An alias target's DNS name for comparison; Route53 may store an ELB's as ``dualstack.<name>``."""
    name = record_name(dns_name)
    return name.removeprefix("dualstack.")


def arn_region(arn: str) -> str | None:
    """The region field of an ARN (``arn:partition:service:region:account:resource``), if it has one."""
    fields = arn.split(":", 5)
    return (fields[3] or None) if len(fields) == 6 and fields[0] == "arn" else None


def _zone_id(zone_id: str) -> str:
    return zone_id.strip().removeprefix("/hostedzone/")


def _classify(exc: BaseException, connect_timeout: float, read_timeout: float) -> tuple[bool, str, str | None]:
    """(retry it?, one line for the operator, the API's error code)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(error.get("Message", "") or "")
        text = f"{code or status}: {message}".rstrip(": ")
        return code in _RETRYABLE_CODES or status >= 500 or status == 429, text, code or None
    if isinstance(exc, ConnectTimeoutError):
        return True, f"could not connect within {connect_timeout:g} s", None
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return True, f"no answer within {read_timeout:g} s", None
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError):
        return True, str(exc), None
    if isinstance(exc, BotoCoreError):
        return False, str(exc), None  # no credentials, bad parameters: retrying changes nothing
    return True, f"{type(exc).__name__}: {exc}".rstrip(": "), None


class Route53Switcher:
    """``DnsSwitcher`` on aiobotocore: one session, a route53 client and an elbv2 client per LB region."""

    def __init__(
        self,
        *,
        zone_id: str,
        domain: str,
        load_balancers: Mapping[Region, str],
        lb_regions: Mapping[Region, str],
        sync_timeout: float,
        poll_interval: float,
        retry: DnsRetry,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.zone_id = _zone_id(zone_id)
        self.domain = record_name(domain)
        self.test_domain = f"{TEST_RECORD_LABEL}.{self.domain}"
        self._load_balancers = dict(load_balancers)
        self._lb_regions = dict(lb_regions)
        self._sync_timeout = sync_timeout
        self._poll_interval = poll_interval
        self._retry = retry
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._exit = AsyncExitStack()
        self._route53: Any = None
        self._elbv2: dict[str, Any] = {}
        self._targets: dict[Region, DnsTarget] = {}

    @classmethod
    async def open(
        cls,
        *,
        zone_id: str,
        domain: str,
        load_balancers: Mapping[Region, str],
        regions: Mapping[Region, str],
        endpoint_url: str | None,
        sync_timeout: float,
        poll_interval: float = 1.0,
        retry: DnsRetry | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        session: AioSession | None = None,
    ) -> Route53Switcher:
        """Create the clients; no call is made yet (the control plane may be down at startup).

        ``regions`` maps each place to its AWS region, used for a load balancer whose ARN names none.
        ``endpoint_url`` applies to every client (moto serves all services on one endpoint). ``session``
        lets a caller pass its own (tests register event hooks on it to record the calls made).
        """
        if sync_timeout <= 0 or poll_interval <= 0:
            raise ValueError("sync_timeout and poll_interval must be positive")
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        lb_regions: dict[Region, str] = {}
        for place, arn in load_balancers.items():
            found = arn_region(arn) or regions.get(place)
            if not found:
                raise DnsError(f"cannot tell the AWS region of the {place} load balancer {arn}")
            lb_regions[place] = found
        switcher = cls(
            zone_id=zone_id,
            domain=domain,
            load_balancers=load_balancers,
            lb_regions=lb_regions,
            sync_timeout=sync_timeout,
            poll_interval=poll_interval,
            retry=retry or DnsRetry(),
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        config = AioConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": 1},  # ours (DnsRetry) are the only retries
        )
        session = session or get_session()
        try:
            switcher._route53 = await switcher._exit.enter_async_context(
                session.create_client(
                    "route53", region_name=ROUTE53_SIGNING_REGION, endpoint_url=endpoint_url, config=config
                )
            )
            for aws_region in sorted(set(lb_regions.values())):
                switcher._elbv2[aws_region] = await switcher._exit.enter_async_context(
                    session.create_client("elbv2", region_name=aws_region, endpoint_url=endpoint_url, config=config)
                )
        except BaseException:
            await switcher._exit.aclose()
            raise
        return switcher

    async def aclose(self) -> None:
        await self._exit.aclose()

    # --- the DnsSwitcher protocol ----------------------------------------------------------------------

    async def point_at(self, region: Region) -> DnsResult:
        return await self._switch(self.domain, await self.target(region))

    async def current(self) -> Region | None:
        record = await self.read_record(self.domain)
        if record is None:
            return None
        for place in self._load_balancers:
            if alias_name(record.dns_name) == alias_name((await self.target(place)).dns_name):
                return place
        return None

    async def test_record(self, region: Region) -> tuple[DnsResult, float]:
        target = await self.target(region)
        name = self.test_domain
        try:
            result = await self._switch(name, target)
        except DnsError as exc:
            # The UPSERT may have happened (an answer lost, INSYNC too slow): never leave the test record.
            try:
                await self._delete(name, target)
            except DnsError as cleanup:
                raise DnsError(f"{exc}; the test record {name} may be left behind: {cleanup}", code=exc.code) from exc
            raise
        started = time.monotonic()
        await self._delete(name, target)
        return result, time.monotonic() - started

    # --- the steps ------------------------------------------------------------------------------------

    async def target(self, region: Region) -> DnsTarget:
        """The alias target of ``region``'s load balancer, through ELBv2 in its own region (then cached)."""
        cached = self._targets.get(region)
        if cached is not None:
            return cached
        arn = self._load_balancers.get(region)
        if arn is None:
            raise DnsError(f"no load balancer is configured for the {region} region")
        aws_region = self._lb_regions[region]
        answer = await self._call(
            f"ELBv2 DescribeLoadBalancers ({region} load balancer {arn} in {aws_region})",
            self._elbv2[aws_region].describe_load_balancers,
            LoadBalancerArns=[arn],
        )
        found = [lb for lb in answer.get("LoadBalancers", []) if lb.get("DNSName") and lb.get("CanonicalHostedZoneId")]
        if not found:
            raise DnsError(f"ELBv2 DescribeLoadBalancers returned no DNS name for {arn} in {aws_region}")
        target = DnsTarget(dns_name=str(found[0]["DNSName"]), zone_id=str(found[0]["CanonicalHostedZoneId"]))
        self._targets[region] = target
        return target

    async def read_record(self, name: str) -> DnsTarget | None:
        """The alias target of the A record ``name`` (None: no such record, or not an alias)."""
        answer = await self._call(
            f"Route53 ListResourceRecordSets ({name})",
            self._route53.list_resource_record_sets,
            HostedZoneId=self.zone_id,
            StartRecordName=f"{name}.",
            StartRecordType="A",
            MaxItems="1",
        )
        for record in answer.get("ResourceRecordSets", []):
            # The listing starts AT the name: without the record it returns the next one in order.
            alias = record.get("AliasTarget")
            if record_name(str(record.get("Name", ""))) == name and record.get("Type") == "A" and alias:
                return DnsTarget(dns_name=str(alias.get("DNSName", "")), zone_id=str(alias.get("HostedZoneId", "")))
        return None

    async def _switch(self, name: str, target: DnsTarget) -> DnsResult:
        started = time.monotonic()
        change_id = await self._change(name, "UPSERT", target)
        submitted_s = time.monotonic() - started
        accepted = time.monotonic()
        await self._wait_insync(change_id, name)
        insync_s = time.monotonic() - accepted
        record = await self.read_record(name)
        verified = record is not None and alias_name(record.dns_name) == alias_name(target.dns_name)
        return DnsResult(name, target, change_id, submitted_s, insync_s, verified)

    async def _delete(self, name: str, target: DnsTarget) -> None:
        """DELETE exactly the record we wrote (a DELETE must repeat its alias target), then wait INSYNC."""
        try:
            change_id = await self._change(name, "DELETE", target)
        except DnsError as exc:
            # Already gone (our own earlier attempt went through and its answer was lost, or the UPSERT
            # never happened) is what we wanted; anything else is a record left behind.
            if exc.code == "InvalidChangeBatch" and await self.read_record(name) is None:
                return
            raise
        await self._wait_insync(change_id, name)
        if await self.read_record(name) is not None:
            raise DnsError(f"the test record {name} is still there after its DELETE ({change_id}) was INSYNC")

    async def _change(self, name: str, action: str, target: DnsTarget) -> str:
        answer = await self._call(
            f"Route53 ChangeResourceRecordSets ({action} {name})",
            self._route53.change_resource_record_sets,
            HostedZoneId=self.zone_id,
            ChangeBatch={
                "Comment": f"kybdr-agent: {action} {name}",
                "Changes": [
                    {
                        "Action": action,
                        "ResourceRecordSet": {
                            "Name": f"{name}.",
                            "Type": "A",
                            "AliasTarget": {
                                "HostedZoneId": target.zone_id,
                                "DNSName": target.dns_name,
                                "EvaluateTargetHealth": ALIAS_EVALUATE_TARGET_HEALTH,
                            },
                        },
                    }
                ],
            },
        )
        change_id = str(answer.get("ChangeInfo", {}).get("Id", ""))
        if not change_id:
            raise DnsError(f"Route53 accepted {action} {name} but returned no change ID")
        return change_id

    async def _wait_insync(self, change_id: str, name: str) -> None:
        """Poll GetChange (at least once) until INSYNC; the whole wait, calls included, ≤ sync_timeout."""
        status = "unknown"
        with anyio.move_on_after(self._sync_timeout):
            while True:
                answer = await self._call(
                    f"Route53 GetChange ({change_id} for {name})", self._route53.get_change, Id=change_id
                )
                status = str(answer.get("ChangeInfo", {}).get("Status", ""))
                if status == "INSYNC":
                    return
                await anyio.sleep(self._poll_interval)
        raise DnsError(
            f"Route53 change {change_id} ({name}) was not INSYNC within {self._sync_timeout:g} s "
            f"(last status: {status or 'none'})"
        )

    async def _call(self, what: str, method: Callable[..., Awaitable[Any]], **kwargs: Any) -> Any:
        """One API call with bounded retries of throttling, 5xx and transport failures."""
        from botocore.exceptions import BotoCoreError, ClientError

        attempts = self._retry.attempts
        for attempt in range(1, attempts + 1):
            try:
                return await method(**kwargs)
            except (ClientError, BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                retry, why, code = _classify(exc, self._connect_timeout, self._read_timeout)
                if not retry:
                    raise DnsError(f"{what} failed: {why}", code=code) from exc
                if attempt == attempts:
                    raise DnsError(f"{what} failed after {attempts} attempts: {why}", code=code) from exc
            await anyio.sleep(self._retry.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover
