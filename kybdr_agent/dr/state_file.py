"""The DR component's small durable state (current state, switches, counters) as one JSON file.

Written whole and atomically — a temp file in the same folder, fsynced, renamed over the old one, then the
folder fsynced — so a crash or ``kill -9`` at any moment leaves the old state or the new one, never a mix:
a restarted agent must not come back with its switches half-written (auto-failover silently on, say).
Mode 0600: the state names hosts and DSN-derived details an unprivileged user has no business reading.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any, Final

from kybdr_agent.errors import KybdrError

MAX_STATE_BYTES: Final = 4 << 20  # the state is a few KiB; anything this large is not ours
FILE_MODE: Final = 0o600


def json_default(value: object) -> str:
    """How values JSON has no type for are written: datetimes as ISO 8601 (what ``fromisoformat`` reads
    back), anything else (paths, enums) as its ``str()``."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


class StateFileError(KybdrError):
    """The DR state file exists but cannot be read back as a JSON object: the agent stops rather than
    guess its switches (an operator can inspect the file, and move it aside to start from defaults)."""


def load_state(path: Path) -> dict[str, Any] | None:
    """The saved state, or None when there is none yet (first start)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read the DR state file {path}: {exc.strerror}") from exc
    if len(raw) > MAX_STATE_BYTES:
        raise StateFileError(f"the DR state file {path} is larger than {MAX_STATE_BYTES} bytes: not a state file")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise StateFileError(
            f"the DR state file {path} is corrupt ({exc}); move it aside to start from the defaults"
        ) from None
    if not isinstance(data, dict):
        raise StateFileError(f"the DR state file {path} does not hold a JSON object; move it aside to start over")
    return data


def save_state(path: Path, data: Mapping[str, Any]) -> None:
    """Replace the state atomically and durably (see the module docstring). Values that are not JSON
    are written as ``json_default`` says (datetimes in ISO 8601)."""
    encoded = json.dumps(dict(data), default=json_default, sort_keys=True, indent=1).encode() + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            view = memoryview(encoded)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise StateFileError(f"cannot write the DR state file {path}: {exc.strerror}") from exc
    finally:
        temp.unlink(missing_ok=True)


def fsync_dir(directory: Path) -> None:
    """Make a create or rename in ``directory`` durable (the entry lives in the folder, not the file)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
