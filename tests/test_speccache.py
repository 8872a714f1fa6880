"""amusd's speculation cache, the draft's choices and the adaptive draft length
(engine/speccache.py, engine/planner.py, length.DraftBudget): the shared branch table and the choices by hand, then the real engine on
tiny float32 models, where the cache must be exercised (hits, passes fed from a branch) and the
output must still be exactly the target's own: greedy, and coupled sampling for a seed.
The rejection rule's distribution with the cache is in test_sampling.py."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from amusd_viz.config import SamplingParams
from amusd_viz.engine.bets import BranchBets
from amusd_viz.engine.length import DraftBudget
from amusd_viz.engine.loops import adopt
from amusd_viz.engine.passes import Drafter, Step
from amusd_viz.engine.planner import EXTEND, MIN_VALUE, Planner
from amusd_viz.engine.request import Request
from amusd_viz.engine.session import Engine, EngineConfig
from amusd_viz.engine.shared import SharedState, prefix_hash
from amusd_viz.engine.speccache import Branch, BranchCache, NoCache
from amusd_viz.events import BranchStep, CacheVerdict, EventList, Forward, RunFinished, VerifyResult
from amusd_viz.stats import compute

SLOW_TARGET_S = 0.02  # a tiny target as slow as a real one relative to its draft


# the shared branch table ---------------------------------------------------------------------
@pytest.fixture
def shared():
    state = SharedState(mp.get_context("spawn"), 128)
    state.reset()
    state.set_draft_alive(True)
    return state


PROMPT = [50, 51, 52]


def test_a_branch_is_read_only_when_the_target_committed_its_bet(shared):
    main = [*PROMPT, 7, 8]  # generated 7, 8; the branch bets on 30 at position 1
    shared.publish_branch(2, prefix_hash(main[:4]), 1, 30, [31, 32, 33])
    assert BranchCache(shared, 3, True).confirmed_drafts([*PROMPT, 7, 30], 8) == ([31, 32, 33], [])
    assert BranchCache(shared, 3, True).confirmed_drafts([*PROMPT, 7, 30], 2) == ([31, 32], [])  # the limit
    assert BranchCache(shared, 3, True).confirmed_drafts([*PROMPT, 7, 30, 31], 8) == ([32, 33], [])  # past one
    assert BranchCache(shared, 3, True).confirmed_drafts([*PROMPT, 7, 8], 8) == ([], [])  # the draft was right
    assert BranchCache(shared, 3, True).confirmed_drafts([*PROMPT, 7, 29], 8) == ([], [])  # another token
    assert BranchCache(shared, 3, True).confirmed_drafts([*PROMPT, 6, 30], 8) == ([], [])  # another prefix
    assert BranchCache(shared, 3, True).confirmed_drafts([*PROMPT, 7, 30, 40], 8) == ([], [])  # parted since
    assert BranchCache(shared, 3, True).confirmed_drafts([*PROMPT, 7], 8) == ([], [])  # not decided yet
    shared.set_draft_alive(False)
    assert BranchCache(shared, 3, True).confirmed_drafts([*PROMPT, 7, 30], 8) == ([], [])
    shared.set_draft_alive(True)
    shared.clear_branch(2)
    assert BranchCache(shared, 3, True).confirmed_drafts([*PROMPT, 7, 30], 8) == ([], [])


def test_a_tree_pass_checks_the_branches_and_bets_that_leave_its_line(shared):
    """The target's tree: branches that leave committed + drafts at one of the drafts (their
    prefix hashed as the line's), then the draft's other likely tokens at each draft; likeliest
    first (earlier drafts, likelier alternatives), cut to the token budget."""
    from amusd_viz.engine.tree import TreePath

    committed, drafts = [*PROMPT, 7], [8, 9, 10]  # drafts at generated positions 1, 2, 3
    line = [*committed, *drafts]
    shared.publish_branch(0, prefix_hash(line[:5]), 2, 40, [41, 42])  # bets 40 for the 9
    shared.publish_branch(1, prefix_hash([*PROMPT, 6]), 1, 30, [31])  # another prefix
    shared.publish_branch(2, prefix_hash(line[:4]), 0, 20, [21])  # bets on a committed token
    shared.write_alts(4, [30, 8, 33])  # beside the 8: 30 and 33 (8 is the draft itself)
    shared.write_alts(5, [40, 43])  # beside the 9: 40 is the branch's bet already
    shared.write_alts(6, [50])
    paths = BranchBets(shared, 3).paths(committed, drafts, 12)
    assert paths == [TreePath(4, 30, [], []), TreePath(5, 40, [41, 42], []),
                     TreePath(4, 33, [], []), TreePath(5, 43, [], []), TreePath(6, 50, [], [])]
    # the budget: whole bets in that order, the last one's drafts cut to fit
    assert BranchBets(shared, 3).paths(committed, drafts, 3) == [TreePath(4, 30, [], []),
                                                                 TreePath(5, 40, [41], [])]
    assert BranchBets(shared, 3).paths(committed, [], 12) == []  # a solo pass checks nothing
    shared.set_draft_alive(False)
    assert BranchBets(shared, 3).paths(committed, drafts, 12) == []
    shared.set_draft_alive(True)
    shared.reset()  # a new run: no bets left from this one
    assert BranchBets(shared, 3).paths(committed, drafts, 12) == []


def test_sampled_branch_drafts_come_with_the_q_they_were_drawn_from():
    import torch

    state = SharedState(mp.get_context("spawn"), 128, vocab=4)
    state.reset()
    state.set_draft_alive(True)
    rows = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.7, 0.1, 0.1, 0.1])]
    hashed = prefix_hash([*PROMPT, 7])
    state.publish_branch(1, hashed, 1, 30, [2], rows[0])  # one draft at a time, as drafted
    state.publish_branch(1, hashed, 1, 30, [2, 0], rows[1])
    drafts, q = BranchCache(state, 3, True).confirmed_drafts([*PROMPT, 7, 30], 8)
    assert drafts == [2, 0] and [r.tolist() for r in q] == [pytest.approx(r.tolist()) for r in rows]
    drafts, q = BranchCache(state, 3, True).confirmed_drafts([*PROMPT, 7, 30, 2], 8)  # the first one judged
    assert drafts == [0] and q[0].tolist() == pytest.approx(rows[1].tolist())


def test_a_new_run_starts_with_an_empty_table(shared):
    shared.publish_branch(0, prefix_hash(PROMPT), 0, 30, [31])
    assert BranchCache(shared, 3, True).confirmed_drafts([*PROMPT, 30], 8) == ([31], [])
    shared.reset()
    shared.set_draft_alive(True)
    assert BranchCache(shared, 3, True).confirmed_drafts([*PROMPT, 30], 8) == ([], [])


# the draft's choices, by hand ----------------------------------------------------------------
class FakeRunner:
    forks = 0

    def fork(self):
        FakeRunner.forks += 1
        return FakeRunner()

    def release(self):
        pass


class FakeShared:
    def __init__(self):
        self.table: dict[int, tuple] = {}
        self.drafts: list[int] = []
        self.alts: dict[int, list[int]] = {}  # sequence index -> the draft's other tokens there

    def publish_branch(self, slot, prefix, root, token, drafts, q):
        self.table[slot] = (root, token, list(drafts))

    def clear_branch(self, slot):
        self.table.pop(slot, None)

    def publish_drafts(self, seq, n_prompt, step_s=None):
        self.drafts = list(seq)

    def write_alts(self, index, tokens):
        self.alts[index] = list(tokens)


def step(token: int, conf: float, alt: int, alt_p: float) -> Step:
    return Step(token, None, 0.05, conf, alt, alt_p)


def planner(cache=True, adaptive=True) -> Planner:
    req = Request(list(PROMPT), 64, 4, frozenset(), 0)
    shared = FakeShared()
    drafter = Drafter(req, FakeRunner(), None, "cpu:1", lambda e: None)  # type: ignore[arg-type]
    return Planner(req, drafter, shared, BranchCache(shared, len(PROMPT), True) if cache  # type: ignore[arg-type]
                   else NoCache(), rests=adaptive)


def test_the_draft_extends_while_its_line_is_likelier_than_any_bet():
    plan = planner()
    plan.info = {0: step(10, 0.9, 20, 0.05), 1: step(11, 0.9, 21, 0.05)}
    seq = [*PROMPT, 10, 11]
    # main line survives with 0.81; the best bet: 0.05 at position 0
    assert plan.choose(seq, list(PROMPT), can_extend=True) is EXTEND


def test_the_draft_bets_on_the_likeliest_rejection_when_its_line_is_unlikely():
    plan = planner()
    # survival 0.5 * 0.3 = 0.15; bets: position 0: 0.4, position 1: 0.5 * 0.6 = 0.3
    plan.info = {0: step(10, 0.5, 20, 0.4), 1: step(11, 0.3, 21, 0.6)}
    seq = [*PROMPT, 10, 11]
    first = plan.choose(seq, list(PROMPT), can_extend=True)
    assert isinstance(first, Branch) and (first.root, first.token) == (0, 20)
    assert first.prefix == list(PROMPT) and first.value == pytest.approx(0.4)
    # a branch's next draft is worth its bet times its own drafts' confidence: 0.4 * 0.5
    first.steps.append(step(40, 0.5, 41, 0.05))
    assert first.next_value(plan.calibration) == pytest.approx(0.2)
    second = plan.choose(seq, list(PROMPT), can_extend=True)  # a new bet (0.3) beats it
    assert isinstance(second, Branch) and (second.root, second.token) == (1, 21)
    assert second.value == pytest.approx(0.3) and second.prefix == [*PROMPT, 10]
    assert {first.slot, second.slot} == {0, 1}
    second.steps.append(step(42, 0.1, 43, 0.05))  # now worth 0.03
    assert plan.choose(seq, list(PROMPT), can_extend=True) is first  # 0.2 > the line's 0.15


def test_every_main_line_step_bets_on_its_runner_up_beside_it():
    """A sibling: the runner-up at the position the step feeds, where nothing bets yet; its
    branch is one draft deep, published at once, and gets a KV cache of its own only if it
    grows; a hit on it needs no adoption (the next pass crops to the root and feeds it)."""
    events = []
    plan = planner()
    plan.drafter.emit = events.append
    plan.drafter.draft.text = str
    plan.info = {0: step(10, 0.5, 20, 0.4), 1: step(11, 0.3, 21, 0.6)}
    seq = [*PROMPT, 10, 11]
    assert plan.cache.sibling_for(plan, seq, list(PROMPT)) == 21  # beside the line's last token
    assert plan.cache.sibling_for(plan, seq, [*PROMPT, 10, 11]) is None  # already judged
    FakeRunner.forks = 0
    plan.cache.add_sibling(plan, seq, list(PROMPT), step(30, 0.8, 31, 0.1))
    branch = plan.cache.branches[0]
    assert (branch.root, branch.token, branch.runner, branch.seq) == (1, 21, None,
                                                                      [*PROMPT, 10, 21, 30])
    assert branch.value == pytest.approx(0.5 * 0.7 * 0.6 / 0.7)  # survive 0, reject 1, pick 21
    assert plan.shared.table[branch.slot] == (1, 21, [30])
    assert events[-1].sibling and (events[-1].pos, events[-1].depth) == (2, 1)
    assert plan.cache.sibling_for(plan, seq, list(PROMPT)) is None  # position 1 has its bet now
    assert FakeRunner.forks == 0
    # the target rejects 11 and commits 21: the sibling's draft becomes the main line
    new = adopt(plan.req, [*seq, 12], [*PROMPT, 10, 21], plan, plan.shared, events.append)
    assert new == [*PROMPT, 10, 21, 30] and plan.shared.drafts == new and not plan.cache.branches
    assert plan.shared.alts == {len(PROMPT) + 2: [31]}  # its runner-up: a bet for the tree


def test_a_sibling_takes_the_weakest_slot_only_from_a_less_likely_bet():
    plan = planner()
    plan.drafter.draft.text = str
    plan.info = {i: step(10 + i, 0.9, 20 + i, 0.05) for i in range(5)}
    plan.info[5] = step(15, 0.2, 25, 0.7)
    line = [*PROMPT, *(10 + i for i in range(6))]
    for pos in range(4):  # four weak bets fill every slot: 0.9^pos * 0.1 * 0.5 each
        plan.cache.add_sibling(plan, line[:len(PROMPT) + pos + 1], list(PROMPT), step(40, 0.5, 41, 0.1))
    plan.cache.add_sibling(plan, line[:len(PROMPT) + 5], list(PROMPT), step(40, 0.5, 41, 0.1))
    assert len(plan.cache.branches) == 4  # no slot: nothing added
    weak = plan.cache.sibling_for(plan, line[:len(PROMPT) + 5], list(PROMPT))  # position 4: 0.9^4 * 0.05
    assert weak is None and len(plan.cache.branches) == 4  # less than the weakest, 0.9^3 * 0.05
    assert plan.cache.sibling_for(plan, line, list(PROMPT)) == 25  # position 5: a likely loss, worth a slot
    assert sorted(b.root for b in plan.cache.branches) == [0, 1, 2]  # the weakest bet made way


def test_committed_positions_are_never_bet_on_and_nothing_worth_it_means_rest():
    plan = planner()
    plan.info = {0: step(10, 0.95, 20, 0.9), 1: step(11, 0.05, 21, 0.05)}
    seq = [*PROMPT, 10, 11]
    # position 0 is committed already; position 1: a bet of 0.05, a main line of 0.05
    assert plan.choose(seq, [*PROMPT, 10], can_extend=True) is None
    assert MIN_VALUE > 0.05
    # without the adaptive rule it extends anyway (the lookahead is the only bound)
    assert planner(cache=False, adaptive=False).choose(seq, [*PROMPT, 10], True) is EXTEND
    assert planner(cache=False, adaptive=False).choose(seq, [*PROMPT, 10], False) is None


def test_sync_drafts_while_one_more_draft_pays_for_its_step():
    budget = DraftBudget()
    assert budget.one_more([0.1])  # no timings yet: draft on
    budget.observe_draft(0.04)
    budget.observe_verify(0.17, [], 0)
    assert budget.calibration.factor == 1.0
    # 1 draft at 0.9: rate (1 + 0.9) / 0.21 = 9.0 tokens/s; one more adds 0.9 / 0.04 = 22.5
    assert budget.one_more([0.9])
    # 3 drafts at 0.5: survivals 0.5, 0.25, 0.125; rate 1.875 / 0.29 = 6.5; 0.125 / 0.04 = 3.1
    assert not budget.one_more([0.5, 0.5, 0.5])
    # a draft whose confidence has overstated acceptance is trusted less
    for _ in range(30):
        budget.observe_verify(0.17, [0.9, 0.9, 0.9], 0)
    assert budget.calibration.factor == pytest.approx(0.2)
    assert not budget.one_more([0.9, 0.9])


def test_confidence_is_calibrated_on_the_runs_own_verdicts():
    from amusd_viz.engine.estimate import Calibration

    cal = Calibration()
    assert cal.chance(0.3) == pytest.approx(0.3)  # the prior: take the draft at its word
    for _ in range(40):  # a flat draft that is right anyway (a tiny model)
        cal.observe([0.1, 0.1], 2)
    assert cal.factor == Calibration.HIGH and cal.chance(0.1) == pytest.approx(0.5)
    assert cal.chance(0.5) == 1.0
    # the amusd draft learns it from the committed text: drafts 10, 11 at 0.2 each; the target
    # kept 10 and put 99 where 11 was
    plan = planner()
    plan.info = {0: step(10, 0.2, 20, 0.1), 1: step(11, 0.2, 21, 0.1), 2: step(12, 0.2, 22, 0.1)}
    plan.observe([*PROMPT, 10, 11, 12], [*PROMPT, 10, 99])
    assert (plan.calibration.predicted, plan.calibration.accepted) == pytest.approx((2.2, 2.8))
    # ... and its bets: at the rejection its runner-up (21, a share 0.1 / 0.8) was not picked
    bets = plan.cache.bet_calibration
    assert (bets.predicted, bets.accepted) == pytest.approx((1.8 + 0.125, 1.8))
    plan.observe([*PROMPT, 10, 99, 5], [*PROMPT, 10, 99])  # nothing new judged
    assert plan.calibration.predicted == pytest.approx(2.2)


def test_the_stats_count_hits_misses_solo_passes_and_branch_work():
    events = [
        Forward(t=0.0, role="target", device="cpu:0", dur=0.1, phase="prefill", n_tokens=3),
        VerifyResult(t=0.2, start_pos=1, proposed=[5, 6], accepted=0, committed=[7]),
        BranchStep(t=0.21, root=1, root_token=7, root_text="a", pos=2, token_id=8, text="b",
                   depth=1, value=0.3),
        BranchStep(t=0.22, root=1, root_token=7, root_text="a", pos=3, token_id=9, text="c",
                   depth=2, value=0.2),
        BranchStep(t=0.23, root=2, root_token=1, root_text="d", pos=3, token_id=9, text="c",
                   depth=1, value=0.1),
        CacheVerdict(t=0.3, pos=1, token_id=7, hit=True, handed=2, branches=2, wasted=1),
        VerifyResult(t=0.4, start_pos=2, proposed=[8, 9], accepted=2, committed=[8, 9, 3],
                     from_cache=True),
        VerifyResult(t=0.5, start_pos=5, proposed=[], accepted=0, committed=[4]),
        CacheVerdict(t=0.6, pos=6, token_id=2, hit=False),
        VerifyResult(t=0.7, start_pos=6, proposed=[1], accepted=0, committed=[2],
                     draft_stop="confidence"),
        RunFinished(t=0.8, new_tokens=7, wall_s=0.8, started_at=0.0),
    ]
    s = compute(events)
    assert (s.target_passes, s.solo_passes, s.cached_passes) == (4, 1, 1)
    assert (s.cache_hits, s.cache_misses, s.cache_hit_rate) == (1, 1, 0.5)
    assert (s.branch_tokens, s.wasted_branch_tokens) == (3, 1)
    assert s.confidence_stops == 1
    assert s.mean_drafts_per_verify == pytest.approx(5 / 3)


# the real engine -----------------------------------------------------------------------------
def start(tiny_models, strategy, draft, **extra):
    sink = EventList()
    cfg = EngineConfig(strategy=strategy, target_src=str(tiny_models["target"]),
                       draft_src=str(tiny_models[draft]) if strategy != "ar" else None,
                       target_device="cpu:0", draft_device="cpu:1", dtype="float32",
                       faults={"target": f"slow:{SLOW_TARGET_S}"}, **extra)
    engine = Engine(cfg, sink)
    engine.start()
    engine.wait_ready()
    return engine, sink


PROMPTS = [[11, 12, 13], [40, 41], [7, 8, 9, 10, 11, 12], [90], [33, 34, 35, 36]]


def runs(engine, sink, sampling=None):
    out = []
    for prompt in PROMPTS:
        sink.events = []
        gen = engine.generate(prompt, 40, 4, frozenset(), sampling=sampling)
        out.append((gen.token_ids, list(sink.events)))
    return out


@pytest.mark.parametrize("rule", ["greedy", "coupled"])
def test_the_cache_is_used_and_the_output_stays_the_targets(tiny_models, rule):
    sampling = None if rule == "greedy" else SamplingParams(0.7, 1.0, 0, 1234, "coupled")
    extra = {} if sampling is None else {"sampling": sampling}
    ar, ar_sink = start(tiny_models, "ar", "draft_near", **extra)
    amusd, sink = start(tiny_models, "amusd", "draft_near", **extra)
    # hits handed to the next pass only: the path a tree pass takes only beyond its budget
    no_tree, no_tree_sink = start(tiny_models, "amusd", "draft_near", tree=False, **extra)
    plain, plain_sink = start(tiny_models, "amusd", "draft_near", spec_cache=False, **extra)
    try:
        reference = runs(ar, ar_sink, sampling)
        cached = runs(amusd, sink, sampling)
        next_pass = runs(no_tree, no_tree_sink, sampling)
        without = runs(plain, plain_sink, sampling)
    finally:
        for engine in (ar, amusd, no_tree, plain):
            engine.close()
    for (ref, _), (ids, events), (ids_next, _), (ids_off, events_off) in zip(
            reference, cached, next_pass, without, strict=True):
        assert ids == ref and ids_next == ref and ids_off == ref
        commits = [e for e in events if e.type == "token_committed"]
        assert [e.pos for e in commits] == list(range(len(ref)))
        assert not any(e.type in ("branch_step", "cache_verdict") for e in events_off)
    events = [e for _, run_events in cached for e in run_events]
    stats = compute(events)
    assert stats.branch_tokens > 20, stats
    assert stats.cache_hits >= 3 and stats.cache_misses >= 1, stats
    # a branch step is a pass of its own, or came beside a main-line draft in its pass
    branch_passes = [e for e in events if e.type == "forward" and e.phase == "branch"]
    siblings = [e for e in events if e.type == "branch_step" and e.sibling]
    assert siblings and len(branch_passes) + len(siblings) == stats.branch_tokens
    # tree passes: the target went on along a branch in the pass that rejected the main line,
    # committing the bet, then the branch's drafts it accepted, then its own token
    went_on = [e for e in events if e.type == "verify_result" and e.tree_root is not None]
    assert went_on and stats.tree_hits == len(went_on), stats
    for e in went_on:
        assert e.tree_paths >= 1 and e.tree_root == e.start_pos + e.accepted
        # ... unless the token budget (40) ends the run first
        assert len(e.committed) == min(e.accepted + 1 + e.tree_accepted + 1, 40 - e.start_pos)
        assert e.committed[e.accepted + 1:][:e.tree_accepted] == e.tree_proposed[:e.tree_accepted]
    # without tree passes, the target took a branch's drafts in the pass after the hit
    later = [e for _, run_events in next_pass for e in run_events]
    assert compute(later).cached_passes >= 1
    assert not any(e.type == "verify_result" and e.tree_paths for e in later)
    for e in events + later:
        if e.type == "verify_result" and e.from_cache:
            assert e.proposed  # every cached draft came from a branch that bet on its verdict
    handed = [e for e in later if e.type == "draft_proposed" and e.cached]
    assert handed and all(e.top for e in handed)


def test_the_tui_marks_cached_drafts_and_names_their_bet():
    from amusd_viz.events import DraftProposed, TokenCommitted
    from amusd_viz.ui.state import RunState
    from amusd_viz.ui.widgets import cache_source

    state = RunState()
    for e in [
        TokenCommitted(t=0.1, pos=0, token_id=5, text="a", how="decoded"),
        TokenCommitted(t=0.2, pos=1, token_id=7, text=" x", how="correction"),
        BranchStep(t=0.15, root=1, root_token=7, root_text=" x", pos=2, token_id=8, text=" y",
                   depth=1, value=0.3),
        BranchStep(t=0.16, root=1, root_token=7, root_text=" x", pos=3, token_id=9, text=" z",
                   depth=2, value=0.2),
        # the target read the branch from the table before the draft adopted it
        VerifyResult(t=0.3, start_pos=2, proposed=[8, 9], accepted=1, committed=[8, 4],
                     from_cache=True),
        TokenCommitted(t=0.3, pos=2, token_id=8, text=" y", how="accepted"),
        TokenCommitted(t=0.3, pos=3, token_id=4, text=" w", how="correction"),
        DraftProposed(t=0.31, pos=2, token_id=8, text=" y", cached=True, branch_root=1),
    ]:
        state.ingest(e)
    assert state.cached[2] == (1, " x")
    assert state.judged[2].cached  # the inspector shows the branch's proposal
    assert state.rejected[3] == (9, " z")  # its text, from the branch step
    line = cache_source(state, state.tokens[2])
    assert line is not None and "position 1" in line.plain and "' x'" in line.plain
    assert cache_source(state, state.tokens[3]) is None  # a correction, not a cached draft


def test_the_tui_marks_drafts_a_tree_pass_took_from_a_branch():
    from amusd_viz.events import TokenCommitted
    from amusd_viz.ui.state import RunState
    from amusd_viz.ui.widgets import cache_source

    state = RunState()
    hows = [(5, "a", "decoded"), (6, " b", "accepted"), (30, " x", "correction"),
            (31, " y", "accepted"), (4, " w", "bonus")]
    for pos, (token, text, how) in enumerate(hows):
        state.ingest(TokenCommitted(t=0.1, pos=pos, token_id=token, text=text, how=how))
    # drafts 6, 7 at 1, 2: the target took 6, picked 30 over 7 (a branch's bet), went on along
    # the branch: its draft 31 accepted, then its own 4
    state.ingest(VerifyResult(t=0.1, start_pos=1, proposed=[6, 7], accepted=1,
                              committed=[6, 30, 31, 4], tree_paths=3, tree_root=2,
                              tree_proposed=[31], tree_accepted=1))
    assert set(state.cached) == {3}
    line = cache_source(state, state.tokens[3])
    assert line is not None and "position 2" in line.plain and "' x'" in line.plain
    assert "same pass" in line.plain


def test_the_switches_reach_the_engine_and_the_bench_races_both():
    from amusd_viz.bench import KNOWN, VARIANTS, plan_runs
    from amusd_viz.cli import build_bench_config, build_command_parser

    args = build_command_parser("bench").parse_args([
        "--spec-cache", "off", "--adaptive", "off",
        "--strategies", "sync,sync-fixed,amusd,amusd-nocache,amusd-plain"])
    cfg = build_bench_config(args)
    assert (cfg.run.spec_cache, cfg.run.adaptive) == (False, False)
    # each variant is its own run beside the default one, not "the same setup, skipped"
    plan = plan_runs(cfg, gpus=0, cores=[0, 1])
    assert [r.name for r in plan.runs] == ["ar", "sync", "sync-fixed", "amusd", "amusd-nocache",
                                           "amusd-plain"]
    assert VARIANTS["amusd-plain"] == {"spec_cache": False, "adaptive": False}
    assert KNOWN["amusd-nocache"] == KNOWN["amusd"]
