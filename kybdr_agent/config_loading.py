"""Reading ``agent.toml`` and describing what is wrong with it, for ``config.load_settings``.

Kept apart from the models because its job is the operator's view of a failure: the file read once and
bounded, and every problem one line naming the field, with no value that could be a secret echoed back.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from kybdr_agent.errors import ConfigError

MAX_CONFIG_BYTES: Final = 1 << 20
MAX_PROBLEMS_SHOWN: Final = 20


def read_toml(path: Path, *, required: bool) -> dict[str, Any] | None:
    """The parsed file, or None when the default location holds none. Read once, at most 1 MiB."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return None
    except OSError as exc:  # EACCES on a directory in the way: an unreadable config is not "no config"
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"cannot read config file {path}: Is a directory")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a configuration file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): a TOML file must be UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{path}: not valid TOML: {printable(str(exc))}") from None


def source_name(source: Path | None) -> str:
    return str(source) if source else "configuration (defaults and KYBDR_* environment)"


def printable(text: str, limit: int = 200) -> str:
    """One line of plain text: control characters escaped (no terminal escapes, no forged lines), clipped."""
    cleaned = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def _shown_value(value: object) -> str:
    """Only numbers and booleans are echoed: a string could be a DSN with a password in it, whatever
    field it landed in, and the message already says what a valid value looks like."""
    if isinstance(value, bool):
        return f" (got {value!r})"
    if isinstance(value, int) and abs(value) < 10**30:
        return f" (got {value!r})"
    if isinstance(value, float):
        return f" (got {value!r})"
    return ""


def _redacted(message: str, value: object) -> str:
    """A validator's message with the offending string taken out: some quote it (a cron parser saying what
    it could not parse), and a string in the wrong field may be a DSN with a password in it."""
    if isinstance(value, str) and len(value) >= 3:
        for shown in (repr(value), value):
            message = message.replace(shown, "(the value)")
    return message


def describe_errors(source: Path | None, exc: ValidationError) -> str:
    errors = exc.errors()
    lines = [f"{source_name(source)}: {len(errors)} problem(s):"]
    for err in errors[:MAX_PROBLEMS_SHOWN]:
        loc = printable(".".join(str(part) for part in err["loc"]) or "(top level)", 120)
        message = printable(_redacted(err["msg"].removeprefix("Value error, "), err.get("input")), 300)
        shown = ""
        if err["type"] not in ("missing", "extra_forbidden"):
            shown = _shown_value(err.get("input"))
        if err["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling against config/agent.example.toml)"
        lines.append(f"  {loc}: {message}{shown}")
    if len(errors) > MAX_PROBLEMS_SHOWN:
        lines.append(f"  … and {len(errors) - MAX_PROBLEMS_SHOWN} more")
    return "\n".join(lines)
