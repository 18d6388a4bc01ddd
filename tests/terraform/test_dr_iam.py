"""Every AWS call the DR code makes is allowed by the agent's policy in terraform/iam.tf.

The DNS calls are not listed by hand: ``Route53Switcher`` runs a failover, a read, two test-record drills and a
failback against moto_server, an event hook on its aiobotocore session records each operation with its
parameters and client region, and each one becomes an IAM request (action, resource ARN, condition keys such as
``route53:ChangeResourceRecordSetsNormalizedRecordNames`` and ``aws:RequestedRegion``) evaluated against the
policy statements parsed from iam.tf with python-hcl2. The statements' expressions are evaluated too
(``lower(trimsuffix(var.route53_domain, "."))``, the zone ARN, the test record's name from
``var.route53_test_record_label``), so the test fails if terraform derives a name the agent does not use.
A few requests the agent must never be allowed to make are checked to be denied, so the evaluator cannot
pass by allowing everything. The DR lease's and history's S3 keys are checked statically against the same
evaluator.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import anyio
import pytest

from kybdr_agent.dr.dns import TEST_RECORD_LABEL, Route53Switcher, record_name
from tests.dr_aws import REGIONS, World, build_world
from tests.integration.test_dr_dns import Recorder
from tests.support import MotoServer
from tests.terraform.test_terraform import as_list, root, statements

PARTITION = "aws"
PRIMARY_BUCKET_ARN = "arn:aws:s3:::kybdr-production-backups-123456789012-us-east-1"
DR_BUCKET_ARN = "arn:aws:s3:::kybdr-production-backups-123456789012-us-west-2"
DNS_ACTIONS = {
    "route53:ChangeResourceRecordSets",
    "route53:ListResourceRecordSets",
    "route53:GetChange",
    "elasticloadbalancing:DescribeLoadBalancers",
}
ZONE_KEYS = (
    "route53:ChangeResourceRecordSetsNormalizedRecordNames",
    "route53:ChangeResourceRecordSetsRecordTypes",
    "route53:ChangeResourceRecordSetsActions",
)

# --------------------------------------------------------------------------------------------------
# A small evaluator of the HCL expressions the policy uses, and of IAM statements
# --------------------------------------------------------------------------------------------------

_FUNCTIONS: dict[str, Any] = {
    "lower": lambda s: s.lower(),
    "trimsuffix": lambda s, suffix: s.removesuffix(suffix),
}
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")


@dataclass
class Env:
    """Values of the variables, data sources and module outputs the policy refers to."""

    variables: Mapping[str, Any]
    references: Mapping[str, Any]

    def variable(self, name: str) -> Any:
        if name in self.variables:
            return self.variables[name]
        declared = root().variables[name]
        assert "default" in declared, f"var.{name} has no default and the test gave no value"
        return declared["default"]

    def lookup(self, reference: str) -> Any:
        kind, _, rest = reference.partition(".")
        if kind == "var":
            return self.variable(rest)
        if kind == "local":
            return evaluate(root().locals[rest], self)
        assert reference in self.references, f"the test does not know the value of {reference}"
        return self.references[reference]


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _term(text: str, pos: int, env: Env) -> tuple[Any, int]:
    pos = _skip(text, pos)
    if text[pos] == '"':
        end = text.index('"', pos + 1)
        return text[pos + 1 : end], end + 1
    match = _NAME.match(text, pos)
    assert match, f"cannot evaluate {text!r} at {pos}"
    name, pos = match.group(), _skip(text, match.end())
    if pos < len(text) and text[pos] == "(":
        assert name in _FUNCTIONS, f"the evaluator does not know the function {name}()"
        args: list[Any] = []
        pos += 1
        while True:
            value, pos = _term(text, pos, env)
            args.append(value)
            pos = _skip(text, pos)
            if text[pos] == ")":
                return _FUNCTIONS[name](*args), pos + 1
            assert text[pos] == ",", f"cannot evaluate {text!r} at {pos}"
            pos += 1
    return env.lookup(name), pos


def evaluate(expression: Any, env: Env) -> Any:
    """A string with ``${...}`` interpolations (or a list of them); ``"${x}"`` alone keeps x's type."""
    if isinstance(expression, list):
        return [evaluate(item, env) for item in expression]
    if not isinstance(expression, str):
        return expression
    whole = re.fullmatch(r"\$\{(.*)\}", expression)
    if whole and "${" not in whole.group(1):
        value, end = _term(whole.group(1), 0, env)
        assert _skip(whole.group(1), end) == len(whole.group(1)), f"cannot evaluate {expression!r}"
        return evaluate(value, env)
    out: list[str] = []
    pos = 0
    while (start := expression.find("${", pos)) >= 0:
        out.append(expression[pos:start])
        value, end = _term(expression, start + 2, env)
        end = _skip(expression, end)
        assert expression[end] == "}", f"cannot evaluate {expression!r}"
        out.append(str(evaluate(value, env)))
        pos = end + 1
    out.append(expression[pos:])
    return "".join(out)


@dataclass(frozen=True)
class Request:
    """One IAM authorisation request: the action, the resource ARN and the request's condition keys."""

    action: str
    resource: str
    context: Mapping[str, tuple[str, ...]]


def agent_statements() -> list[dict[str, Any]]:
    return list(statements(root().data[("aws_iam_policy_document", "agent")]))


def _condition_holds(condition: Mapping[str, Any], request: Request, env: Env) -> bool:
    allowed = [str(v) for v in as_list(evaluate(condition["values"], env))]
    present = request.context.get(condition["variable"])
    test = condition["test"]
    if present is None:
        return False  # stricter than IAM for ForAllValues: the agent's requests always carry these keys
    if test == "ForAllValues:StringEquals":
        return all(value in allowed for value in present)
    if test == "StringEquals":
        return len(present) == 1 and present[0] in allowed
    if test == "StringLike":
        return len(present) == 1 and any(fnmatchcase(present[0], pattern) for pattern in allowed)
    raise AssertionError(f"the evaluator does not know the condition operator {test}")


def allowing(request: Request, env: Env) -> list[str]:
    """The sids of the Allow statements that grant ``request`` (there is no Deny in the agent's policy)."""
    sids = []
    for statement in agent_statements():
        assert statement["effect"] == "Allow"
        if not any(fnmatchcase(request.action, action) for action in statement["actions"]):
            continue
        resources = [str(r) for r in as_list(evaluate(statement["resources"], env))]
        if not any(fnmatchcase(request.resource, pattern) for pattern in resources):
            continue
        if all(_condition_holds(c, request, env) for c in statement.get("condition", [])):
            sids.append(statement["sid"])
    return sids


# --------------------------------------------------------------------------------------------------
# The DNS calls, recorded against moto
# --------------------------------------------------------------------------------------------------


def terraform_env(world: World) -> Env:
    """The terraform inputs an operator would give for this world (the domain as typed: trailing dot)."""
    return Env(
        variables={
            "route53_domain": world.domain + ".",
            "route53_zone_id": world.zone_id.removeprefix("/hostedzone/"),
            "primary_region": REGIONS["primary"],
            "dr_region": REGIONS["dr"],
        },
        references={
            "data.aws_partition.current.partition": PARTITION,
            "module.primary_bucket.bucket_arn": PRIMARY_BUCKET_ARN,
            "module.dr_bucket.bucket_arn": DR_BUCKET_ARN,
        },
    )


def iam_requests(recorder: Recorder, zone_id: str) -> Iterator[tuple[str, Request]]:
    zone_arn = f"arn:{PARTITION}:route53:::hostedzone/{zone_id.removeprefix('/hostedzone/')}"
    for call in recorder.calls:
        action = f"{call.service}:{call.operation}"
        where = {"aws:RequestedRegion": (call.region,)}
        if call.operation == "ChangeResourceRecordSets":
            changes = call.params["ChangeBatch"]["Changes"]
            sets = [c["ResourceRecordSet"] for c in changes]
            context = {
                **where,
                ZONE_KEYS[0]: tuple(record_name(s["Name"]) for s in sets),
                ZONE_KEYS[1]: tuple(s["Type"] for s in sets),
                ZONE_KEYS[2]: tuple(c["Action"] for c in changes),
            }
            summary = f"{changes[0]['Action']} {record_name(sets[0]['Name'])}"
            yield summary, Request(action, zone_arn, context)
        elif call.operation == "ListResourceRecordSets":
            yield call.operation, Request(action, zone_arn, where)
        elif call.operation == "GetChange":
            change = f"arn:{PARTITION}:route53:::change/{call.params['Id'].removeprefix('/change/')}"
            yield call.operation, Request(action, change, where)
        elif call.operation == "DescribeLoadBalancers":
            yield f"{call.operation} in {call.region}", Request(action, "*", where)
        else:
            raise AssertionError(f"dns.py made a call this test does not know how to authorise: {action}")


@pytest.fixture(scope="module")
def recorded(moto_server: MotoServer) -> tuple[World, Recorder]:
    world = build_world(moto_server)
    recorder = Recorder()
    session = recorder.session()
    session.set_credentials("testing", "testing")  # module scope: the autouse credential fixture runs later

    async def drill() -> None:
        dns = await Route53Switcher.open(
            zone_id=world.zone_id,
            domain=world.domain,
            load_balancers=world.arns,  # type: ignore[arg-type]
            regions=REGIONS,  # type: ignore[arg-type]
            endpoint_url=moto_server.endpoint,
            sync_timeout=10.0,
            poll_interval=0.05,
            session=session,
        )
        try:
            with anyio.fail_after(60):
                await dns.current()
                await dns.test_record("dr")
                await dns.point_at("dr")
                await dns.current()
                await dns.test_record("primary")
                await dns.point_at("primary")
        finally:
            await dns.aclose()

    anyio.run(drill)
    return world, recorder


def test_the_dns_code_calls_exactly_the_four_granted_operations(recorded: tuple[World, Recorder]) -> None:
    _, recorder = recorded
    assert {f"{c.service}:{c.operation}" for c in recorder.calls} == DNS_ACTIONS
    granted = {action for s in agent_statements() for action in s["actions"]}
    assert granted >= DNS_ACTIONS


def test_every_recorded_dns_call_is_allowed_by_the_agent_policy(recorded: tuple[World, Recorder]) -> None:
    world, recorder = recorded
    env = terraform_env(world)
    seen: dict[str, set[str]] = {}
    for summary, request in iam_requests(recorder, world.zone_id):
        sids = allowing(request, env)
        assert sids, f"terraform/iam.tf does not allow {request.action} ({summary}) on {request.resource}: {request}"
        seen.setdefault(summary, set()).update(sids)
    test_name = f"{TEST_RECORD_LABEL}.{world.domain}"
    assert seen[f"UPSERT {world.domain}"] == {"SwitchServiceRecord"}
    assert seen[f"UPSERT {test_name}"] == {"WriteTestFailoverRecord"}
    assert seen[f"DELETE {test_name}"] == {"WriteTestFailoverRecord"}
    assert seen["GetChange"] == {"WaitForDnsChange"}
    assert seen["ListResourceRecordSets"] == {"ReadZoneRecords"}
    for place in REGIONS.values():
        assert seen[f"DescribeLoadBalancers in {place}"] == {"ResolveLoadBalancerAliasTargets"}


def test_the_names_terraform_derives_are_the_ones_the_agent_writes(recorded: tuple[World, Recorder]) -> None:
    world, _ = recorded
    env = terraform_env(world)
    assert evaluate("${local.switched_record_name}", env) == world.domain
    assert evaluate("${local.test_record_name}", env) == f"{TEST_RECORD_LABEL}.{world.domain}"
    assert root().variables["route53_test_record_label"]["default"] == TEST_RECORD_LABEL
    # DescribeLoadBalancers is granted only while this (default) switch is on: the agent needs it.
    assert root().variables["agent_resolves_load_balancers"]["default"] is True


def test_the_evaluator_denies_what_the_agent_must_never_do(recorded: tuple[World, Recorder]) -> None:
    world, _ = recorded
    env = terraform_env(world)
    zone_arn = f"arn:{PARTITION}:route53:::hostedzone/{world.zone_id.removeprefix('/hostedzone/')}"

    def change(name: str, rtype: str = "A", action: str = "UPSERT", zone: str = zone_arn) -> Request:
        keys = dict(zip(ZONE_KEYS, ((name,), (rtype,), (action,)), strict=True))
        return Request("route53:ChangeResourceRecordSets", zone, {"aws:RequestedRegion": ("us-east-1",), **keys})

    assert allowing(change(world.domain), env)
    assert not allowing(change(world.domain, action="DELETE"), env)  # never delete the service record
    assert not allowing(change(world.domain, action="CREATE"), env)
    assert not allowing(change(world.domain, rtype="CNAME"), env)
    assert not allowing(change(f"other.{world.domain}"), env)
    assert not allowing(change(world.domain, zone="arn:aws:route53:::hostedzone/ZOTHER"), env)
    elsewhere = Request("elasticloadbalancing:DescribeLoadBalancers", "*", {"aws:RequestedRegion": ("eu-west-1",)})
    assert not allowing(elsewhere, env)
    assert not allowing(Request("route53:ListResourceRecordSets", "arn:aws:route53:::hostedzone/ZOTHER", {}), env)


# --------------------------------------------------------------------------------------------------
# The DR lease and history in S3 (static: the keys the lease and the history copy use)
# --------------------------------------------------------------------------------------------------


def s3_request(action: str, bucket_arn: str, key: str) -> Request:
    return Request(action, f"{bucket_arn}/{key}", {})


def test_the_dr_lease_and_history_objects_are_allowed(recorded: tuple[World, Recorder]) -> None:
    world, _ = recorded
    env = terraform_env(world)
    prefix = evaluate("${local.repository_prefix}", env)
    lease = f"{prefix}/dr/lease"
    # The lease lives in the DR-side agent's repository, the DR bucket (dr_region_agent_config): created
    # with PutObject If-None-Match: *, renewed with PutObject If-Match (both plain s3:PutObject), read with
    # GetObject/HeadObject (s3:GetObject), released with DeleteObject.
    for action in ("s3:PutObject", "s3:GetObject", "s3:DeleteObject"):
        assert allowing(s3_request(action, DR_BUCKET_ARN, lease), env), f"{action} on {lease}"
    # History is copied into whichever repository the agent writes (either bucket), never overwritten or
    # deleted: PutObject and GetObject below dr/history/, and no DeleteObject there.
    for bucket in (PRIMARY_BUCKET_ARN, DR_BUCKET_ARN):
        for action in ("s3:PutObject", "s3:GetObject"):
            key = f"{prefix}/dr/history/00000001-00000042.jsonl"
            assert allowing(s3_request(action, bucket, key), env), f"{action} on {bucket}/{key}"
        assert not allowing(s3_request("s3:DeleteObject", bucket, f"{prefix}/dr/history/00000001.jsonl"), env)
        listing = Request("s3:ListBucket", bucket, {"s3:prefix": (f"{prefix}/dr/",)})
        assert allowing(listing, env)
    assert not allowing(s3_request("s3:DeleteObject", PRIMARY_BUCKET_ARN, lease), env)  # the lease is the DR bucket's
    assert not allowing(s3_request("s3:PutObject", DR_BUCKET_ARN, "elsewhere/dr/lease"), env)
