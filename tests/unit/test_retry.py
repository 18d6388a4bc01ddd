"""Bounded retries with jittered backoff and per-attempt deadlines (kybdr_agent/storage/retry.py).

Time is injected: a fake ``sleep`` records the backoff delays, so nothing here waits for a backoff. Only the
deadline tests really wait, for a 0.05 s deadline each.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.storage.retry import AttemptTimeout, RetryPolicy, call_with_retries


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Transient(Exception):
    pass


class Fatal(Exception):
    pass


class Interrupt(BaseException):
    pass


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, Transient)


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class Script:
    """An operation that plays a list of outcomes: an exception to raise, a coroutine factory, or a value."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def __call__(self) -> object:
        outcome = self.outcomes[min(self.calls, len(self.outcomes) - 1)]
        self.calls += 1
        if isinstance(outcome, BaseException):
            raise outcome
        if callable(outcome):
            return await outcome()
        return outcome


async def stall() -> object:
    await anyio.sleep(1)
    return "too late"


POLICY = RetryPolicy(attempts=4, base_delay=0.25, max_delay=10.0, attempt_deadline=30.0)


async def run(
    operation: Callable[[], Awaitable[object]],
    policy: RetryPolicy = POLICY,
    sleep: FakeSleep | None = None,
    retryable: Callable[[BaseException], bool] = is_transient,
    rng: random.Random | None = None,
) -> object:
    return await call_with_retries(
        operation, policy=policy, retryable=retryable, sleep=sleep or FakeSleep(), rng=rng or random.Random(7)
    )


@pytest.mark.anyio
async def test_success_first_time_does_not_sleep() -> None:
    sleep = FakeSleep()
    op = Script("ok")
    assert await run(op, sleep=sleep) == "ok"
    assert op.calls == 1
    assert sleep.delays == []


@pytest.mark.anyio
@pytest.mark.parametrize("failures", [1, 2, 3])
async def test_retryable_errors_are_retried_until_success(failures: int) -> None:
    sleep = FakeSleep()
    op = Script(*[Transient(f"try {i}") for i in range(failures)], "ok")
    assert await run(op, sleep=sleep) == "ok"
    assert op.calls == failures + 1
    assert len(sleep.delays) == failures


@pytest.mark.anyio
@pytest.mark.parametrize("attempts", [1, 2, 5])
async def test_gives_up_after_attempts_with_the_last_error(attempts: int) -> None:
    sleep = FakeSleep()
    errors = [Transient(f"try {i}") for i in range(attempts + 3)]
    op = Script(*errors)
    with pytest.raises(Transient) as info:
        await run(op, policy=RetryPolicy(attempts=attempts, attempt_deadline=30.0), sleep=sleep)
    assert info.value is errors[attempts - 1]
    assert op.calls == attempts
    assert len(sleep.delays) == attempts - 1


@pytest.mark.anyio
async def test_non_retryable_error_stops_at_once() -> None:
    sleep = FakeSleep()
    error = Fatal("access denied")
    op = Script(error, "ok")
    with pytest.raises(Fatal) as info:
        await run(op, sleep=sleep)
    assert info.value is error
    assert op.calls == 1
    assert sleep.delays == []


@pytest.mark.anyio
async def test_non_retryable_after_retryable_stops() -> None:
    sleep = FakeSleep()
    op = Script(Transient("blip"), Fatal("no such bucket"), "ok")
    with pytest.raises(Fatal):
        await run(op, sleep=sleep)
    assert op.calls == 2
    assert len(sleep.delays) == 1


@pytest.mark.anyio
async def test_retryable_sees_each_error() -> None:
    seen: list[BaseException] = []
    errors = [Transient("a"), Transient("b")]

    def record(exc: BaseException) -> bool:
        seen.append(exc)
        return True

    assert await run(Script(*errors, "ok"), retryable=record) == "ok"
    assert seen == errors


@pytest.mark.anyio
async def test_base_exceptions_are_never_retried() -> None:
    asked: list[BaseException] = []

    def record(exc: BaseException) -> bool:
        asked.append(exc)
        return True

    op = Script(Interrupt(), "ok")
    with pytest.raises(Interrupt):
        await run(op, retryable=record)
    assert op.calls == 1
    assert asked == []


@pytest.mark.anyio
async def test_stalled_attempt_times_out() -> None:
    sleep = FakeSleep()
    op = Script(stall)
    with pytest.raises(AttemptTimeout, match=r"no progress within 0\.05 s") as info:
        await run(op, policy=RetryPolicy(attempts=1, attempt_deadline=0.05), sleep=sleep)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert op.calls == 1
    assert sleep.delays == []


@pytest.mark.anyio
async def test_stalled_attempts_are_retried_then_give_up() -> None:
    sleep = FakeSleep()
    op = Script(stall)
    with pytest.raises(AttemptTimeout):
        await run(op, policy=RetryPolicy(attempts=3, attempt_deadline=0.05), sleep=sleep)
    assert op.calls == 3
    assert len(sleep.delays) == 2


@pytest.mark.anyio
async def test_timeout_is_retried_without_asking_retryable() -> None:
    op = Script(stall, "ok")
    assert await run(op, policy=RetryPolicy(attempts=2, attempt_deadline=0.05), retryable=lambda _: False) == "ok"
    assert op.calls == 2


@pytest.mark.anyio
async def test_fast_attempt_is_not_cut_by_the_deadline() -> None:
    async def quick() -> object:
        await anyio.sleep(0)
        return "ok"

    assert await run(Script(quick), policy=RetryPolicy(attempts=1, attempt_deadline=5.0)) == "ok"


@pytest.mark.anyio
async def test_delays_grow_within_full_jitter_bounds() -> None:
    sleep = FakeSleep()
    policy = RetryPolicy(attempts=8, base_delay=0.5, max_delay=4.0, attempt_deadline=30.0)
    with pytest.raises(Transient):
        await run(Script(Transient("x")), policy=policy, sleep=sleep, rng=random.Random(1))
    assert len(sleep.delays) == 7
    for n, delay in enumerate(sleep.delays):
        assert 0 <= delay <= min(policy.max_delay, policy.base_delay * 2**n)


@pytest.mark.anyio
async def test_default_rng_is_used_when_none_is_given() -> None:
    sleep = FakeSleep()
    op = Script(Transient("x"), "ok")
    result = await call_with_retries(op, policy=POLICY, retryable=is_transient, sleep=sleep)
    assert result == "ok"
    assert 0 <= sleep.delays[0] <= POLICY.base_delay


@given(
    attempt=st.integers(0, 40),
    base=st.floats(min_value=0.001, max_value=5.0),
    cap=st.floats(min_value=0.001, max_value=60.0),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=300)
def test_delay_is_within_bounds(attempt: int, base: float, cap: float, seed: int) -> None:
    policy = RetryPolicy(base_delay=base, max_delay=cap)
    delay = policy.delay(attempt, random.Random(seed))
    assert 0 <= delay <= min(cap, base * 2**attempt)


@given(
    attempts=st.integers(1, 10),
    base=st.floats(min_value=0.001, max_value=2.0),
    cap=st.floats(min_value=0.001, max_value=30.0),
    failures=st.integers(0, 12),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=100, deadline=None)
def test_retry_schedule_property(attempts: int, base: float, cap: float, failures: int, seed: int) -> None:
    policy = RetryPolicy(attempts=attempts, base_delay=base, max_delay=cap, attempt_deadline=30.0)
    sleep = FakeSleep()
    op = Script(*[Transient(str(i)) for i in range(failures)], "ok")

    async def main() -> object:
        return await run(op, policy=policy, sleep=sleep, rng=random.Random(seed))

    if failures < attempts:
        assert anyio.run(main) == "ok"
        assert op.calls == failures + 1
    else:
        with pytest.raises(Transient):
            anyio.run(main)
        assert op.calls == attempts
    assert len(sleep.delays) == op.calls - 1
    for n, delay in enumerate(sleep.delays):
        assert 0 <= delay <= min(cap, base * 2**n)


def test_policy_defaults() -> None:
    policy = RetryPolicy()
    assert policy.attempts >= 1
    assert 0 < policy.base_delay <= policy.max_delay
    assert policy.attempt_deadline > 0
