"""Bounded retries with jittered backoff, and the watch that cuts an attempt only when no byte moved
(kybdr_agent/storage/retry.py).

Time is injected: a fake ``sleep`` records the backoff delays, so nothing here waits for a backoff, and the
watch's judgement is tested with made-up clocks. Only the deadline tests really wait, a fraction of a second.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.storage.retry import (
    ANSWER_ALLOWANCE,
    AttemptTimeout,
    AttemptWatch,
    RetryPolicy,
    call_with_retries,
    current_watch,
)


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
    with pytest.raises(AttemptTimeout, match=r"no bytes moved for 0\.05 s") as info:
        await run(op, policy=RetryPolicy(attempts=1, attempt_deadline=0.05), sleep=sleep)
    assert isinstance(info.value, TimeoutError)
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


# --- the watch: time without progress, not time per request --------------------------------------------


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_watch(clock: Clock, *, stall: float = 5.0, cap: float = 60.0, floor: float = 1000.0) -> AttemptWatch:
    return AttemptWatch(stall=stall, cap=cap, floor=floor, now=clock.now, clock=clock)


def test_watch_cuts_after_the_stall_deadline_without_progress() -> None:
    clock = Clock()
    watch = make_watch(clock)
    assert watch.verdict(104.9) is None
    assert watch.next_check() == 105.0
    assert watch.verdict(105.0) == "no bytes moved for 5 s (sending the request)"


def test_progress_restarts_the_stall_deadline() -> None:
    """The issue's case: bytes keep moving for far longer than the deadline, and nothing is cut."""
    clock = Clock()
    watch = make_watch(clock, stall=5.0, cap=1000.0)
    for _ in range(100):  # 400 s of a 4 s-per-chunk trickle against a 5 s deadline
        clock.now += 4.0
        assert watch.verdict(clock.now) is None
        watch.moved(65536)
        assert watch.next_check() == clock.now + 5.0
    assert watch.bytes_moved == 100 * 65536
    assert watch.verdict(clock.now + 5.0) == "no bytes moved for 5 s (sending the request)"


def test_once_sent_only_the_cap_applies() -> None:
    """Waiting for the answer is the HTTP client's per-read timeout's job, not the sending watch's."""
    clock = Clock()
    watch = make_watch(clock, stall=5.0, cap=60.0)
    clock.now += 3.0
    watch.sent()
    assert not watch.sending
    assert watch.verdict(clock.now + 50.0) is None
    assert watch.next_check() == 160.0
    assert watch.verdict(160.0) == "still unfinished after 60 s, the most one attempt of this size may take"


def test_the_cap_holds_even_while_bytes_move() -> None:
    clock = Clock()
    watch = make_watch(clock, stall=5.0, cap=20.0)
    for _ in range(5):
        clock.now += 4.0
        watch.moved(1)
    assert clock.now == 120.0
    assert watch.next_check() == 120.0
    assert watch.verdict(clock.now) is not None
    assert "still unfinished after 20 s" in str(watch.verdict(clock.now))


def test_tail_allowance_is_half_a_deadline_at_the_floor() -> None:
    assert make_watch(Clock(), stall=2.0, floor=65536.0).tail_allowance == 65536


@given(size=st.integers(0, 6 << 40), deadline=st.floats(0.1, 3600), floor=st.floats(1024, 1e9))
def test_attempt_cap_scales_with_size(size: int, deadline: float, floor: float) -> None:
    policy = RetryPolicy(attempt_deadline=deadline, min_throughput=floor)
    cap = policy.attempt_cap(size)
    assert cap >= 2 * deadline
    assert cap == pytest.approx(2 * deadline + (size + ANSWER_ALLOWANCE) / floor)
    assert policy.attempt_cap(size + (1 << 20)) > cap


def test_attempt_cap_for_the_issues_part_size() -> None:
    """~840 MiB parts (a 1 TiB database) at the 120 s default: hours, not 120 s."""
    cap = RetryPolicy().attempt_cap(840 << 20)
    assert cap > 3 * 3600


def test_policy_rejects_a_non_positive_floor() -> None:
    with pytest.raises(ValueError, match="throughput"):
        RetryPolicy(min_throughput=0)


def test_no_watch_outside_an_attempt() -> None:
    assert current_watch() is None


@pytest.mark.anyio
async def test_a_steadily_progressing_attempt_outlives_the_deadline() -> None:
    async def trickle() -> object:
        watch = current_watch()
        assert watch is not None
        for _ in range(20):  # 0.4 s in all against a 0.25 s deadline
            await anyio.sleep(0.02)
            watch.moved(1)
        return "done"

    assert await run(Script(trickle), policy=RetryPolicy(attempts=1, attempt_deadline=0.25)) == "done"


@pytest.mark.anyio
async def test_progress_that_stops_is_cut() -> None:
    async def stops() -> object:
        watch = current_watch()
        assert watch is not None
        for _ in range(3):
            await anyio.sleep(0.02)
            watch.moved(1)
        await anyio.sleep(5)
        return "too late"

    with pytest.raises(AttemptTimeout, match=r"no bytes moved for 0\.1 s"):
        await run(Script(stops), policy=RetryPolicy(attempts=1, attempt_deadline=0.1))


@pytest.mark.anyio
async def test_a_sent_request_waits_for_its_answer_past_the_deadline() -> None:
    async def slow_answer() -> object:
        watch = current_watch()
        assert watch is not None
        watch.sent()
        await anyio.sleep(0.2)
        return "answer"

    assert await run(Script(slow_answer), policy=RetryPolicy(attempts=1, attempt_deadline=0.05)) == "answer"


@pytest.mark.anyio
async def test_the_total_cap_cuts_a_trickle() -> None:
    async def forever() -> object:
        watch = current_watch()
        assert watch is not None
        while True:
            await anyio.sleep(0.01)
            watch.moved(1)

    # cap = 2 × 0.05 + 1 MiB / 1 GiB/s ≈ 0.1 s
    policy = RetryPolicy(attempts=1, attempt_deadline=0.05, min_throughput=float(1 << 30))
    with pytest.raises(AttemptTimeout, match="still unfinished"):
        await run(Script(forever), policy=policy)


@pytest.mark.anyio
async def test_each_attempt_has_its_own_watch() -> None:
    seen: list[AttemptWatch] = []

    async def record() -> object:
        watch = current_watch()
        assert watch is not None
        seen.append(watch)
        if len(seen) < 3:
            raise Transient("again")
        return "ok"

    assert await run(Script(record)) == "ok"
    assert len({id(w) for w in seen}) == 3
    assert current_watch() is None


@pytest.mark.anyio
async def test_every_retry_is_reported_with_its_attempt_and_reason() -> None:
    reported: list[tuple[int, str, float]] = []
    sleep = FakeSleep()
    errors = [Transient("first"), Transient("second")]
    result = await call_with_retries(
        Script(*errors, "ok"),
        policy=POLICY,
        retryable=is_transient,
        sleep=sleep,
        rng=random.Random(3),
        on_retry=lambda attempt, error, delay: reported.append((attempt, str(error), delay)),
    )
    assert result == "ok"
    assert [(a, e) for a, e, _ in reported] == [(1, "first"), (2, "second")]
    assert [d for _, _, d in reported] == sleep.delays


@pytest.mark.anyio
async def test_the_last_failure_is_not_reported_as_a_retry() -> None:
    reported: list[int] = []
    with pytest.raises(Transient):
        await call_with_retries(
            Script(Transient("x")),
            policy=RetryPolicy(attempts=3),
            retryable=is_transient,
            sleep=FakeSleep(),
            on_retry=lambda attempt, error, delay: reported.append(attempt),
        )
    assert reported == [1, 2]


@pytest.mark.anyio
async def test_an_outer_cancellation_is_not_turned_into_a_timeout() -> None:
    with anyio.move_on_after(0.05) as scope:
        await run(Script(stall), policy=RetryPolicy(attempts=3, attempt_deadline=10.0))
    assert scope.cancelled_caught
