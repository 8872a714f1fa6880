"""The plan: every speed policy of a run, resolved once from the engine's settings and its devices,
and sent to both workers. The only place in the engine that reads the user's switches
(`--adaptive`, `--spec-cache`, `--draft-lookup`, `--lend-core`, the bench's `siblings` and `tree`)
or combines them; the loops call each chosen policy unconditionally (a switched-off policy is its
null version: engine/length.py, speccache.py, bets.py, schedule.py). Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from amusd_viz.engine.lending import borrowable_core

Length = Literal["fixed", "budget"]
Bets = Literal["none", "alts", "branches"]
Schedule = Literal["concurrent", "baton", "lending"]


@dataclass(frozen=True)
class Plan:
    """What a run does beyond drafting and verifying. The default is the null plan: a fixed
    lookahead, no bets, no guesses, no cache, both models computing at once."""

    # how far the draft drafts before a pass (sync) or a turn (amusd on one device) ends:
    # the whole lookahead, or while the next draft is worth its step (length.DraftBudget)
    length: Length = "fixed"
    # amusd's draft on its own device rests when no step is worth speccache.MIN_VALUE
    rests: bool = False
    # amusd on two devices: the speculation cache's branches (speccache.py)
    cache: bool = False
    # with the cache: the draft's runner-up fed beside each main-line draft, one branch each
    sibling_bets: bool = False
    # what a target pass checks beside its drafts (bets.py): nothing, the draft's other likely
    # tokens, or those and the cache's branches
    bets: Bets = "none"
    # lookup guesses checked in the draft's own passes (guess.py)
    guesses: bool = False
    # how amusd's two workers share compute (schedule.py): at once on two devices, taking turns
    # on one, or on two CPU cores with the resting draft's core lent to the target
    schedule: Schedule = "concurrent"
    loan_core: int | None = None  # "lending": the draft's core the target borrows

    def max_ahead(self, lookahead: int, asked: int = 0) -> int:
        """How far amusd's draft may run past the committed text: taking turns, one turn's
        lookahead (sync's schedule); else `asked`, by default twice the lookahead."""
        return lookahead if self.schedule == "baton" else asked or 2 * lookahead


SWITCHES = ("adaptive", "spec_cache", "siblings", "tree", "draft_lookup", "lend_core")


def switches(cfg) -> dict[str, bool]:
    """The user's speed switches of a RunConfig (or an EngineConfig), by name."""
    return {name: getattr(cfg, name) for name in SWITCHES}


def one_device(target_device: str, draft_device: str | None, ngram: bool) -> bool:
    """Both models compute on one device and must take turns (a lookup computes nothing)."""
    return (draft_device or target_device) == target_device and not ngram


def resolve(strategy: str, *, adaptive: bool = True, spec_cache: bool = True,
            siblings: bool = True, tree: bool = True, draft_lookup: bool = True,
            lend_core: bool = True, ngram: bool = False, shared_device: bool = False,
            loan_core: int | None = None) -> Plan:
    """The plan for a strategy and its switches. `shared_device`: amusd's workers on one
    device; `loan_core`: the draft's own CPU core, where each worker owns one."""
    model_draft = not ngram
    if strategy == "sync":
        return Plan(length="budget" if adaptive else "fixed", bets="alts" if tree else "none",
                    guesses=draft_lookup and model_draft)
    if strategy != "amusd":
        return Plan()
    baton = shared_device and model_draft
    cache = spec_cache and model_draft and not baton
    lending = (lend_core and adaptive and model_draft and not baton and loan_core is not None)
    return Plan(length="budget" if adaptive and baton else "fixed",
                rests=adaptive and model_draft and not baton,
                cache=cache, sibling_bets=cache and siblings,
                bets=("branches" if cache else "alts" if baton else "none") if tree else "none",
                guesses=draft_lookup and model_draft,
                schedule="baton" if baton else "lending" if lending else "concurrent",
                loan_core=loan_core if lending else None)


def plan_for(cfg) -> Plan:
    """The plan of an engine's settings and devices (session.EngineConfig)."""
    return resolve(cfg.strategy, **switches(cfg), ngram=cfg.ngram,
                   shared_device=one_device(cfg.target_device, cfg.draft_device, cfg.ngram)
                   and not cfg.gpu_share,  # under MPS the two compute at once
                   loan_core=borrowable_core(cfg.target_device, cfg.draft_device))
