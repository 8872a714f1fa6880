"""Token-sequence helpers shared by the coordinator and the workers. No torch."""

from __future__ import annotations


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def first_difference(a: list[int], b: list[int], start: int = 0) -> int | None:
    """The first index from `start` on where `a` and `b` (both that long) differ, or None."""
    i = start + common_prefix(a[start:], b[start:])
    return i if i < min(len(a), len(b)) else None
