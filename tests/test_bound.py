"""The no-waste model of sync and amusd (amusd_viz/bound.py), by hand and through the stats."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amusd_viz.bound import async_best, best_for, sync_best, tokens_per_pass
from amusd_viz.events import Forward, RunFinished, RunStarted, VerifyResult
from amusd_viz.stats import compute, format_stats


def test_tokens_per_pass_by_hand():
    assert tokens_per_pass(0.5, 0) == 1.0
    assert tokens_per_pass(0.5, 4) == 1 + 0.5 + 0.25 + 0.125 + 0.0625
    assert tokens_per_pass(1.0, 3) == 4.0


def test_sync_and_async_by_hand():
    """a = 0.5, T = 1 s, D = 0.1 s, lookahead 4. E(k) = 1, 1.5, 1.75, 1.875, 1.9375.
    sync: (k·D + T) / E(k) = 1000, 733.3, 685.7, 693.3, 722.6 ms: best at k = 2.
    async: max(T, k·D) / E(k) = 1000 / E(k): best at k = 4, 516.1 ms."""
    s = sync_best(0.5, 1.0, 0.1, 4)
    assert s.drafts == 2 and s.ms_per_token == pytest.approx(1200 / 1.75)
    a = async_best(0.5, 1.0, 0.1, 4)
    assert a.drafts == 4 and a.ms_per_token == pytest.approx(1000 / 1.9375)
    # a draft as slow as the target: async gains nothing from drafting more than one step
    slow = async_best(0.9, 0.2, 0.2, 8)
    assert slow.drafts == 1 and slow.ms_per_token == pytest.approx(200 / 1.9)


@given(a=st.floats(0.0, 0.99), target=st.floats(0.01, 2.0), draft=st.floats(0.001, 2.0),
       lookahead=st.integers(1, 12))
def test_overlap_gains_at_most_twice(a, target, draft, lookahead):
    """max(T, kD) <= kD + T <= 2·max(T, kD) for every k: with the same pass times, async is never
    slower than sync and never more than twice as fast."""
    s = sync_best(a, target, draft, lookahead).ms_per_token
    o = async_best(a, target, draft, lookahead).ms_per_token
    assert o <= s * (1 + 1e-9)
    assert s <= 2 * o * (1 + 1e-9)


def test_which_strategies_have_a_model():
    assert best_for("ar", True, 0.8, 0.3, 0.05, 8) is None
    assert best_for("amusd", False, 0.8, 0.3, 0.05, 8) is None  # one shared device: a baton
    assert best_for("amusd", True, None, 0.3, 0.05, 8) is None  # nothing was checked
    assert best_for("sync", False, 0.8, 0.3, None, 8) is None  # a lookup drafter: no steps
    assert best_for("amusd", True, 0.8, 0.3, 0.05, 8) == async_best(0.8, 0.3, 0.05, 8)
    assert best_for("sync", False, 0.8, 0.3, 0.05, 8) == sync_best(0.8, 0.3, 0.05, 8)


def _run(draft_device: str) -> list:
    """amusd with lookahead 4: target passes of 1 s (the prefill, 3 s, is left out), draft steps
    of 0.1 s, and checks 2 accepted of 4 checked (a = 0.5)."""
    events = [RunStarted(t=0.0, strategy="amusd", draft="d", target="t",
                         draft_device=draft_device, target_device="cpu:0", prompt_tokens=3,
                         lookahead=4),
              Forward(t=0.0, role="target", device="cpu:0", dur=3.0, phase="prefill", n_tokens=3)]
    events += [Forward(t=3 + i / 10, role="draft", device=draft_device, dur=0.1, phase="draft",
                       n_tokens=1) for i in range(5)]
    events += [Forward(t=3.0 + i, role="target", device="cpu:0", dur=1.0, phase="verify",
                       n_tokens=3) for i in range(3)]
    events += [VerifyResult(t=4.0, start_pos=1, proposed=[5, 6], accepted=1, committed=[5, 7]),
               VerifyResult(t=5.0, start_pos=3, proposed=[8, 9], accepted=1, committed=[8, 2]),
               RunFinished(t=6.0, new_tokens=5, wall_s=6.0, started_at=0.0)]
    return events


def test_the_stats_report_pass_times_and_the_best_with_no_waste():
    s = compute(_run("cpu:1"))
    assert (s.target_pass_s, s.draft_step_s) == (1.0, 0.1)
    assert s.acceptance_per_check == 0.5
    assert s.best_drafts == 4 and s.best_ms_per_token == pytest.approx(1000 / 1.9375)
    text = format_stats(s)
    assert "pass times (median)    target 1000 ms, draft step 100 ms" in text
    assert "best with no waste     516.1 ms/token at 4 drafts/pass" in text
    shared = compute(_run("cpu:0"))  # both workers on one core: the model does not apply
    assert shared.best_ms_per_token is None
    assert "best with no waste" not in format_stats(shared)


def test_bets_won_at_rejections_raise_the_model():
    """A rejection comes with probability 1 - a^k; a tree pass then wins b more tokens on
    average. a = 0.5, k = 2, b = 0.4: E = 1.75 + 0.4 · 0.75 = 2.05."""
    assert tokens_per_pass(0.5, 2, bets=0.4) == pytest.approx(2.05)
    assert tokens_per_pass(1.0, 3, bets=5.0) == 4.0  # nothing is ever rejected
    s = sync_best(0.5, 1.0, 0.1, 4, bets=0.4)
    assert s.ms_per_token == min(1000 * (k * 0.1 + 1.0) / tokens_per_pass(0.5, k, 0.4)
                                 for k in range(5))
    assert s.ms_per_token < sync_best(0.5, 1.0, 0.1, 4).ms_per_token


def test_the_stats_count_the_tokens_bets_won():
    """_run's two passes each reject a draft; a tree pass that took a bet and went on one token
    past it (tree_tokens 1 of 2 rejections: b = 0.5) lowers the best with no waste."""
    events = _run("cpu:1")
    events[-2] = VerifyResult(t=5.0, start_pos=3, proposed=[8, 9], accepted=1,
                              committed=[8, 4, 2], tree_paths=1, tree_root=1)
    s = compute(events)
    assert s.tree_tokens == 1
    assert s.best_ms_per_token == pytest.approx(async_best(0.5, 1.0, 0.1, 4, bets=0.5).ms_per_token)
    assert s.best_ms_per_token < compute(_run("cpu:1")).best_ms_per_token
