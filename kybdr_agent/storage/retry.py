"""Bounded retries with full-jitter exponential backoff, and a watch on each attempt: time without progress.

Every remote call goes through here, so nothing retries forever (a fixed number of attempts) and nothing
hangs. What ends an attempt is not how long the whole request takes — an 840 MiB part over a modest uplink
legitimately takes many minutes — but how long *no byte moved*:

- while the request is being sent, the transport reports each chunk the socket takes (``AttemptWatch.moved``)
  and the attempt is cut once nothing moved for ``attempt_deadline`` seconds;
- once it is sent (``AttemptWatch.sent``), waiting for the answer is timed by the HTTP client's own per-read
  timeout, set to the same seconds and restarted by every byte received;
- a total cap per attempt, proportional to the bytes it carries at a floor throughput
  (``RetryPolicy.attempt_cap``), bounds a peer that trickles just fast enough never to stall.

An operation that reports no progress at all is cut ``attempt_deadline`` seconds after it started. The
watch is found through a context variable (``current_watch``), so the transport needs no plumbing through
the client library, and judged by a timer on the event loop (the agent runs on asyncio), not a polling
task. Its judgement is pure (``AttemptWatch.verdict``) and is tested with made-up clocks; ``sleep`` is
injected so tests need not wait for backoffs.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Final, TypeVar

import anyio

T = TypeVar("T")

DEFAULT_ATTEMPTS: Final = 5
DEFAULT_BASE_DELAY: Final = 0.25
DEFAULT_MAX_DELAY: Final = 10.0
DEFAULT_MIN_THROUGHPUT: Final = 64 * 1024
ANSWER_ALLOWANCE: Final = 1 << 20  # an answer's bytes the cap allows for: a listing page, an error document


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempt_deadline`` is the stall deadline: seconds without a byte moving, not a bound on a request."""

    attempts: int = DEFAULT_ATTEMPTS
    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    attempt_deadline: float = 120.0
    min_throughput: float = DEFAULT_MIN_THROUGHPUT

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("a retry policy needs at least one attempt")
        if self.attempt_deadline <= 0:
            raise ValueError("the attempt deadline must be positive")
        if self.min_throughput <= 0:
            raise ValueError("the minimum throughput must be positive")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, min(max, base·2^attempt)]."""
        return rng.uniform(0, min(self.max_delay, self.base_delay * (2**attempt)))

    def attempt_cap(self, size: int) -> float:
        """The most one attempt carrying ``size`` bytes may take however steadily it progresses.

        One stall deadline to get going, one for the answer, and the bytes (plus an answer's) at the floor
        throughput: 64 KiB/s gives a 5 MiB part 240 s + 96 s, an 840 MiB part about 4 hours.
        """
        return 2 * self.attempt_deadline + (size + ANSWER_ALLOWANCE) / self.min_throughput

    def watch(self, size: int, now: float, clock: Callable[[], float]) -> AttemptWatch:
        return AttemptWatch(
            stall=self.attempt_deadline, cap=self.attempt_cap(size), floor=self.min_throughput, now=now, clock=clock
        )


class AttemptTimeout(TimeoutError):
    """One attempt was cut: no byte moved for the stall deadline, or it outlived its total cap."""


class AttemptWatch:
    """One attempt's evidence of life: when a byte last moved, and whether the request is still being sent.

    Fed by the transport (``moved``, ``sent``), judged by ``verdict`` whenever ``next_check`` comes round.
    """

    def __init__(self, *, stall: float, cap: float, floor: float, now: float, clock: Callable[[], float]) -> None:
        self.stall = stall
        self.cap = cap
        self.floor = floor
        self.started = now
        self.last_moved = now
        self.sending = True
        self.bytes_moved = 0
        self._clock = clock

    @property
    def tail_allowance(self) -> int:
        """Unsent bytes that leave within half a stall deadline even at the floor throughput.

        A sender may hand the answer's timing to the HTTP client once no more than this is still queued in
        its socket: the rest cannot hold up the answer long enough to look like a stall.
        """
        return int(self.floor * self.stall / 2)

    def moved(self, nbytes: int = 0) -> None:
        self.last_moved = self._clock()
        self.bytes_moved += nbytes

    def sent(self) -> None:
        """The request is out: from here the answer's own per-read timeout watches for a stall."""
        self.moved()
        self.sending = False

    def verdict(self, now: float) -> str | None:
        """Why the attempt must be cut at ``now``, or None while it may go on."""
        if now - self.started >= self.cap:
            return f"still unfinished after {self.cap:.0f} s, the most one attempt of this size may take"
        if self.sending and now - self.last_moved >= self.stall:
            return f"no bytes moved for {self.stall:g} s (sending the request)"
        return None

    def next_check(self) -> float:
        """When ``verdict`` can next change its mind (unless more progress comes first)."""
        cap_at = self.started + self.cap
        return min(cap_at, self.last_moved + self.stall) if self.sending else cap_at


_WATCH: ContextVar[AttemptWatch | None] = ContextVar("kybdr_attempt_watch", default=None)


def current_watch() -> AttemptWatch | None:
    """The watch of the attempt running in this task (None outside one), for the transport to feed."""
    return _WATCH.get()


async def _watched(operation: Callable[[], Awaitable[T]], watch: AttemptWatch) -> T:
    """Run one attempt, cancelling it when its watch says so; a timer, not a polling loop."""
    loop = asyncio.get_running_loop()
    reason: str | None = None
    with anyio.CancelScope() as scope:
        timer: list[asyncio.TimerHandle] = []

        def check() -> None:
            nonlocal reason
            reason = watch.verdict(loop.time())
            if reason is not None:
                scope.cancel()
            else:
                timer[:] = [loop.call_at(watch.next_check(), check)]

        check()
        token = _WATCH.set(watch)
        try:
            return await operation()
        except Exception as exc:
            if reason is not None:
                raise AttemptTimeout(reason) from exc
            raise
        finally:
            _WATCH.reset(token)
            for handle in timer:
                handle.cancel()
    raise AttemptTimeout(reason or "cancelled by its watch")


async def call_with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    retryable: Callable[[BaseException], bool],
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    rng: random.Random | None = None,
    size: int = 0,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Run ``operation`` until it succeeds, fails with a non-retryable error, or the attempts run out.

    ``size`` is the bytes one attempt carries (it scales the total cap). ``on_retry(attempt, error, delay)``
    is told of each failed attempt that will be retried, so retries are never silent.
    """
    rng = rng or random.Random()  # noqa: S311 - jitter needs no cryptographic randomness
    loop = asyncio.get_running_loop()
    for attempt in range(policy.attempts):
        try:
            return await _watched(operation, policy.watch(size, loop.time(), loop.time))
        except AttemptTimeout as exc:
            error: BaseException = exc
        except Exception as exc:
            if not retryable(exc):
                raise
            error = exc
        if attempt + 1 >= policy.attempts:
            raise error
        delay = policy.delay(attempt, rng)
        if on_retry is not None:
            on_retry(attempt + 1, error, delay)
        await sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")
