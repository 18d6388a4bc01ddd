"""An append-only journal of finished jobs (JSON lines, fsynced), the agent's durable memory of outcomes.

Backups that failed leave no manifest, so success rates and "last failure" can only come from here. One
line per finished job; readers tolerate a torn last line (a crash mid-append) by skipping it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self, kind: str | None = None) -> Iterator[dict[str, Any]]:
        try:
            fh = open(self.path, encoding="utf-8")  # noqa: SIM115 - closed in finally below
        except FileNotFoundError:
            return
        try:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and (kind is None or record.get("kind") == kind):
                    yield record
        finally:
            fh.close()
