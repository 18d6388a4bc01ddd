"""The agent's notion of now, injected: tests and the scheduler's make-up logic need a clock they control."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)
