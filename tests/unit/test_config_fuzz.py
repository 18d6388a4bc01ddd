"""Hostile TOML, fuzzed: whatever a config file holds, loading it ends in settings or one ``ConfigError``,
and settings that load can be used — printed (``config check``), turned into policies and schedules — without
an exception. Issue 7, item 11: overflowing durations and numbers, deep nesting and NULs used to escape as
tracebacks, or to pass ``config check`` and crash ``run`` later."""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from kybdr_agent import app
from kybdr_agent.config import AgentSettings, PolicySettings, TokenSettings, load_settings
from kybdr_agent.errors import ConfigError

SECTIONS: dict[str, list[str]] = {}
for _name, _field in AgentSettings.model_fields.items():
    _model = _field.annotation
    if isinstance(_model, type) and issubclass(_model, BaseModel):
        SECTIONS[_name] = list(_model.model_fields)

SECRET = "Fuzz-Pa55word-1234"

HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "\x1b[31m",
    "99999999999999y",
    "1e400s",
    "-5s",
    "0s",
    "9" * 400 + "s",
    "P99999999999Y",
    "P1D",
    "-P1D",
    "nan",
    "inf",
    "../../etc/passwd",
    "/tmp/x.sock",
    "relative/path",
    "x" * 5000,
    "s3://",
    "s3:///x",
    "s3://[::1/x",
    "http://[::1",
    "http://:80",
    "http://host:99999",
    "http://user:" + SECRET + "@host:9000",
    "file:///",
    "file://host/x",
    "postgresql://u:" + SECRET + "@h:notaport/db",
    "host=a password=" + SECRET + " port=x",
    "*/99999999999999999999 * * * *",
    "0 0 30 2 *",
    "@yearly",
    "60 * * * *",
    "* * * * * * *",
    "Etc/../../../etc/passwd",
    "127.0.0.1:0",
    "[::1]:8080",
    "a" * 300 + ":8080",
    "host:-1",
    "é" * 70,
]

HOSTILE_NUMBERS = [0, -1, 1, -5, 2**31, 2**62, 2**63 - 1, -(2**63), 10**30, 1e300, -1e300, 1e-300, 0.5]
hostile = st.sampled_from(HOSTILE_STRINGS + HOSTILE_NUMBERS + [float("nan"), float("inf"), float("-inf")])
scalars = st.one_of(
    hostile,
    hostile,
    hostile,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=40),
    st.datetimes(timezones=st.just(UTC)),
    st.dates(),
    st.times(),
)
values = st.one_of(
    scalars,
    st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.sampled_from(["a", "name", "role", "x"]), inner, max_size=3),
        ),
        max_leaves=8,
    ),
)


def _toml(value: Any) -> str:
    """A TOML literal for ``value`` (inline tables and arrays; JSON string escapes are valid TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise AssertionError(type(value))


BASE: dict[str, dict[str, Any]] = {
    "backup": {"encryption": False},
    "database": {"databases": ["app"]},
    "drill": {"schedule": "0 5 * * 0"},
}
POLICY: dict[str, Any] = {"name": "daily", "schedule": "0 2 * * *", "databases": ["app"]}
POLICY_FIELDS = sorted(PolicySettings.model_fields)
TOKEN_FIELDS = sorted(TokenSettings.model_fields)


@st.composite
def documents(draw: st.DrawFn) -> str:
    """A plausible configuration (so policies, schedules and retention are really built from it) with a
    few fields — top-level, in a policy or in a token entry — replaced by hostile values."""
    body = {section: dict(fields) for section, fields in BASE.items()}
    policies = [dict(POLICY)] if draw(st.booleans()) else []
    tokens: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        where = draw(st.sampled_from(["section", "section", "policy", "token"]))
        if where == "policy":
            if not policies:
                policies.append(dict(POLICY))
            policies[0][draw(st.sampled_from(POLICY_FIELDS))] = draw(values)
        elif where == "token":
            if not tokens:
                tokens.append({"role": "viewer", "token_file": "/nonexistent/token"})
            tokens[0][draw(st.sampled_from(TOKEN_FIELDS))] = draw(values)
        else:
            section = draw(st.sampled_from(sorted(SECTIONS)))
            field = draw(st.sampled_from([f for f in SECTIONS[section] if f not in ("policies", "tokens")]))
            body.setdefault(section, {})[field] = draw(values)
    lines: list[str] = []
    for section, fields in body.items():
        lines.append(f"[{section}]")
        lines += [f"{field} = {_toml(value)}" for field, value in fields.items()]
    for policy in policies:
        lines.append("[[backup.policies]]")
        lines += [f"{field} = {_toml(value)}" for field, value in policy.items()]
    for token in tokens:
        lines.append("[[control.tokens]]")
        lines += [f"{field} = {_toml(value)}" for field, value in token.items()]
    return "\n".join(lines) + "\n"


def _use(settings_: AgentSettings) -> None:
    """What config check and run do with loaded settings, short of touching files and the network."""
    from kybdr_agent.backup.settings import BackupConfig
    from kybdr_agent.backup.slots import next_wakeups

    masked = settings_.masked()
    json.dumps(masked)
    # Where credentials may legitimately sit, they are masked. (A path or a database name is shown as
    # written: whatever string the fuzzer put there is not a credential.)
    for section, key in (("database", "dsn"), ("drill", "dsn"), ("repository", "endpoint_url")):
        assert SECRET not in str(masked[section][key]), (section, key)
    settings_.effective_policies()
    next_wakeups(BackupConfig.from_settings(settings_).slots(), datetime(2026, 11, 24, 2, tzinfo=UTC))
    with contextlib.suppress(ConfigError):  # a password file that does not exist: refused as such
        app.connection(settings_)


@pytest.fixture(scope="module")
def config_file() -> Iterator[Path]:
    """One file, rewritten for each example: a fresh temporary directory per example cost more (its rmdir
    alone) than many a load."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / "agent.toml"


def _load(text: str, path: Path) -> None:
    path.write_text(text, encoding="utf-8")
    try:
        loaded = load_settings(path)
    except ConfigError as exc:
        message = str(exc)
        assert SECRET not in message, message
        assert "Traceback" not in message
        return
    _use(loaded)


# 600 documents of 1-5 replaced fields each: some 1,800 fuzzed values placed across the ~100 fields.
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_hostile_values_load_or_fail_as_one_config_error(config_file: Path, text: str) -> None:
    _load(text, config_file)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_loads_or_fails_as_one_config_error(config_file: Path, text: str) -> None:
    _load(text, config_file)


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=6000), st.sampled_from(["[", "{a = ", "[[", "{x = ["]))
def test_any_nesting_depth_is_one_config_error_or_loads(config_file: Path, depth: int, opener: str) -> None:
    closer = {"[": "]", "{a = ": "}", "[[": "]]", "{x = [": "]}"}[opener]
    _load(
        "[backup]\nencryption = false\n[drill]\nschedule = " + opener * depth + "1" + closer * depth + "\n",
        config_file,
    )
