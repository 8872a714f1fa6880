"""Core lending's handshake (engine/lending.py) without models: the target borrows the draft's
core only when the draft rests on the text the target has just committed, and a draft that wants
its core back waits until the target's pass is over."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

from amusd_viz.engine.lending import CoreLoan, borrowable_core


def test_a_core_is_borrowable_only_where_each_worker_owns_one():
    assert borrowable_core("cpu:0", "cpu:1") == 1
    assert borrowable_core("cpu:1", "cpu:0") == 0
    assert borrowable_core("cpu:0", "cpu:0") is None  # one core: the baton, not a loan
    assert borrowable_core("cpu", "cpu") is None  # all cores already
    assert borrowable_core("cuda:0", "cuda:1") is None
    assert borrowable_core("cpu:0", None) is None


def test_the_target_borrows_only_from_a_draft_resting_on_its_latest_text():
    loan = CoreLoan(mp.get_context("spawn"), core=1)
    assert not loan.borrow(seen=5, patience_s=0.0)  # the draft is computing
    loan.rest(seen=4)
    start = time.monotonic()
    assert not loan.borrow(seen=5, patience_s=0.05)  # it rested on an older text: no answer yet
    assert time.monotonic() - start >= 0.04  # the target waited for the draft's decision
    loan.rest(seen=5)
    assert loan.borrow(seen=5)
    loan.give_back()
    loan.take()  # the draft wants its core: it holds it now
    assert not loan.borrow(seen=5, patience_s=0.0)


def test_a_draft_taking_its_core_back_waits_for_the_lent_pass_to_end():
    loan = CoreLoan(mp.get_context("spawn"), core=1)
    loan.rest(seen=3)
    assert loan.borrow(seen=3)
    taken = threading.Event()
    threading.Thread(target=lambda: (loan.take(), taken.set()), daemon=True).start()
    assert not taken.wait(0.1)  # the pass is still running on the draft's core
    loan.give_back()
    assert taken.wait(1.0)


def test_a_decision_arriving_while_the_target_waits_is_taken():
    loan = CoreLoan(mp.get_context("spawn"), core=1)
    loan.rest(seen=2)
    threading.Timer(0.003, lambda: loan.rest(seen=3)).start()
    assert loan.borrow(seen=3, patience_s=0.5)


def test_a_draft_expected_to_rest_is_waited_for_before_it_says_so():
    """The prompt's prefill, where extra tokens are dear: the draft will rest from the start,
    but may not have said so yet; the target waits for it instead of prefilling on one core."""
    loan = CoreLoan(mp.get_context("spawn"), core=1)
    threading.Timer(0.02, lambda: loan.rest(seen=7)).start()
    assert not loan.borrow(seen=7, patience_s=0.0)  # not expected: no wait, no loan
    assert loan.borrow(seen=7, patience_s=0.5, expect_rest=True)
    loan.give_back()
    loan.reset()
    start = time.monotonic()
    assert not loan.borrow(seen=7, patience_s=0.05, expect_rest=True)  # it never rested
    assert time.monotonic() - start < 0.5


def test_the_timeline_shows_a_lent_pass_on_the_draft_lane_too():
    """The TUI's lanes: a target pass on the lent core is the target's span, and the draft's
    lane shows its core busy with it ("lent"), not idle."""
    from amusd_viz.events import Forward, RunStarted
    from amusd_viz.ui.state import RunState

    state = RunState()
    state.ingest(RunStarted(t=0.0, strategy="amusd", draft="d", target="t", draft_device="cpu:1",
                           target_device="cpu:0", prompt_tokens=3, dtype="float32",
                           lookahead=4, max_new_tokens=8, prompt="p"))
    state.ingest(Forward(t=1.0, role="target", device="cpu:0", dur=0.2, phase="verify",
                        n_tokens=3, lent=True))
    state.ingest(Forward(t=1.3, role="target", device="cpu:0", dur=0.3, phase="decode",
                        n_tokens=1))
    assert state.lanes["target"].device == "cpu:0"
    assert [s.phase for s in state.lanes["target"].spans] == ["verify", "decode"]
    assert [(s.phase, s.start) for s in state.lanes["draft"].spans] == [("lent", 1.0)]


def test_a_pass_that_raises_still_gives_the_core_back():
    import pytest

    from amusd_viz.engine.lending import borrowed

    loan = CoreLoan(mp.get_context("spawn"), core=1)
    loan.rest(seen=2)
    with pytest.raises(RuntimeError), borrowed(loan, seen=2) as lent:
        assert lent
        raise RuntimeError("the target's pass failed")
    taken = threading.Event()
    threading.Thread(target=lambda: (loan.take(), taken.set()), daemon=True).start()
    assert taken.wait(1.0)  # not left lent: the draft gets its core back
    with borrowed(None, seen=2) as lent:  # no loan (one device, a GPU, --lend-core off)
        assert not lent
