"""Multipart planning: how big each part is, so a dump of unknown length never hits the part-count cliff.

PURE. S3 allows 10,000 parts of 5 MiB–5 GiB; some compatible stores only 1,000. A fixed part size breaks
on large files (pgBackRest failed on files over ~50 GiB with 5 MiB parts). We size the first parts from the
database's size with headroom, and then, as a second line of defence against a bad estimate, double the
part size each time a quarter of the part budget is used: capacity grows geometrically, memory grows only
for the dumps that need it.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict

MIB: Final = 1 << 20
S3_MIN_PART_SIZE: Final = 5 * MIB
S3_MAX_PART_SIZE: Final = 5 * 1024 * MIB
S3_MAX_PARTS: Final = 10_000
DEFAULT_MIN_PART_SIZE: Final = 8 * MIB
ESTIMATE_HEADROOM: Final = 2.0
_GROWTH_STAGES: Final = 4


def initial_part_size(
    estimated_bytes: int | None,
    max_parts: int = S3_MAX_PARTS,
    min_part_size: int = DEFAULT_MIN_PART_SIZE,
) -> int:
    """Smallest MiB-aligned size whose first growth stage alone holds ``estimated_bytes`` × headroom."""
    if max_parts < _GROWTH_STAGES:
        raise ValueError(f"max_parts must be at least {_GROWTH_STAGES}")
    size = max(min_part_size, S3_MIN_PART_SIZE)
    if estimated_bytes:
        per_stage = max_parts // _GROWTH_STAGES
        needed = int(estimated_bytes * ESTIMATE_HEADROOM) // per_stage + 1
        size = max(size, needed)
    size = -(-size // MIB) * MIB
    return min(size, S3_MAX_PART_SIZE)


def part_size_for(part_number: int, base_size: int, max_parts: int = S3_MAX_PARTS) -> int:
    """Size of part ``part_number`` (1-based): ``base_size`` doubled once per quarter of the budget used."""
    if not 1 <= part_number <= max_parts:
        raise ValueError(f"part number {part_number} outside 1..{max_parts}")
    stage = min((part_number - 1) * _GROWTH_STAGES // max_parts, _GROWTH_STAGES - 1)
    return min(base_size << stage, S3_MAX_PART_SIZE)


def capacity(base_size: int, max_parts: int = S3_MAX_PARTS) -> int:
    """Total bytes an upload can hold before running out of parts."""
    return sum(part_size_for(n, base_size, max_parts) for n in range(1, max_parts + 1))


class PartRun(BaseModel):
    """A run of consecutive multipart parts of one size (the part size grows for very large dumps)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int
    count: int
