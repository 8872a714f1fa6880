"""The plan and its policies, by hand (engine/plan.py, policies.py, estimate.py, length.py,
bets.py, schedule.py): which switch and device combinations give which policies, and what each
policy's null version and real version do. No models."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from amusd_viz.engine.bets import AltBets, BranchBets, NoBets
from amusd_viz.engine.estimate import FLAT, Calibration, Ema, PassCost, Rate
from amusd_viz.engine.lending import LEND_VALUE
from amusd_viz.engine.length import DraftBudget, FixedLength
from amusd_viz.engine.passes import Step
from amusd_viz.engine.plan import Plan, one_device, plan_for, resolve
from amusd_viz.engine.policies import bets_policy, cache_policy, length_policy, schedule_for
from amusd_viz.engine.schedule import Baton, Concurrent, Lending
from amusd_viz.engine.settings import EngineConfig
from amusd_viz.engine.shared import SharedState
from amusd_viz.engine.speccache import BranchCache, NoCache
from amusd_viz.engine.tree import TreePath


def ctx():
    return mp.get_context("spawn")


# the plan -------------------------------------------------------------------------------------
def test_sync_plans_its_length_bets_and_guesses_from_the_switches():
    assert resolve("sync") == Plan(length="budget", bets="alts", guesses=True)
    assert resolve("sync", adaptive=False, tree=False, draft_lookup=False) == Plan()
    assert resolve("sync", ngram=True).guesses is False  # a lookup needs no guesses
    assert resolve("ar") == resolve("hf-assisted") == Plan()  # no draft policies at all


def test_amusd_on_two_cores_lends_and_caches_with_every_switch_on():
    plan = resolve("amusd", loan_core=1)
    assert plan == Plan(length="fixed", rests=True, cache=True, sibling_bets=True,
                        bets="branches", guesses=True, schedule="lending", loan_core=1)
    assert resolve("amusd", loan_core=1, lend_core=False).schedule == "concurrent"
    assert resolve("amusd", loan_core=1, adaptive=False) == Plan(
        cache=True, sibling_bets=True, bets="branches", guesses=True)  # lending needs the rest
    assert resolve("amusd", siblings=False).sibling_bets is False
    assert resolve("amusd", tree=False).bets == "none" and resolve("amusd", tree=False).cache


def test_amusd_on_one_device_takes_sync_turns_and_sync_bets():
    plan = resolve("amusd", shared_device=True, loan_core=None)
    assert plan == Plan(length="budget", bets="alts", guesses=True, schedule="baton")
    assert plan.max_ahead(8, asked=30) == 8  # a turn drafts at most the lookahead
    assert resolve("amusd").max_ahead(8) == 16 and resolve("amusd").max_ahead(8, 5) == 5


def test_the_ngram_drafter_gets_no_model_policies():
    plan = resolve("amusd", ngram=True, loan_core=1)
    assert plan == Plan()
    assert not one_device("cpu", "cpu", ngram=True) and one_device("cpu:0", None, ngram=False)


def test_an_engine_config_resolves_its_devices_into_the_plan():
    def cfg(**kw):
        return EngineConfig(strategy="amusd", target_src="t", **{
            "draft_src": "d", "target_device": "cpu:0", "draft_device": "cpu:1", **kw})

    assert plan_for(cfg()).schedule == "lending" and plan_for(cfg()).loan_core == 1
    assert plan_for(cfg(draft_device="cpu:0")).schedule == "baton"
    assert plan_for(cfg(target_device="cpu", draft_device="cpu:1")).schedule == "concurrent"
    assert plan_for(cfg(draft_src="ngram:3")).cache is False
    # one GPU: the baton, unless MPS lets both compute at once (engine/mps.py)
    one_gpu = cfg(target_device="cuda:0", draft_device="cuda:0")
    assert plan_for(one_gpu).schedule == "baton"
    under_mps = cfg(target_device="cuda:0", draft_device="cuda:0", gpu_share=30)
    assert plan_for(under_mps).schedule == "concurrent" and plan_for(under_mps).cache
    assert [s.mps_percent for s in under_mps.worker_specs(0, plan_for(under_mps))] == [70, 30]
    assert [s.mps_percent for s in one_gpu.worker_specs(0, plan_for(one_gpu))] == [None, None]


def test_a_plan_becomes_its_policy_objects():
    shared = SharedState(ctx(), 64)
    assert isinstance(length_policy(Plan()), FixedLength)
    assert isinstance(length_policy(Plan(length="budget")), DraftBudget)
    assert type(bets_policy(Plan())) is NoBets
    assert type(bets_policy(Plan(bets="alts"))) is AltBets
    assert type(bets_policy(Plan(bets="branches"), shared, 3)) is BranchBets
    assert type(cache_policy(Plan(), shared, 3)) is NoCache
    assert type(cache_policy(Plan(cache=True), shared, 3)) is BranchCache
    assert type(schedule_for(Plan(), ctx(), shared)) is Concurrent
    assert type(schedule_for(Plan(schedule="baton"), ctx(), shared)) is Baton
    assert type(schedule_for(Plan(schedule="lending", loan_core=1), ctx(), shared)) is Lending


# the estimator ---------------------------------------------------------------------------------
def test_an_ema_starts_at_its_first_value_or_its_prior():
    ema = Ema(0.8)
    assert ema.add(10.0) == 10.0 and ema.add(0.0) == pytest.approx(8.0)
    assert Ema(0.5, prior=4.0).add(0.0) == 2.0


def test_a_rate_weighs_its_prior_as_that_many_trials_and_fades():
    rate = Rate(2.0, 2.0, keep=0.9)  # 2 hits in 2 trials
    assert rate.value == 1.0
    rate.add(0, 1)  # a fading count: 0.9 * 2 + 0 over 0.9 * 2 + 1
    assert (rate.hits, rate.trials) == pytest.approx((1.8, 2.8))
    for _ in range(100):
        rate.add(1, 4)
    assert rate.value == pytest.approx(0.25, abs=1e-3)  # the prior is forgotten


def test_calibration_is_clamped():
    cal = Calibration()
    for _ in range(50):
        cal.observe([0.9, 0.9], 0)
    assert cal.factor == Calibration.LOW and cal.acceptance < 0.01


# draft length ----------------------------------------------------------------------------------
def test_the_fixed_length_always_drafts_one_more():
    fixed = FixedLength()
    fixed.observe_draft(1.0)
    fixed.observe_verify(0.1, [0.01] * 8, 0)
    assert fixed.one_more([0.01] * 8)


# where a pass's extra tokens are dear (estimate.PassCost: an AVX2-only CPU) ------------------
CHEAP = PassCost(0.30, 0.005)  # a 9-token pass at 1.13x one token's (a Xeon with AMX)
DEAR = PassCost(0.30, 0.24)  # 7.4x (measured here: bf16 on a first-generation EPYC, 0.8)


def test_a_pass_cost_says_when_extra_tokens_are_dear():
    assert not CHEAP.dear and DEAR.dear and not FLAT.dear
    assert DEAR.extra == pytest.approx(0.8) and FLAT.extra == 0.0


@pytest.mark.parametrize(("per_token_s", "dear"), [(0.0, False), (0.03, True)])
def test_the_pass_cost_is_timed_on_warm_passes_of_one_and_nine_tokens(per_token_s, dear):
    """loading.pass_cost on a stand-in whose pass takes 60 ms plus `per_token_s` per further
    token: flat (a GPU, a CPU with matrix units), or half a pass per token (AVX2 only). A
    quick pass is timed three times (its best), a slow one once."""
    from amusd_viz.engine.loading import pass_cost

    class Stand:
        calls: list[int] = []

        def forward(self, seq, n_logits=1):
            self.calls.append(n_logits)
            time.sleep(0.06 + per_token_s * (n_logits - 1))

    stand = Stand()
    cost = pass_cost(stand, list(range(20)))
    assert cost.one_s == pytest.approx(0.06, abs=0.03)
    assert cost.extra == pytest.approx(per_token_s / 0.06, abs=0.15) and cost.dear is dear
    assert stand.calls == [1, 9]  # 60 ms is not quick: one timing each


def test_where_extra_tokens_are_dear_a_first_draft_must_pay_for_its_place_in_the_pass():
    """A draft step of 70 ms, a one-token pass of 300 ms. Cheap: the first draft always goes
    (the line stops early by the rule for later ones; the first pass drafts the lookahead and
    is timed). Dear: each draft adds 240 ms to the pass too, so it goes only while acceptance x
    300 ms beats 310 ms (with a margin): never, even at acceptance 1, from the first pass on
    (the load's timings are the priors)."""
    for cost, drafts in ((CHEAP, True), (DEAR, False)):
        budget = DraftBudget(cost, PassCost(0.07, 0.0))
        assert budget.one_more([]) is drafts
        budget.observe_verify(0.30 + cost.per_token_s * 2, [0.9, 0.9], 0)  # a rejection
        assert budget.verify_s.value == pytest.approx(0.30)  # the drafts' tokens taken off
        assert budget.one_more([]) is drafts
    # a cheaper draft with everything accepted pays even where tokens are dear
    budget = DraftBudget(PassCost(0.30, 0.09), PassCost(0.02, 0.0))  # extra 0.3: dear
    assert budget.one_more([])
    for _ in range(20):
        budget.observe_verify(0.30 * (1 + 0.3 * 8), [0.3] * 8, 0)  # every draft rejected
    assert not budget.one_more([])


def test_where_extra_tokens_are_dear_the_drafts_catch_up_counts_against_its_first_draft():
    """The same cheap draft, but 60 tokens behind (its prefill still to feed, 15 ms a token
    where extra tokens are dear): 0.9 s for one draft, so it does not go; one token behind it
    does. Where tokens are cheap the catch-up is not weighed (the first draft always goes)."""
    budget = DraftBudget(PassCost(0.30, 0.09), PassCost(0.02, 0.015))
    assert budget.one_more([], behind=1) and not budget.one_more([], behind=60)
    assert DraftBudget(CHEAP, PassCost(0.02, 0.015)).one_more([], behind=60)


def test_a_dear_draft_token_ends_the_line_sooner():
    """Drafts of confidence 0.9, a 20 ms draft step: where tokens are cheap the line runs to the
    lookahead (8); where each adds 240 ms to the pass, it stops after two."""

    def line(cost: PassCost) -> int:
        budget, k = DraftBudget(cost, PassCost(0.02, 0.0)), 0
        while k < 8 and budget.one_more([0.9] * k):
            k += 1
        return k

    assert (line(CHEAP), line(DEAR)) == (8, 2)


def test_no_bets_where_the_targets_extra_tokens_are_dear():
    shared = SharedState(ctx(), 64)
    assert type(bets_policy(Plan(bets="alts"), cost=CHEAP)) is AltBets
    assert type(bets_policy(Plan(bets="alts"), cost=DEAR)) is NoBets
    assert type(bets_policy(Plan(bets="branches"), shared, 3, DEAR)) is NoBets


# bets ------------------------------------------------------------------------------------------
def test_no_bets_check_nothing_and_alt_bets_check_the_drafts_other_tokens():
    committed, drafts, others = [1, 2, 3], [7, 8], [[9, 7, -1], [5]]
    assert NoBets().paths(committed, drafts, 12, others) == []
    # in-process (sync): earlier draft, likelier token first; the draft itself is no bet
    assert AltBets().paths(committed, drafts, 12, others) == [TreePath(3, 9), TreePath(4, 5)]
    assert AltBets().paths(committed, drafts, 1, others) == [TreePath(3, 9)]
    assert AltBets().paths(committed, [], 12, []) == []


def test_amusd_alt_bets_travel_through_shared_memory():
    shared = SharedState(ctx(), 64)
    shared.reset()
    shared.set_draft_alive(True)
    bets = AltBets(shared)
    bets.offer(3, Step(7, None, None, 0.5, 9, 0.2, [{"id": 7, "p": 0.5}, {"id": 4, "p": 0.1}]))
    assert bets.paths([1, 2, 3], [7], 12) == [TreePath(3, 9), TreePath(3, 4)]
    NoBets().offer(4, Step(8, None, None, 0.5, 6, 0.2))  # writes nothing
    assert bets.paths([1, 2, 3], [7, 8], 12) == [TreePath(3, 9), TreePath(3, 4)]
    shared.set_draft_alive(False)
    assert bets.paths([1, 2, 3], [7], 12) == []


# the speculation cache's null version -----------------------------------------------------------
def test_no_cache_never_hits_nor_hands_over_drafts():
    cache = NoCache()
    assert cache.confirmed_drafts([1, 2, 3], 8) == ([], [])
    assert cache.verdict(None, [1, 2], [1, 3], 1) is None  # type: ignore[arg-type]
    assert cache.sibling_for(None, [1, 2], [1]) is None  # type: ignore[arg-type]
    assert cache.options(None, 0, 4) == []  # type: ignore[arg-type]


# schedules -------------------------------------------------------------------------------------
def test_concurrent_waits_for_news_and_lends_nothing():
    shared = SharedState(ctx(), 64)
    schedule = Concurrent(shared)
    with schedule.target_pass(5) as lent:
        assert lent is False
    assert schedule.floor(0.1) is None and schedule.worth_another()
    start = time.monotonic()
    threading.Timer(0.05, shared.wakeup.set).start()
    schedule.idle(5)  # back as soon as the target commits (the wakeup), long before 0.5 s
    assert time.monotonic() - start < 0.4 and schedule.resting
    schedule.busy()
    assert not schedule.resting


def test_lending_raises_the_floor_only_while_resting_and_most_drafts_are_rejected():
    shared = SharedState(ctx(), 64)
    shared.wakeup.set()
    schedule = Lending(ctx(), shared, core=1)
    assert schedule.floor(0.5) is None  # computing: nothing to lend
    schedule.idle(seen=4)  # rests: the core is the target's for a pass on that text
    assert schedule.floor(0.5) == LEND_VALUE and schedule.floor(0.9) is None
    assert schedule.loan.borrow(4, patience_s=0.0)
    schedule.loan.give_back()
    schedule.busy()  # takes its core back
    assert not schedule.loan.borrow(4, patience_s=0.0)


def test_the_baton_alternates_turns_and_ends_a_turn_by_the_length_policy():
    shared = SharedState(ctx(), 64)
    shared.set_draft_alive(True)
    baton = Baton(ctx(), shared)
    baton.reset()
    baton.begin_run(DraftBudget())
    order: list[str] = []

    def target():
        for _ in range(3):
            baton.target_turn()
            order.append("target")
            baton.hand_to_draft()

    thread = threading.Thread(target=target)
    thread.start()
    for _ in range(2):
        baton.draft_turn()
        order.append("draft")
        baton.turn["target"].set()
    thread.join(5)
    assert order == ["target", "draft", "target", "draft", "target"]
    # the turn's drafts, then the verdict: the pass is timed from the hand-over
    baton.drafted(10, Step(5, None, 0.01, 0.9, 6, 0.05))
    baton.drafted(11, Step(7, None, 0.01, 0.9, 8, 0.05))
    baton.handed_at = time.perf_counter() - 0.05
    baton.back([0] * 10 + [5, 9])
    budget = baton.length
    assert isinstance(budget, DraftBudget) and budget.verify_s.value == pytest.approx(0.05, abs=0.02)
    assert budget.calibration.accepted == pytest.approx(1.8 + 1)  # one of two accepted
    assert baton.steps == [] and baton.handed_at is None
