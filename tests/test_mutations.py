"""The identity tests can fail: known engine bugs, patched in, make `sync` differ from `ar` on
tiny float32 models (the loops run in this process, so a patch reaches them)."""

from __future__ import annotations

import pytest
import torch

from amusd_viz.engine import sampling
from amusd_viz.engine.loops import ar_loop, sync_loop
from amusd_viz.engine.plan import resolve
from amusd_viz.engine.request import Request
from amusd_viz.engine.runner import Runner

PROMPTS = ([11, 12, 13], [40, 41], [5, 6, 7, 8, 9], [70])


@pytest.fixture(scope="module")
def runners(tiny_models):
    from amusd_viz.engine.loading import load_model

    torch.set_num_threads(1)
    target = load_model(str(tiny_models["target"]), "float32", "cpu", pack=False)
    draft = load_model(str(tiny_models["draft_near"]), "float32", "cpu", target.tokenizer, pack=False)
    return target, draft


def identical_everywhere(target, draft, tree: bool) -> bool:
    """sync (with or without tree passes) equals ar on every prompt. A run that raises counts as
    caught too: with bets beside the drafts, the tree attention mask no longer fits a KV cache
    that a bug left one token off, and the pass fails loudly."""
    for prompt in PROMPTS:
        req = Request(prompt, 24, 4, frozenset(), 0,
                      plan=resolve("sync", adaptive=False, tree=tree, draft_lookup=False))
        ar = ar_loop(req, target, "cpu", lambda e: None).token_ids
        try:
            sync = sync_loop(req, target, draft, ("cpu", "cpu"), lambda e: None).token_ids
        except RuntimeError:
            return False
        if ar != sync:
            return False
    return True


@pytest.mark.parametrize("tree", [False, True], ids=["plain", "tree"])
def test_the_unbroken_engine_passes(runners, tree):
    assert identical_everywhere(*runners, tree)


def _crop_keeps_one_too_many(monkeypatch):
    original = Runner.crop

    def crop(self, keep):
        original(self, min(len(self.ids), keep + 1))

    monkeypatch.setattr(Runner, "crop", crop)


def _rollback_forgets_one_token(monkeypatch):
    """The cache drops one token more than `ids` says: the next pass runs without it."""

    def crop(self, keep):
        drop = len(self.ids) - keep
        if drop > 0:
            self.cache.crop(-(drop + 1))
            del self.ids[keep:]

    monkeypatch.setattr(Runner, "crop", crop)


def _verify_accepts_one_more(monkeypatch):
    original = sampling._greedy_verdict

    def verdict(preds, drafts):
        v = original(preds, drafts)
        if v.accepted < len(drafts):  # take the rejected draft token as if it had matched
            i = v.accepted
            return sampling.Verdict(i + 1, [*drafts[:i + 1], preds[i + 1]],
                                    ["accepted"] * (i + 1) + ["correction"], [])
        return v

    monkeypatch.setattr(sampling, "_greedy_verdict", verdict)


@pytest.mark.parametrize("mutation", [_crop_keeps_one_too_many, _rollback_forgets_one_token,
                                      _verify_accepts_one_more],
                         ids=["crop-off-by-one", "rollback-forgets-a-token", "verify-off-by-one"])
@pytest.mark.parametrize("tree", [False, True], ids=["plain", "tree"])
def test_a_broken_engine_fails_the_identity_check(runners, monkeypatch, mutation, tree):
    mutation(monkeypatch)
    assert not identical_everywhere(*runners, tree)
