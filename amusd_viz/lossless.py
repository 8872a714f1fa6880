"""When may two greedy runs of the same target part? The honest near-tie rule
(docs/architecture.md, "Invariants"). No torch, no textual.

A run may part from the target alone (`ar`) only where exactness is not promised (bf16/float16
anywhere, float32 on CUDA, whose kernels differ between one- and k-token passes) and only at a
real near-tie: the diverging token is among `ar`'s top candidates at that position (bf16 logits
often tie three ways, and an exact tie may be listed either way round) and its logit lies within
a few units in the last place (ulps) of the dtype of the logit of `ar`'s own choice. Anything
else is a bug.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# mantissa bits of each dtype: one ulp at magnitude m is 2 ** (floor(log2 m) - bits)
MANTISSA_BITS = {"bfloat16": 7, "float16": 10, "float32": 23}
# How far apart two logits may be and still swap between one- and k-token passes. bf16 runs of
# the default pair parted at gaps of 0 to 2 ulps (docs/benchmarks.md); float32 on CUDA differs
# by reordered sums over a few thousand terms, a relative error near 1e-5 (~100 ulps).
NEAR_TIE_ULPS = {"bfloat16": 4, "float16": 4, "float32": 128}


@dataclass(frozen=True)
class TopTwo:
    """The reference run's own choice at one position and another candidate, as raw logits."""

    first_id: int
    first_logit: float
    second_id: int
    second_logit: float

    @property
    def gap(self) -> float:
        return self.first_logit - self.second_logit


def exact(dtype: str, device: str) -> bool:
    """float32 on a CPU: every strategy must give `ar`'s greedy ids exactly. The logits of
    one-token, multi-token and tree-masked passes (and of one thread or two) still differ in
    their last bits (~1e-6), so only a tie closer than that could part them: none has in the
    identity tests, and the strict verdict would name one as a failure to look at."""
    return dtype == "float32" and not device.startswith("cuda")


def ulp(x: float, dtype: str) -> float:
    """One unit in the last place of `dtype` at the magnitude of x."""
    bits = MANTISSA_BITS[dtype]
    magnitude = max(abs(x), 2.0 ** -14)  # below that, logits are not where ties come from
    return 2.0 ** (math.floor(math.log2(magnitude)) - bits)


def tolerance(top: TopTwo, dtype: str) -> float:
    magnitude = max(abs(top.first_logit), abs(top.second_logit))
    return NEAR_TIE_ULPS[dtype] * ulp(magnitude, dtype)


def is_near_tie(token: int, top: TopTwo | None, dtype: str, device: str) -> bool:
    """May a run that chose `token` where `ar` chose `top.first_id` still be correct?"""
    if exact(dtype, device) or top is None or token != top.second_id:
        return False
    return abs(top.gap) <= tolerance(top, dtype)  # an exact tie may be listed either way round


def top_two(candidates: list[dict], token: int | None = None,
            chosen: int | None = None) -> TopTwo | None:
    """From a logged top list ({"id", "logit", ...} dicts, best first): the reference's own
    choice (`chosen`; at an exact tie the list's order may put another token first) and
    `token` where it is among the others (else the best other); None without logits (a log
    from before logits were recorded, or a sampled run's top of p)."""
    if len(candidates) < 2 or any(c.get("logit") is None for c in candidates):
        return None
    first = next((c for c in candidates if c["id"] == chosen), candidates[0])
    others = [c for c in candidates if c is not first]
    other = next((c for c in others if c["id"] == token), others[0])
    return TopTwo(int(first["id"]), float(first["logit"]), int(other["id"]), float(other["logit"]))


def note(dtype: str, device: str = "cpu") -> str | None:
    """What a run summary says about exactness (None where it is exact)."""
    if exact(dtype, device):
        return None
    where = f"{dtype} on {device}" if device.startswith("cuda") else dtype
    return (f"{where}: exact greedy equality with the target alone holds up to numeric near-ties "
            "(one- and multi-token passes round differently); use --dtype float32 on a CPU for "
            "exact comparisons")
