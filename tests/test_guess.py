"""Lookup guesses for the draft (engine/guess.py): one draft pass drafts several tokens where
the text repeats itself, and the drafts are exactly those step-by-step drafting makes."""

from __future__ import annotations

import pytest

from amusd_viz.engine.guess import MAX_GUESSES, Guesser
from amusd_viz.engine.ngram import Match, find_match


def test_find_match_can_ask_for_a_longer_match():
    seq = [1, 2, 3, 9, 2, 3, 7, 3]
    assert find_match(seq, 4) == Match(1, 6)  # "3" at 5, followed by 7
    assert find_match(seq, 4, min_n=2) is None  # "7 3" never came before
    seq = [1, 2, 3, 9, 1, 2, 3]
    assert find_match(seq, 4, min_n=2) == Match(3, 3)  # "1 2 3", followed by 9


def test_guesses_follow_the_runs_record():
    seq = [5, 6, 7, 8, 9, 5, 6]  # "5 6" came before, followed by 7 8 9
    guesser = Guesser(on=True)
    assert guesser.guesses(seq, 8) == [7, 8]  # the prior (1/2): 0.5 and 0.25 are worth it
    assert guesser.guesses(seq, 1) == [7]  # the room caps them
    for _ in range(20):
        guesser.observe([7, 8, 9], [7, 8, 9, 5])
    assert guesser.guesses([*seq, 7, 8, 9, 5, 6], 8) == [7, 8, 9, 5][:MAX_GUESSES]
    for _ in range(40):
        guesser.observe([7, 8], [3])
    assert guesser.guesses(seq, 8) == []  # guesses that never hold are not worth feeding
    assert guesser.unfed == 7
    for _ in range(20):  # nothing fed at first, but the draft keeps going the lookup's way
        guesser.observe(guesser.guesses(seq, 8), [7, 8, 9, 5, 6])
    assert guesser.guesses(seq, 8)[:2] == [7, 8]
    assert Guesser(on=False).guesses(seq, 8) == []
    assert Guesser(on=True).guesses([5, 6, 7, 5], 8) == []  # a one-token match is no guess


@pytest.fixture(scope="module")
def sharp_pair(tiny_models, tmp_path_factory):
    """The tiny target and its near draft with logits scaled ×6: random weights give nearly
    flat distributions, whose samples never repeat; sharper ones fall into the loops that
    lookups find, as real text does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amusd_viz.engine.loading import load_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sharp")
    paths = {}
    for name in ("target", "draft_near"):
        model = AutoModelForCausalLM.from_pretrained(tiny_models[name], dtype=torch.float32)
        with torch.no_grad():
            model.model.norm.weight.mul_(6.0)
        model.save_pretrained(root / name)
        AutoTokenizer.from_pretrained(tiny_models[name]).save_pretrained(root / name)
        paths[name] = root / name
    target = load_model(str(paths["target"]), "float32", "cpu", pack=False)
    draft = load_model(str(paths["draft_near"]), "float32", "cpu", target.tokenizer, pack=False)
    return target, draft


def _sync(pair, sampling, lookup: bool, prompt):
    from amusd_viz.engine.loops import sync_loop
    from amusd_viz.engine.plan import resolve
    from amusd_viz.engine.request import Request

    events: list = []
    req = Request(list(prompt), 40, 4, frozenset(), 0, sampling=sampling,
                  plan=resolve("sync", draft_lookup=lookup, adaptive=False))
    out = sync_loop(req, *pair, ("cpu", "cpu"), events.append)
    proposals = [(e.pos, e.token_id, e.q) for e in events if e.type == "draft_proposed"]
    guessed = sum(e.type == "draft_proposed" and e.guessed for e in events)
    passes = sum(e.type == "forward" and e.role == "draft" for e in events)
    return out.token_ids, proposals, guessed, passes


@pytest.mark.parametrize("rule", ["greedy", "rejection", "coupled"])
def test_guessed_drafts_are_the_drafts_step_by_step_drafting_makes(sharp_pair, rule):
    """With a fixed lookahead every verify pass sees the same drafts with guesses as without:
    the same tokens with the same q (to float32 rounding), in the same order, so the same
    committed text for each seed under every rule (the distribution tests in test_sampling.py
    cover drafting without guesses). Fails if a guess is taken without the draft choosing it,
    or if a row past the first miss is used."""
    from amusd_viz.engine.sampling import GREEDY, SamplingParams

    guessed_in_all = 0
    for seed in range(6 if rule == "greedy" else 12):
        sampling = (GREEDY if rule == "greedy"
                    else SamplingParams(temperature=1.0, seed=seed, acceptance=rule))
        prompt = [20 + seed % 3, 21, 22, 23, 24] * 2
        ids, proposals, none_guessed, passes = _sync(sharp_pair, sampling, False, prompt)
        ids_g, proposals_g, guessed, passes_g = _sync(sharp_pair, sampling, True, prompt)
        assert ids_g == ids, seed
        # a longer pass rounds float32 a little differently (q to ~1e-6): the tokens are the
        # same, and each carries the q it was drawn from, which is what the rules need
        assert [p[:2] for p in proposals_g] == [p[:2] for p in proposals], seed
        assert [p[2] for p in proposals_g] == pytest.approx([p[2] for p in proposals], abs=1e-4)
        assert none_guessed == 0
        assert passes_g == passes - guessed  # each guess the draft chose saved it a pass
        guessed_in_all += guessed
    assert guessed_in_all >= 5  # the guesses were exercised


def test_the_inspector_says_a_draft_came_from_a_lookup_guess():
    from amusd_viz.events import DraftProposed
    from amusd_viz.ui.state import RunState
    from amusd_viz.ui.widgets import lookup_source

    guessed = DraftProposed(t=0.0, pos=3, token_id=5, text="x", guessed=True)
    line = lookup_source(RunState(), guessed)
    assert line is not None and "lookup guess" in line.plain
    assert lookup_source(RunState(), guessed.model_copy(update={"guessed": False})) is None
