"""Bounded retries with full-jitter exponential backoff and a stall deadline per attempt.

Every remote call goes through here, so nothing can hang (each attempt has a deadline) and nothing retries
forever (a fixed number of attempts). Time is injected (``sleep``) so tests need not wait.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import anyio

T = TypeVar("T")

DEFAULT_ATTEMPTS: Final = 5
DEFAULT_BASE_DELAY: Final = 0.25
DEFAULT_MAX_DELAY: Final = 10.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = DEFAULT_ATTEMPTS
    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    attempt_deadline: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("a retry policy needs at least one attempt")
        if self.attempt_deadline <= 0:
            raise ValueError("the attempt deadline must be positive")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, min(max, base·2^attempt)]."""
        return rng.uniform(0, min(self.max_delay, self.base_delay * (2**attempt)))


class AttemptTimeout(TimeoutError):
    """One attempt exceeded its stall deadline."""


async def call_with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    retryable: Callable[[BaseException], bool],
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    rng: random.Random | None = None,
) -> T:
    """Run ``operation`` until it succeeds, fails with a non-retryable error, or the attempts run out."""
    rng = rng or random.Random()  # noqa: S311 - jitter needs no cryptographic randomness
    for attempt in range(policy.attempts):
        try:
            with anyio.fail_after(policy.attempt_deadline):
                return await operation()
        except TimeoutError as exc:
            error: BaseException = AttemptTimeout(f"no progress within {policy.attempt_deadline:g} s")
            error.__cause__ = exc
        except Exception as exc:
            if not retryable(exc):
                raise
            error = exc
        if attempt + 1 >= policy.attempts:
            raise error
        await sleep(policy.delay(attempt, rng))
    raise AssertionError("unreachable: the loop returns or raises")
