"""Small async helpers shared by the pipelines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskGroup


def leaf_exceptions(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaf_exceptions(inner)
    else:
        yield exc


def primary_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that caused a task group to fail, not the cancellations it caused in its siblings.

    Task groups report every failed child; an operator needs the one that started it (the store that
    refused a part, not the reader that was cancelled because of it). The agent runs on asyncio only
    (aiobotocore and asyncpg need it), so asyncio's cancellation class is the one to skip."""
    leaves = list(leaf_exceptions(group))
    for leaf in leaves:
        if not isinstance(leaf, asyncio.CancelledError | KeyboardInterrupt):
            return leaf
    return leaves[0]


class TailBuffer:
    """Keeps the last ``limit`` bytes of a stream (a child's stderr) so memory stays bounded."""

    def __init__(self, limit: int = 16 * 1024) -> None:
        self._limit = limit
        self._data = bytearray()
        self.truncated = False

    def feed(self, data: bytes) -> None:
        self._data += data
        if len(self._data) > self._limit:
            del self._data[: len(self._data) - self._limit]
            self.truncated = True

    def text(self) -> str:
        text = self._data.decode("utf-8", "replace").strip()
        return ("…" + text) if self.truncated else text


@asynccontextmanager
async def task_group() -> AsyncIterator[TaskGroup]:
    """An anyio task group that raises the error that mattered, not an ExceptionGroup of it and its echoes."""
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        raise primary_error(group) from None
