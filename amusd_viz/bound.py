"""The best a strategy could do with the pass times it measured: a model with no waste.

Given the per-check acceptance a (the chance a draft is accepted, given those before it were),
a pass checking k drafts commits E(k) = 1 + a + ... + a^k tokens on average; with tree passes
(the pass also checks bets beside its drafts, engine/tree.py) a rejection, which comes with
probability 1 - a^k, also yields the run's measured tokens per rejection from bets, b:
E(k) + b·(1 - a^k). Then, with the target's pass taking T and a draft step D:

- **sync** (the two models take turns) spends k·D + T per pass;
- **async** (amusd: the draft drafts the next pass's k tokens while the target verifies) spends
  max(T, k·D) per pass, and only if no draft step is ever wasted: every rejection finds the
  right drafts ready (a perfect speculation cache) and the draft never rolls back.

Since max(T, k·D) >= (k·D + T) / 2, async can beat sync by at most 2/s where the two share
their hardware, s being how much faster a model's pass is on both shares than on one (on two
CPU cores, sync gives each model both cores in turn and async one core each). With its own
pass times a run shows how far it is from its model: sync reaches ~90% of its model on this VM,
amusd about half of its (docs/benchmarks.md): what amusd loses there is waste, not hardware.
Pass times come from the run itself, so contention between the workers is included. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass


def tokens_per_pass(a: float, k: int, bets: float = 0.0) -> float:
    """E(k): the mean tokens a pass commits checking k drafts at per-check acceptance a, plus
    `bets` tokens per rejection that a bet beside the rejected draft won."""
    return float(sum(a ** i for i in range(k + 1))) + bets * (1 - a ** k)


@dataclass(frozen=True)
class Best:
    ms_per_token: float
    drafts: int  # drafts per pass at the best


def sync_best(a: float, target_s: float, draft_s: float, lookahead: int,
              bets: float = 0.0) -> Best:
    """Turn-taking: k draft steps, then the target's pass."""
    return min((Best(1000 * (k * draft_s + target_s) / tokens_per_pass(a, k, bets), k)
                for k in range(lookahead + 1)), key=lambda b: b.ms_per_token)


def async_best(a: float, target_s: float, draft_s: float, lookahead: int,
               bets: float = 0.0) -> Best:
    """Overlapped, with no wasted step: a pass every max(T, k·D)."""
    return min((Best(1000 * max(target_s, k * draft_s) / tokens_per_pass(a, k, bets), k)
                for k in range(lookahead + 1)), key=lambda b: b.ms_per_token)


def best_for(strategy: str, separate_devices: bool, a: float | None, target_s: float | None,
             draft_s: float | None, lookahead: int, bets: float = 0.0) -> Best | None:
    """The model of `strategy` (sync, or amusd on two devices), or None where it does not
    apply (ar, amusd sharing one device, a run without the measurements)."""
    if a is None or not target_s or not draft_s or lookahead < 1:
        return None
    if strategy == "sync":
        return sync_best(a, target_s, draft_s, lookahead, bets)
    if strategy == "amusd" and separate_devices:
        return async_best(a, target_s, draft_s, lookahead, bets)
    return None


def shared_compute(strategy: str | None, target_device: str | None,
                   draft_device: str | None) -> str | None:
    """What caps amusd on these devices near sync, in a few words, or None: its two workers
    share one device (they take turns, as sync's models do), or two cores of one CPU (sync runs
    every pass on both cores; amusd gives each model one, and they share the memory bus: at most
    2/s faster than sync, s ~1.65 on the 2-core VM, docs/benchmarks.md)."""
    if strategy != "amusd" or not target_device:
        return None
    draft = draft_device or target_device
    if draft == target_device:
        return "one shared device"
    if target_device.startswith("cpu:") and draft.startswith("cpu:"):
        return "two cores of one CPU"
    return None


# An extra token in a pass costing over a quarter of a one-token pass (a 9-token pass over 3x
# one token's): a CPU without matrix units (AVX2 only), measured at 0.7-0.8 in bf16 and 0.36 in
# float32 on a first-generation EPYC, against ~0.02 on a Xeon with AMX and on GPUs. There no
# draft pays for its place in a verify pass (engine/length.py, planner.py).
DEAR_TOKEN = 0.25


def dear_tokens(strategy: str | None, extra_token: float | None) -> str | None:
    """Why a speculative run decoded plainly, in a few words (an extra token's cost in a pass,
    in one-token passes), or None."""
    if strategy in (None, "ar") or extra_token is None or extra_token <= DEAR_TOKEN:
        return None
    return f"extra token {extra_token:.2f}× a pass"
