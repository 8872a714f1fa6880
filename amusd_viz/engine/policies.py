"""From a plan (engine/plan.py) to its policy objects: the one place a policy class is picked.
Each policy has a null version, so the loops call every policy unconditionally."""

from __future__ import annotations

from typing import TYPE_CHECKING

from amusd_viz.engine.bets import AltBets, BranchBets, NoBets
from amusd_viz.engine.estimate import FLAT, PassCost
from amusd_viz.engine.length import DraftBudget, FixedLength
from amusd_viz.engine.plan import Plan
from amusd_viz.engine.schedule import Baton, Concurrent, Lending
from amusd_viz.engine.shared import SharedState

if TYPE_CHECKING:
    from amusd_viz.engine.speccache import NoCache


def length_policy(plan: Plan, cost: PassCost = FLAT,
                  draft_cost: PassCost | None = None) -> FixedLength:
    """`cost`: the target's passes; `draft_cost`: the draft's, where both are in one process
    (sync), as the first pass's priors."""
    return DraftBudget(cost, draft_cost) if plan.length == "budget" else FixedLength()


def bets_policy(plan: Plan, shared: SharedState | None = None, n_prompt: int = 0,
                cost: PassCost = FLAT) -> NoBets:
    """sync: `shared` None (the bets stay in its process). No bets where the target's extra
    tokens are dear (`cost`): each would cost most of a pass."""
    if cost.dear:
        return NoBets()
    if plan.bets == "branches" and shared is not None:
        return BranchBets(shared, n_prompt)
    return AltBets(shared) if plan.bets != "none" else NoBets()


def cache_policy(plan: Plan, shared: SharedState, n_prompt: int) -> NoCache:
    # imported here: the cache drafts (torch), the coordinator only builds schedules
    from amusd_viz.engine.speccache import BranchCache, NoCache

    return BranchCache(shared, n_prompt, plan.sibling_bets) if plan.cache else NoCache()


def schedule_for(plan: Plan, ctx, shared: SharedState) -> Concurrent:
    """Built by the coordinator: a baton or a core loan lives in shared memory."""
    if plan.schedule == "baton":
        return Baton(ctx, shared)
    if plan.schedule == "lending":
        assert plan.loan_core is not None
        return Lending(ctx, shared, plan.loan_core)
    return Concurrent(shared)
