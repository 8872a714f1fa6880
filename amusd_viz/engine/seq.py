"""Token-sequence helpers shared by the coordinator and the workers. No torch."""

from __future__ import annotations


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
