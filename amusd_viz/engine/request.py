"""What a worker is asked to do for one run, and what the target answers. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from amusd_viz.config import GREEDY, SamplingParams
from amusd_viz.engine.estimate import FLAT, PassCost
from amusd_viz.engine.plan import Plan


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    lookahead: int
    eos_ids: frozenset[int]
    t0_ns: int  # the run's zero on the shared monotonic clock
    max_ahead: int = 0  # amusd: how far the draft may run past the committed text (Plan.max_ahead)
    sampling: SamplingParams = GREEDY
    vocab: int = 0  # sampling: the width of p and q rows (the larger model vocabulary)
    plan: Plan = field(default_factory=Plan)  # the speed policies (engine/plan.py)
    # the target's passes, timed at load (worker_ready): what amusd's draft decides by
    target_cost: PassCost = FLAT

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def draft_ahead(self) -> int:
        """amusd: how far the draft may run past the committed text (0 asked: 2 × lookahead)."""
        return self.max_ahead or 2 * self.lookahead

    def secs(self, ns: int) -> float:
        """A time on the shared clock, as seconds since the run's zero."""
        return (ns - self.t0_ns) / 1e9


@dataclass
class Outcome:
    token_ids: list[int] = field(default_factory=list)
    end_ns: int = 0
    stop_reason: str = ""
