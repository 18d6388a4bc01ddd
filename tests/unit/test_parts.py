"""Multipart planning (kybdr_agent/storage/parts.py): part sizes are legal for S3, grow monotonically, and
leave enough capacity for twice the estimated dump size."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kybdr_agent.storage.parts import (
    DEFAULT_MIN_PART_SIZE,
    MIB,
    S3_MAX_PART_SIZE,
    S3_MAX_PARTS,
    S3_MIN_PART_SIZE,
    capacity,
    initial_part_size,
    part_size_for,
)

TIB = 1 << 40
GIB = 1 << 30

estimates = st.one_of(st.none(), st.integers(0, 5 * TIB))
part_budgets = st.sampled_from([1000, 10_000])
min_sizes = st.integers(0, S3_MAX_PART_SIZE)


@given(estimates, st.integers(4, 20_000), min_sizes)
@settings(max_examples=300)
def test_initial_part_size_is_a_legal_mib_aligned_s3_part(
    estimate: int | None, max_parts: int, min_part_size: int
) -> None:
    size = initial_part_size(estimate, max_parts, min_part_size)
    assert size % MIB == 0
    assert S3_MIN_PART_SIZE <= size <= S3_MAX_PART_SIZE
    assert size >= min_part_size


@given(estimates, part_budgets, st.integers(0, 512 * MIB))
@settings(max_examples=60, deadline=None)
def test_capacity_holds_twice_the_estimate(estimate: int | None, max_parts: int, min_part_size: int) -> None:
    wanted = 2 * (estimate or 0)
    ceiling = max_parts * S3_MAX_PART_SIZE  # nothing can hold more than max_parts 5 GiB parts
    size = initial_part_size(estimate, max_parts, min_part_size)
    assert capacity(size, max_parts) >= min(wanted, ceiling)


@given(st.integers(1, 5 * TIB), part_budgets)
@settings(max_examples=300)
def test_first_quarter_of_parts_holds_twice_the_estimate_unless_capped(estimate: int, max_parts: int) -> None:
    size = initial_part_size(estimate, max_parts)
    if size < S3_MAX_PART_SIZE:
        assert size * (max_parts // 4) > 2 * estimate


@pytest.mark.parametrize("max_parts", [1000, 10_000])
def test_capacity_at_five_tib(max_parts: int) -> None:
    estimate = 5 * TIB
    size = initial_part_size(estimate, max_parts)
    if max_parts == S3_MAX_PARTS:
        assert capacity(size, max_parts) >= 2 * estimate
    else:
        # 1000 parts of at most 5 GiB cannot hold 10 TiB: the plan uses the largest parts allowed.
        assert size == S3_MAX_PART_SIZE
        assert capacity(size, max_parts) == max_parts * S3_MAX_PART_SIZE


@given(estimates, part_budgets, min_sizes)
@settings(max_examples=200)
def test_initial_part_size_is_the_smallest_that_fits(estimate: int | None, max_parts: int, min_part_size: int) -> None:
    size = initial_part_size(estimate, max_parts, min_part_size)
    smaller = size - MIB
    floor = max(min_part_size, S3_MIN_PART_SIZE)
    if smaller >= floor and size < S3_MAX_PART_SIZE:
        # One MiB less would not hold the estimate with headroom in the first quarter of the parts.
        assert smaller * (max_parts // 4) <= 2 * (estimate or 0)


@given(st.integers(0, 5 * TIB), st.integers(0, 5 * TIB), part_budgets)
@settings(max_examples=200)
def test_initial_part_size_is_monotonic_in_the_estimate(a: int, b: int, max_parts: int) -> None:
    low, high = sorted((a, b))
    assert initial_part_size(low, max_parts) <= initial_part_size(high, max_parts)


@pytest.mark.parametrize("estimate", [None, 0])
def test_no_estimate_gives_the_minimum(estimate: int | None) -> None:
    assert initial_part_size(estimate) == DEFAULT_MIN_PART_SIZE
    assert initial_part_size(estimate, min_part_size=1) == S3_MIN_PART_SIZE
    assert initial_part_size(estimate, min_part_size=5 * MIB + 1) == 6 * MIB


def test_known_sizes() -> None:
    # 100 GiB with 2x headroom over 2500 parts: 81.92 MiB -> 82 MiB.
    assert initial_part_size(100 * GIB) == 82 * MIB
    # The same over 250 parts (a 1000-part store): 819.2 MiB -> 820 MiB.
    assert initial_part_size(100 * GIB, 1000) == 820 * MIB
    assert initial_part_size(50 * TIB) == S3_MAX_PART_SIZE


@pytest.mark.parametrize("max_parts", [-1, 0, 1, 3])
def test_too_few_parts_is_an_error(max_parts: int) -> None:
    with pytest.raises(ValueError, match="max_parts"):
        initial_part_size(GIB, max_parts)


@given(st.integers(4, 20_000), st.sampled_from([5 * MIB, 16 * MIB, 100 * MIB, 3 * GIB, S3_MAX_PART_SIZE]), st.data())
@settings(max_examples=200)
def test_part_size_is_non_decreasing(max_parts: int, base: int, data: st.DataObject) -> None:
    a = data.draw(st.integers(1, max_parts), label="a")
    b = data.draw(st.integers(a, max_parts), label="b")
    assert part_size_for(a, base, max_parts) <= part_size_for(b, base, max_parts)
    assert base <= part_size_for(a, base, max_parts) <= max(base, S3_MAX_PART_SIZE)


@pytest.mark.parametrize("max_parts", [4, 7, 1000, 10_000])
def test_part_sizes_double_once_per_quarter(max_parts: int) -> None:
    base = 16 * MIB
    sizes = [part_size_for(n, base, max_parts) for n in range(1, max_parts + 1)]
    assert sizes == sorted(sizes)
    assert sizes[0] == base
    assert sizes[-1] == base << 3
    assert sorted(set(sizes)) == [base, base << 1, base << 2, base << 3]
    for previous, current in itertools.pairwise(sizes):
        assert current in (previous, previous * 2)


def test_part_size_never_exceeds_s3_maximum() -> None:
    assert part_size_for(S3_MAX_PARTS, 2 * GIB) == S3_MAX_PART_SIZE
    assert capacity(S3_MAX_PART_SIZE) == S3_MAX_PARTS * S3_MAX_PART_SIZE


@pytest.mark.parametrize("max_parts", [4, 1000, 10_000])
def test_capacity_is_the_sum_of_part_sizes(max_parts: int) -> None:
    base = 5 * MIB
    quarter = max_parts // 4
    assert capacity(base, max_parts) == quarter * base * (1 + 2 + 4 + 8)


@pytest.mark.parametrize("part_number", [0, -1, 10_001, 20_000])
def test_part_number_out_of_range(part_number: int) -> None:
    with pytest.raises(ValueError, match="part number"):
        part_size_for(part_number, 16 * MIB)


def test_part_number_limit_follows_max_parts() -> None:
    assert part_size_for(1000, 16 * MIB, 1000) == 128 * MIB
    with pytest.raises(ValueError, match=r"1\.\.1000"):
        part_size_for(1001, 16 * MIB, 1000)
