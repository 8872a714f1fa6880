"""The model-free n-gram (prompt lookup) drafter: the lookup by hand, losslessness through the
real engine (greedy and coupled: `ar`'s ids; float32 tiny target), the rejection rule's
distribution with a one-hot q (same bound as tests/test_sampling.py, and a broken correction
that must fail it), and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amusd_viz.config import SamplingParams, parse_ngram
from amusd_viz.engine.ngram import Match, NgramDrafter, find_match
from amusd_viz.engine.session import Engine, EngineConfig
from amusd_viz.errors import UserError
from amusd_viz.events import EventList

# ------------------------------------------------------------------------------ lookup by hand


def test_the_latest_longest_match_wins():
    #        0  1  2  3  4  5  6  7  8  9
    seq = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3]
    # the last 3 tokens (1 2 3) ended at 3 and at 7: the latest is 7 (followed by 7)
    assert find_match(seq, 3) == Match(3, 7)
    # no 3-gram: fall back to shorter ones (the last token 5 never occurred; 4 5 neither)
    assert find_match([4, 8, 6, 4, 5], 3) is None
    assert find_match([4, 8, 6, 4], 3) == Match(1, 1)  # "4" at 0, followed by 8
    assert find_match([5], 3) is None  # nothing earlier
    assert find_match([5, 5], 3) == Match(1, 1)  # "5" at 0, followed by the 5 at 1


def test_the_drafter_copies_on_from_its_match_and_looks_again_after_a_change():
    d = NgramDrafter(3, vocab=20)
    d.begin()
    seq = [1, 2, 3, 4, 5, 6, 1, 2, 3]  # 1 2 3 occurred at 0-2, followed by 4 5 6
    proposed = []
    for _ in range(4):
        logits, fed, _, _ = d.forward(seq + proposed)
        token = int(logits[0].argmax())
        assert fed == 0 and logits[0, token] == 0 and (logits[0] == float("-inf")).sum() == 19
        proposed.append(token)
    assert proposed == [4, 5, 6, 1]
    assert d.last == Match(3, 6)  # the fourth token copied index 6
    # the target took another path: 1 2 3 8. "8" never occurred: nothing to propose
    logits, *_ = d.forward(seq + [8])
    assert logits is None and d.last is None
    assert d.top(d.forward(seq)[0][0]) == [{"id": 4, "text": "4", "p": 1.0}]


@pytest.mark.parametrize(("spec", "n"), [("ngram", 3), ("ngram:1", 1), ("ngram:7", 7),
                                         ("qwen-coder-0.5b", None), ("ngramz", None)])
def test_ngram_specs(spec, n):
    assert parse_ngram(spec) == n


@pytest.mark.parametrize("spec", ["ngram:0", "ngram:x", "ngram:", "ngram:-1", "ngram:99"])
def test_bad_ngram_specs_are_one_clear_line(spec):
    with pytest.raises(UserError, match="ngram:N"):
        parse_ngram(spec)
    out = subprocess.run([sys.executable, "-m", "amusd_viz", "--headless", "--draft", spec],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and spec in lines[0] and "Traceback" not in out.stderr


# ------------------------------------------------------------ lossless through the real engine


@pytest.fixture(scope="module")
def ngram_engines(tiny_models):
    made = {}

    def get(strategy, sampling=False):
        key = (strategy, sampling)
        if key not in made:
            params = SamplingParams(1.0, 1.0, 0, 0, "coupled") if sampling else None
            sink = EventList()
            # the n-gram drafter needs no core: its worker shares the target's device
            cfg = EngineConfig(strategy=strategy, target_src=str(tiny_models["target"]),
                               draft_src="ngram:3" if strategy != "ar" else None,
                               target_device="cpu:0", draft_device="cpu:0", dtype="float32",
                               **({"sampling": params} if params else {}))
            engine = Engine(cfg, sink)
            engine.start()
            engine.wait_ready()
            made[key] = (engine, sink)
        return made[key]

    yield get
    for engine, _ in made.values():
        engine.close()


# few distinct tokens: prompts that repeat themselves, so the lookup finds matches
repetitive = st.lists(st.integers(3, 9), min_size=2, max_size=30)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=repetitive, max_new=st.integers(1, 40), lookahead=st.integers(1, 6))
def test_greedy_ngram_drafting_gives_the_targets_own_tokens(ngram_engines, prompt, max_new,
                                                            lookahead):
    engine, _ = ngram_engines("ar")
    reference = engine.generate(prompt, max_new, lookahead, frozenset())
    for strategy in ("sync", "amusd"):
        engine, sink = ngram_engines(strategy)
        sink.events = []
        gen = engine.generate(prompt, max_new, lookahead, frozenset())
        assert gen.token_ids == reference.token_ids, strategy
        commits = [e for e in sink.events if e.type == "token_committed"]
        assert [e.token_id for e in commits] == gen.token_ids
        lookups = [e for e in sink.events if e.type == "forward" and e.role == "draft"]
        assert all(e.phase == "lookup" and e.n_tokens == 0 for e in lookups)


def test_lookups_are_accepted_where_the_text_repeats(ngram_engines):
    """A tiny random model falls into loops: the drafter copies them and the target accepts."""
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    engine, _ = ngram_engines("ar")
    reference = engine.generate(prompt, 60, 6, frozenset())
    for strategy in ("sync", "amusd"):
        engine, sink = ngram_engines(strategy)
        sink.events = []
        gen = engine.generate(prompt, 60, 6, frozenset())
        assert gen.token_ids == reference.token_ids
        accepted = sum(e.accepted for e in sink.events if e.type == "verify_result")
        # (amusd less: a tiny target decodes in a millisecond, often before the lookup lands)
        assert accepted >= (20 if strategy == "sync" else 5), strategy
        proposals = [e for e in sink.events if e.type == "draft_proposed"]
        full = prompt + gen.token_ids
        for e in proposals:  # each names an earlier index it copied from, with certainty
            assert e.ngram_n >= 1 and e.q == 1.0 and e.ngram_from < len(prompt) + e.pos
        # an accepted draft was copied from the text that stayed final: the token it names
        # (amusd's two workers report on two pipes, so a proposal may arrive after its verdict)
        by_pos: dict[int, list] = {}
        for e in proposals:
            by_pos.setdefault(e.pos, []).append(e)
        checked = 0
        for e in sink.events:
            if e.type == "verify_result":
                for i in range(e.accepted):
                    pos, token = e.start_pos + i, e.proposed[i]
                    copies = [p for p in by_pos.get(pos, []) if p.token_id == token]
                    assert copies, (strategy, pos)
                    assert any(full[p.ngram_from] == token for p in copies), strategy
                    checked += 1
        assert checked == accepted


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=repetitive, max_new=st.integers(1, 30), lookahead=st.integers(1, 6),
       seed=st.integers(0, 2**32 - 1), temperature=st.sampled_from([0.3, 1.0]),
       top_k=st.sampled_from([0, 3]))
def test_coupled_ngram_sampling_gives_ar_ids(ngram_engines, prompt, max_new, lookahead, seed,
                                             temperature, top_k):
    params = SamplingParams(temperature, 1.0, top_k, seed, "coupled")
    engine, _ = ngram_engines("ar", sampling=True)
    reference = engine.generate(prompt, max_new, lookahead, frozenset(), sampling=params)
    for strategy in ("sync", "amusd"):
        engine, _ = ngram_engines(strategy, sampling=True)
        gen = engine.generate(prompt, max_new, lookahead, frozenset(), sampling=params)
        assert gen.token_ids == reference.token_ids, strategy


# ---------------------------------------------------------- the rejection rule's distribution

# every token of the tiny vocabulary's likely range occurs in the prompt, so the drafter always
# has a proposal, and the one-hot q is checked at every position
NGRAM_PROMPT = [*range(3, 100), 11, 12, 13]


@pytest.fixture(scope="module")
def ngram_case(tiny_models):
    import sampling_cases as cases

    target = cases.load_target(tiny_models)
    drafter = NgramDrafter(3, target.vocab)
    return target, drafter, cases.exact_distribution(target, NGRAM_PROMPT)


def test_rejection_with_a_one_hot_q_keeps_the_target_distribution(ngram_case):
    import sampling_cases as cases

    target, drafter, exact = ngram_case
    counting = cases.CountingTarget(target)
    counts = cases.empirical(lambda seed: cases.run_sync(counting, drafter, seed, "rejection",
                                                         NGRAM_PROMPT))
    assert counting.verified == cases.DRAWS  # every run verified lookups
    assert cases.tv(counts, exact) < cases.tv_bound(len(exact)), cases.tv(counts, exact)


def test_a_correction_that_may_redraw_the_rejected_token_fails(ngram_case, monkeypatch):
    """With q one-hot on x, the residual is p with x removed; drawing from p instead can
    redraw x right after rejecting it."""
    import sampling_cases as cases

    target, drafter, exact = ngram_case
    monkeypatch.setattr(cases.sampling.Sampler, "_residual", cases.residual_from_p)
    counts = cases.empirical(lambda seed: cases.run_sync(target, drafter, seed, "rejection",
                                                         NGRAM_PROMPT))
    assert cases.tv(counts, exact) > cases.tv_bound(len(exact)), cases.tv(counts, exact)


def test_headless_run_with_the_ngram_drafter(tiny_models):
    out = subprocess.run([sys.executable, "-m", "amusd_viz", "--headless", "--draft", "ngram:2",
                          "--target", str(tiny_models["target"]), "--dtype", "float32",
                          "--prompt", "abcabcabcabc", "--max-new-tokens", "12"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["draft"] == "ngram:2" and summary["new_tokens"] == 12
    # no core is kept from the target: both run on all cores
    assert summary["target_device"] == "cpu" and summary["draft_device"] == "cpu"
