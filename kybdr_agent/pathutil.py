"""Judging a path that may not exist yet by the directory it would be created in."""

from __future__ import annotations

import os
from pathlib import Path


class NothingExists(OSError):
    """Not even the root of the path exists (a relative path from a vanished working directory)."""


def nearest_existing(path: Path) -> tuple[Path, os.stat_result]:
    """``path`` or its nearest existing ancestor, with its ``stat``: what a later ``mkdir -p`` builds on.

    Raises ``NothingExists`` when no ancestor exists, or the ``OSError`` of a ``stat`` that failed for
    another reason (a permission, an I/O error) — never a half-checked answer."""
    probe = path
    while True:
        try:
            return probe, os.stat(probe)
        except FileNotFoundError:
            if probe == probe.parent:
                raise NothingExists(f"no directory of {path} exists") from None
            probe = probe.parent
