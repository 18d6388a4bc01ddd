"""Which job the running code works for, so a log line or a span can say so without being handed it.

The job manager sets ``current_job_id`` in the task that runs a job; tasks that job starts inherit it
(contextvars are copied into new tasks), so the pipeline's stages log under the job's id too."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Final

current_job_id: Final[ContextVar[str | None]] = ContextVar("kybdr_job_id", default=None)
current_job_kind: Final[ContextVar[str | None]] = ContextVar("kybdr_job_kind", default=None)
