"""CloudWatch's ``PutMetricData`` limits, and the arithmetic that keeps every request within them.

PURE. Series, datums, sizes and batches are functions of their arguments: no client, no clock, no lock.
Why apart from :mod:`kybdr_agent.telemetry.cloudwatch`. The publisher's job is buffering and sending,
off the hot path; what a request may hold is a contract with CloudWatch, worth testing exhaustively on its
own. A request carries at most ``MAX_DATUMS_PER_CALL`` datums and ``MAX_REQUEST_BYTES``; each series is
sized by an upper bound of the largest wire encoding (the query protocol, every byte escaped), computed by
arithmetic only so that planning a flush of thousands of series never holds the event loop. Values are
clamped into the range CloudWatch accepts (``MAX_VALUE``, ``MIN_VALUE``), and dimension values are cut to
``MAX_DIMENSION_VALUE`` characters by the caller; datums older than ``MAX_DATUM_AGE`` are refused upstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

MAX_DATUMS_PER_CALL: Final = 1000  # PutMetricData: at most 1000 MetricData items per request
MAX_REQUEST_BYTES: Final = 1_000_000  # PutMetricData: at most 1 MB per HTTP POST (the decimal reading)
REQUEST_OVERHEAD_BYTES: Final = 8192  # action, version, namespace, headers: kept free in every request
MAX_DIMENSION_VALUE: Final = 1024  # characters in a dimension value
MAX_VALUE: Final = 1e100  # CloudWatch rejects magnitudes above 2**360 (≈ 2.3e108) and below 2**-260 (≈ 5e-79)
MIN_VALUE: Final = 1e-70
MAX_DATUM_AGE: Final = timedelta(days=14) - timedelta(hours=1)  # CloudWatch refuses older timestamps

SeriesKey = tuple[str, tuple[tuple[str, str], ...], str]  # (metric, ((dimension, value), ...), unit)


@dataclass
class Series:
    """One series' samples since the last flush, as CloudWatch's ``StatisticValues``."""

    count: float
    total: float
    minimum: float
    maximum: float
    last_at: datetime

    @classmethod
    def of(cls, value: float, at: datetime) -> Series:
        return cls(1.0, value, value, value, at)

    def add(self, other: Series) -> None:
        self.count += other.count
        self.total += other.total
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)
        self.last_at = max(self.last_at, other.last_at)


def datum(key: SeriesKey, series: Series) -> dict[str, Any]:
    """The ``MetricData`` item of one series."""
    name, dimensions, unit = key
    return {
        "MetricName": name,
        "Dimensions": [{"Name": n, "Value": v} for n, v in dimensions],
        "Timestamp": series.last_at,
        "StatisticValues": {
            "SampleCount": series.count,
            "Sum": bounded(series.total),
            "Minimum": series.minimum,
            "Maximum": series.maximum,
        },
        "Unit": unit,
    }


_ITEM_PREFIX: Final = len("MetricData.member.1000.")  # every key of the query protocol's rendering starts so
_ESCAPED_SCALAR: Final = 48  # a number (repr: ≤ 24 characters) or an ISO timestamp (32), escapes included
_FIXED_BYTES: Final = sum(
    _ITEM_PREFIX + len(field) + 2 + _ESCAPED_SCALAR  # "key=value&"
    for field in (
        "MetricName",
        "Unit",
        "Timestamp",
        "StatisticValues.SampleCount",
        "StatisticValues.Sum",
        "StatisticValues.Minimum",
        "StatisticValues.Maximum",
    )
)
_DIMENSION_BYTES: Final = 2 * (_ITEM_PREFIX + 2) + len("Dimensions.member.30.Name") + len("Dimensions.member.30.Value")


def encoded_size(key: SeriesKey) -> int:
    """An upper bound of one series' bytes in a request: its form-encoded query-protocol rendering with every
    byte of every value escaped, the most verbose of CloudWatch's protocols (CBOR and JSON, which botocore
    prefers, are smaller). Arithmetic only: a flush of ``MAX_SERIES`` series must not hold the event loop."""
    name, dimensions, unit = key
    size = _FIXED_BYTES + 3 * (len(name.encode()) + len(unit.encode()))
    for dimension, value in dimensions:
        size += _DIMENSION_BYTES + 3 * (len(dimension.encode()) + len(value.encode()))
    return size


def plan_batches(
    keys: Sequence[SeriesKey],
    *,
    max_count: int = MAX_DATUMS_PER_CALL,
    max_bytes: int = MAX_REQUEST_BYTES - REQUEST_OVERHEAD_BYTES,
) -> list[list[SeriesKey]]:
    """Split ``keys`` into requests of at most ``max_count`` series and ``max_bytes`` (bounded above) each."""
    batches: list[list[SeriesKey]] = []
    current: list[SeriesKey] = []
    size = 0
    for key in keys:
        key_size = encoded_size(key)
        if current and (len(current) >= max_count or size + key_size > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(key)
        size += key_size
    if current:
        batches.append(current)
    return batches


def bounded(value: float) -> float:
    """``value`` within what CloudWatch accepts: a magnitude too small is 0, one too large is clamped."""
    if abs(value) < MIN_VALUE:
        return 0.0
    return max(-MAX_VALUE, min(MAX_VALUE, value))
