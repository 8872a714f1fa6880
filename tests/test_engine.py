"""The engine on tiny random-weight models in float32, where greedy equality is exact: every
strategy must produce exactly the target's own greedy tokens, with a consistent event stream."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amusd_viz.engine.session import Engine, EngineConfig
from amusd_viz.events import EventList

NO_EOS = frozenset()


class Recorder(EventList):
    def take(self):
        events, self.events = self.events, []
        return events


def make_engine(models, strategy, draft="draft_far", target_device="cpu:0", draft_device=None,
                **extra):
    """amusd's draft on cpu:1 unless told; sync's beside the target unless told (sync-2dev)."""
    sink = Recorder()
    draft_device = draft_device or ("cpu:1" if strategy == "amusd" else target_device)
    cfg = EngineConfig(strategy=strategy, target_src=str(models["target"]),
                       draft_src=str(models[draft]) if strategy != "ar" else None,
                       target_device=target_device, draft_device=draft_device,
                       dtype="float32", **extra)
    engine = Engine(cfg, sink)
    engine.start()
    engine.wait_ready()
    return engine, sink


def run_fresh(models, strategy, draft, prompt, max_new, **extra):
    """One run on an engine of its own (closed after it): the output and its events."""
    engine, sink = make_engine(models, strategy, draft, **extra)
    try:
        gen = engine.generate(prompt, max_new, 4, NO_EOS)
    finally:
        engine.close()
    return gen, sink.take()


@pytest.fixture(scope="module")
def engines(tiny_models):
    made = {}

    def get(strategy, draft="draft_far", **kw):
        key = (strategy, draft, repr(sorted(kw.items())))
        if key not in made:
            made[key] = make_engine(tiny_models, strategy, draft, **kw)
        return made[key]

    yield get
    for engine, _ in made.values():
        engine.close()


def run(engines, strategy, prompt, max_new, lookahead=4, draft="draft_far", eos=NO_EOS, **kw):
    engine, sink = engines(strategy, draft, **kw)
    sink.take()
    gen = engine.generate(prompt, max_new, lookahead, eos)
    return gen, sink.take()


def check_invariants(gen, events):
    """docs/architecture.md, "Invariants": committed positions 0,1,2,… without gap or repeat, equal to the generated
    ids; the forward spans of one device never overlap (a target pass on the draft's lent core,
    `lent`, occupies the draft's core too)."""
    commits = [e for e in events if e.type == "token_committed"]
    assert [e.pos for e in commits] == list(range(len(commits)))
    assert [e.token_id for e in commits] == gen.token_ids
    spans: dict[str, list] = {}
    draft_device = next((e.device for e in events if e.type == "forward" and e.role == "draft"),
                        None)
    for e in events:
        if e.type == "forward":
            assert e.dur >= 0
            for device in [e.device, *([draft_device] if e.lent else [])]:
                spans.setdefault(device, []).append((e.t, e.t + e.dur))
    for device, intervals in spans.items():
        intervals.sort()
        for (_, end), (start, _) in zip(intervals, intervals[1:]):
            assert start >= end - 1e-6, f"overlapping forward passes on {device}"
    for e in events:
        if e.type == "verify_result":
            assert 0 <= e.accepted <= len(e.proposed)
            assert e.committed[: e.accepted] == e.proposed[: e.accepted][: len(e.committed)]


prompts = st.lists(st.integers(min_value=2, max_value=99), min_size=1, max_size=24)


def test_ar_equals_transformers_generate(engines, tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], dtype=torch.float32)
    for prompt in ([5], [7, 8, 9, 10], list(range(20, 45))):
        gen, events = run(engines, "ar", prompt, 30)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert gen.token_ids == out[0, len(prompt):].tolist()
        check_invariants(gen, events)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=prompts, max_new=st.integers(1, 40), lookahead=st.integers(1, 6),
       draft=st.sampled_from(["draft_far", "draft_near", "draft_same"]))
def test_speculative_strategies_equal_plain_decoding(engines, prompt, max_new, lookahead, draft):
    reference, _ = run(engines, "ar", prompt, max_new)
    assert len(reference.token_ids) == max_new
    for strategy in ("sync", "amusd"):
        gen, events = run(engines, strategy, prompt, max_new, lookahead, draft)
        assert gen.token_ids == reference.token_ids, (strategy, draft)
        check_invariants(gen, events)


def test_rollbacks_happen_and_stay_lossless(engines):
    """A draft with unrelated weights is rejected often: many rollbacks, same output."""
    prompt = [11, 12, 13]
    reference, _ = run(engines, "ar", prompt, 60)
    gen, events = run(engines, "amusd", prompt, 60, lookahead=4, draft="draft_far")
    assert gen.token_ids == reference.token_ids
    rollbacks = [e for e in events if e.type == "rollback"]
    assert len(rollbacks) >= 3
    for e in rollbacks:
        assert e.discarded and e.to_pos >= 0
    proposals = [e for e in events if e.type == "draft_proposed"]
    assert all(len(e.top) == 5 and abs(sum(c.p for c in e.top)) <= 1.0001 for e in proposals)


def test_sync_checks_the_drafts_other_likely_tokens_in_the_same_pass(engines):
    """Tree passes (engine/tree.py): beside each draft the target also checks the draft's other
    likely tokens; where it rejects a draft and picks one of them, the same pass commits its own
    next token after it. Same output, fewer passes (fixed lookahead: nothing depends on time)."""
    prompt = [11, 12, 13]
    reference, _ = run(engines, "ar", prompt, 60)
    gen, events = run(engines, "sync", prompt, 60, lookahead=4, draft="draft_near",
                      adaptive=False)
    flat, flat_events = run(engines, "sync", prompt, 60, lookahead=4, draft="draft_near",
                            adaptive=False, tree=False)
    assert gen.token_ids == reference.token_ids and flat.token_ids == reference.token_ids
    check_invariants(gen, events)
    hits = [e for e in events if e.type == "verify_result" and e.tree_root is not None]
    assert hits
    for e in hits:  # the accepted drafts, the bet, the target's token after it
        assert e.tree_paths >= 1 and e.tree_root == e.start_pos + e.accepted
        assert len(e.committed) == min(e.accepted + 2, 60 - e.start_pos) and not e.tree_accepted
    assert not any(e.type == "verify_result" and e.tree_paths for e in flat_events)
    passes = [sum(e.type == "verify_result" for e in evs) for evs in (events, flat_events)]
    assert passes[0] < passes[1], passes


def test_lookup_guesses_draft_several_tokens_in_one_pass(engines):
    """Where the text repeats itself (greedy tiny models fall into loops), a draft pass also
    checks lookup guesses (engine/guess.py): proposals marked guessed, drafted in a pass of
    several tokens, and still the target's own tokens; with the lookup off, no guesses."""
    prompt = list(range(20, 40)) * 2
    reference, _ = run(engines, "ar", prompt, 40)
    for strategy in ("sync", "amusd"):
        gen, events = run(engines, strategy, prompt, 40, draft="draft_near")
        assert gen.token_ids == reference.token_ids, strategy
        check_invariants(gen, events)
        assert any(e.type == "draft_proposed" and e.guessed for e in events), strategy
        assert any(e.type == "forward" and e.role == "draft" and e.phase == "draft"
                   and e.n_tokens > 1 for e in events), strategy
        plain, plain_events = run(engines, strategy, prompt, 40, draft="draft_near",
                                  draft_lookup=False)
        assert plain.token_ids == reference.token_ids, strategy
        assert not any(e.type == "draft_proposed" and e.guessed for e in plain_events)


def test_a_resting_draft_lends_its_core_to_the_target(engines, tiny_models):
    """amusd with a core per worker (engine/lending.py): where the draft has nothing worth
    drafting (once draft_near is ahead of a target slowed to 10 ms a pass, a long line of its
    drafts survives with a small chance; without the cache there are no bets to spend its steps
    on), the target's next pass also runs on the draft's core; the draft computes
    nothing during such a pass (check_invariants: no two passes on one core overlap), and the
    text is still the target's own. With --lend-core off, no pass is lent."""
    prompt = [11, 12, 13, 14]
    reference, _ = run(engines, "ar", prompt, 40)
    for lend in (True, False):
        gen, events = run_fresh(tiny_models, "amusd", "draft_near", prompt, 40, spec_cache=False,
                                lend_core=lend, faults={"target": "slow:0.01"})
        assert gen.token_ids == reference.token_ids
        check_invariants(gen, events)
        lent = [e for e in events if e.type == "forward" and e.lent]
        if not lend:
            assert not lent
            continue
        assert lent and all(e.role == "target" and e.device == "cpu:0" for e in lent)
        later = [e for e in events if e.type == "forward" and e.role == "draft" and e.t > lent[0].t]
        assert later, "the draft never took its core back"


def test_where_extra_tokens_are_dear_speculation_steps_aside(engines, tiny_models):
    """An AVX2-only CPU, where a pass of k tokens costs about k passes (estimate.PassCost; the
    "dear" fault gives a tiny model that cost): no draft pays for its place in a pass, so sync
    decodes plainly from its first pass (both models' costs are known at load) and amusd's
    draft rests from the start, lending its core to every target pass, the prompt's prefill
    included. The text is the target's own; the timeline shows the draft lane idle."""
    prompt = [21, 22, 23, 24]
    reference, _ = run(engines, "ar", prompt, 20)
    for strategy, faults in (("sync", {"target": "dear"}),
                             ("amusd", {"target": "dear"})):  # the draft follows the target
        gen, events = run_fresh(tiny_models, strategy, "draft_near", prompt, 20, faults=faults)
        assert gen.token_ids == reference.token_ids
        passes = [e for e in events if e.type == "forward"]
        assert passes and all(e.role == "target" for e in passes), strategy
        assert all(not e.proposed for e in events if e.type == "verify_result")
        if strategy == "amusd":
            assert all(e.lent for e in passes), [(e.phase, e.lent) for e in passes]


def test_sync_on_two_devices_runs_each_model_on_its_own(engines):
    """sync-2dev, the paper's baseline: one process, the draft's passes on cpu:1 and the
    target's on cpu:0, taking turns (never both at once); the tokens are ar's and sync's."""
    prompt = [40, 41, 42, 43]
    reference, _ = run(engines, "ar", prompt, 30)
    one, _ = run(engines, "sync", prompt, 30, lookahead=4, draft="draft_near")
    engine, _ = engines("sync", "draft_near", draft_device="cpu:1")
    gen, events = run(engines, "sync", prompt, 30, lookahead=4, draft="draft_near",
                      draft_device="cpu:1")
    assert gen.token_ids == one.token_ids == reference.token_ids
    check_invariants(gen, events)
    forwards = [e for e in events if e.type == "forward"]
    assert {(e.role, e.device) for e in forwards} == {("target", "cpu:0"), ("draft", "cpu:1")}
    spans = sorted((e.t, e.t + e.dur) for e in forwards)
    assert all(b >= a_end - 1e-6 for (_, a_end), (b, _) in zip(spans, spans[1:])), "not turns"
    assert set(engine.pids()) == {"target"}  # one process holds both models


def test_lookahead_one(engines):
    prompt = [30, 31]
    reference, _ = run(engines, "ar", prompt, 25)
    for strategy in ("sync", "amusd"):
        gen, events = run(engines, strategy, prompt, 25, lookahead=1, draft="draft_near")
        assert gen.token_ids == reference.token_ids
        assert all(len(e.proposed) <= 1 for e in events if e.type == "verify_result")


def test_always_accepting_draft_gets_bonus_tokens(engines):
    prompt = [40, 41, 42]
    reference, _ = run(engines, "ar", prompt, 30)
    gen, events = run(engines, "sync", prompt, 30, lookahead=4, draft="draft_same")
    assert gen.token_ids == reference.token_ids
    hows = {e.how for e in events if e.type == "token_committed"}
    assert "bonus" in hows and "correction" not in hows
    passes = [e for e in events if e.type == "verify_result" and e.proposed]
    assert all(e.accepted == len(e.proposed) for e in passes)


def test_eos_in_the_middle_of_an_accepted_run(engines):
    prompt = [50, 51, 52]
    reference, _ = run(engines, "ar", prompt, 30)
    stop_at = 6  # make the token at position 6 the end of sequence
    eos = frozenset({reference.token_ids[stop_at]})
    first = reference.token_ids.index(reference.token_ids[stop_at])
    expected = reference.token_ids[: first + 1]
    for strategy in ("ar", "sync", "amusd"):
        gen, events = run(engines, strategy, prompt, 30, lookahead=6, draft="draft_same", eos=eos)
        assert gen.token_ids == expected, strategy
        assert gen.stop_reason == "eos"
        check_invariants(gen, events)


def test_max_new_tokens_inside_a_verify_pass(engines):
    prompt = [60, 61]
    for max_new in (1, 2, 3, 5):
        reference, _ = run(engines, "ar", prompt, max_new)
        for strategy in ("sync", "amusd"):
            gen, _ = run(engines, strategy, prompt, max_new, lookahead=8, draft="draft_same")
            assert gen.token_ids == reference.token_ids
            assert len(gen.token_ids) == max_new
            assert gen.stop_reason == "max_new_tokens"


def test_both_workers_on_one_device(engines):
    prompt = [70, 71, 72, 73]
    reference, _ = run(engines, "ar", prompt, 30)
    gen, events = run(engines, "amusd", prompt, 30, lookahead=3, draft="draft_near",
                      draft_device="cpu:0", adaptive=False)
    assert gen.token_ids == reference.token_ids
    assert {e.device for e in events if e.type == "forward"} == {"cpu:0"}
    check_invariants(gen, events)  # the two workers take turns: no overlapping spans
    # the target reads the drafts after its turn is won: it verifies a full batch every time
    # (before the baton, the workers alternated one pass each and it verified almost none)
    verifies = [e for e in events if e.type == "verify_result"]
    assert all(len(e.proposed) == min(3, 30 - e.start_pos - 1) for e in verifies[1:]), \
        [len(e.proposed) for e in verifies]


def test_on_one_device_amusd_drafts_as_far_as_sync_would(engines):
    """Taking turns on one device is sync's schedule, so amusd's turns follow sync's adaptive
    lookahead (a draft that disagrees often stops early) and its passes check sync's bets
    beside the drafts; the tokens stay ar's."""
    prompt = [30, 31, 32, 33, 34]
    reference, _ = run(engines, "ar", prompt, 40)
    lengths = {}
    for adaptive in (False, True):
        gen, events = run(engines, "amusd", prompt, 40, lookahead=8, draft_device="cpu:0",
                          adaptive=adaptive)
        assert gen.token_ids == reference.token_ids
        check_invariants(gen, events)
        verifies = [e for e in events if e.type == "verify_result"][1:]
        lengths[adaptive] = sum(len(e.proposed) for e in verifies) / len(verifies)
        assert any(e.tree_paths for e in verifies)  # bets beside the drafts, as in sync
    assert lengths[True] < 0.75 * lengths[False], lengths


def test_workers_are_separate_processes(engines):
    engine, _ = engines("amusd", "draft_far")
    pids = engine.pids()
    assert set(pids) == {"target", "draft"}
    assert len(set(pids.values())) == 2
    import os

    assert os.getpid() not in pids.values()


def test_a_cached_preamble_changes_only_the_prefill(engines):
    """The chat template's fixed head is fed at load time: every run starts past it, whatever ran
    before, with the same tokens as a run that feeds the whole prompt."""
    preamble = (3, 4, 5, 6)
    prompts = ([3, 4, 5, 6, 20, 21], [3, 4, 5, 6, 30, 31, 32, 33], [9, 3, 4], [3, 4, 5, 6, 20, 21])
    for strategy in ("ar", "sync", "amusd"):
        for prompt in prompts:
            reference, _ = run(engines, "ar", prompt, 20)
            gen, events = run(engines, strategy, prompt, 20, lookahead=3, draft="draft_near",
                              preamble=preamble)
            assert gen.token_ids == reference.token_ids, (strategy, prompt)
            check_invariants(gen, events)
            head = len(preamble) if prompt[: len(preamble)] == list(preamble) else 0
            fed = [e.n_tokens for e in events if e.type == "forward" and e.role == "target"]
            assert fed[0] == len(prompt) - head, (strategy, prompt)
            if strategy == "sync":  # its draft starts after the target's first token
                fed = [e.n_tokens for e in events if e.type == "forward" and e.role == "draft"]
                assert fed[0] == len(prompt) - head + 1, (strategy, prompt)


@pytest.mark.parametrize("strategy,devices", [
    ("ar", {}), ("sync", {}), ("sync", {"draft_device": "cpu:1"}),
    ("amusd", {"faults": {"target": "slow:0.03"}})])  # a slow target: the draft branches
def test_the_static_kv_cache_gives_the_dynamic_caches_ids(engines, strategy, devices):
    """`--kv-cache static` (preallocated lines, rollback = the pointer moving back, branches on
    lines of their own, the preamble copied back in): the same ids as `ar` on the dynamic
    cache, through rollbacks, tree passes, speculation-cache branches and prompts that do and
    do not start with the preamble."""
    preamble = (3, 4, 5, 6)
    static = {"kv_cache": "static", "preamble": preamble, **devices}
    branched = 0
    for prompt in ([3, 4, 5, 6, 20, 21], [9, 3, 4], [3, 4, 5, 6, *range(30, 70)]):
        reference, _ = run(engines, "ar", prompt, 40)
        for draft in ("draft_far", "draft_near"):
            gen, events = run(engines, strategy, prompt, 40, lookahead=4, draft=draft, **static)
            assert gen.token_ids == reference.token_ids, (strategy, prompt, draft)
            check_invariants(gen, events)
            branched += sum(e.type == "branch_step" and not e.sibling for e in events)
    assert strategy != "amusd" or branched > 0  # forks ran on lines of their own
