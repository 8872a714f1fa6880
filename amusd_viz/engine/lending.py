"""Core lending: amusd on two CPU cores, the target borrows the draft's core for a pass the draft
sits out (docs/protocol.md, "Two CPU cores: the resting draft lends its core").

On two cores each amusd worker owns one, while `ar` and `sync` run every pass on both: a target
pass on one core costs ~1.5–1.7× one on two. When the draft has nothing worth drafting (its next
drafts are unlikely to be accepted, or it is far ahead), its core would idle; the target takes
it for its next pass instead. The draft must not compute during such a pass (two threads on one
core make an OpenMP pass wait for the slower one), so the loan is a handshake:

- the draft, deciding to rest, says so with the committed length it decided on (`rest`);
- the target, at a pass's start, borrows only if the draft rests on the text it has just
  committed (waiting a few milliseconds for that decision), and gives the core back right after
  the pass, before it publishes the verdict;
- the draft, before any forward pass, takes its core back (`take`), waiting while it is lent.

Only the target's thread count changes, never what it computes: the output is untouched.
"""

from __future__ import annotations

import contextlib
import os
import time

POLL_S = 0.001
LENT, RESTING, DECIDED = range(3)
PATIENCE_S = 0.01  # how long the target waits for the draft's decision on a fresh verdict
# ... and for a draft expected to rest from the start (where extra tokens are dear: planner.py)
# to say so before the prompt's prefill, the run's longest pass: the draft is just starting too
EXPECTED_REST_S = 0.2
# the text length a draft resting for the whole run rests on (planner.Planner.for_good): every
# target pass borrows at once, with no handshake to wait for
FOR_GOOD = 1 << 62
# On a fresh verdict the draft rests (and lends) when its next step is needed with a chance
# below this. Resting gives the target ~35% of a pass (S), worth S × E tokens (E: tokens a pass
# commits); drafting gives the next pass ~5 steps worth v(1 + a + … + a^4) tokens (v: the
# step's value, a: per-check acceptance). Both sides scale alike (E ≈ 1.9, a ≈ 0.5 on prose;
# 4.5 and 0.94 on code), so v ≈ 0.35 is the break-even in both. 0.5 rested too often on code
# (0.73× without lending there, in the first bench run).
LEND_VALUE = 0.35
# ... but only while most checked drafts are rejected. Where they are mostly accepted (code,
# edits: 93–96% per check), a rest costs the speculation cache's bets and the next pass's drafts:
# the pass after a lent one was solo (code 0.93×, edit 0.97× with lending at any acceptance, in
# the 3-repeat run; prose 1.08×, chat 1.03×, per-check acceptance 53% and 68%).
LEND_BELOW_ACCEPTANCE = 0.75


def borrowable_core(target_device: str, draft_device: str | None) -> int | None:
    """The draft's core where amusd's two workers own one CPU core each, else None."""
    if not draft_device or not target_device.startswith("cpu:") or not draft_device.startswith("cpu:"):
        return None
    own, other = int(target_device[4:]), int(draft_device[4:])
    return other if other != own else None


def pin_to_own_core(own: int) -> None:
    """The target's process, entered on its own core and the one it may borrow with two
    threads (devices.enter_device): its OpenMP pool's second thread is born now, while the
    process may run on both cores (a pool thread keeps the affinity it was born with); then the
    main thread is pinned to `own` and passes run on one thread except when `borrowed`."""
    import torch

    torch.ones(1 << 20).sum()  # a parallel op: the pool's second thread is born here
    os.sched_setaffinity(0, {own})  # pid 0: this (main) thread only
    torch.set_num_threads(1)


@contextlib.contextmanager
def borrowed(loan: CoreLoan | None, seen: int, expect_rest: bool = False):
    """A target pass, on two threads if the draft rests on the committed text of length `seen`
    (yields whether it does); the core goes back when the pass ends, even if it raised."""
    if loan is None or not loan.borrow(seen, EXPECTED_REST_S if expect_rest else PATIENCE_S,
                                       expect_rest):
        yield False
        return
    import torch

    torch.set_num_threads(2)
    try:
        yield True
    finally:
        torch.set_num_threads(1)
        loan.give_back()


class CoreLoan:
    """The handshake, in shared memory (three int64s and a lock held for microseconds)."""

    def __init__(self, ctx, core: int) -> None:
        self.core = core
        self._lock = ctx.Lock()
        self._state = ctx.RawArray("q", 3)

    def reset(self) -> None:
        """Between runs, while no worker computes."""
        self._state[LENT] = self._state[RESTING] = self._state[DECIDED] = 0

    # the draft's side ---------------------------------------------------------------------------
    def rest(self, seen: int) -> None:
        """The draft rests, having decided on the committed text of length `seen`."""
        with self._lock:
            self._state[RESTING], self._state[DECIDED] = 1, seen

    def take(self, stop=lambda: False) -> None:
        """Before the draft's next forward pass: wait while its core is lent, then hold it."""
        while True:
            if self._lock.acquire(timeout=0.02):
                try:
                    if not self._state[LENT]:
                        self._state[RESTING] = 0
                        return
                finally:
                    self._lock.release()
            if stop():
                return
            time.sleep(POLL_S)

    # the target's side --------------------------------------------------------------------------
    def borrow(self, seen: int, patience_s: float = PATIENCE_S, expect_rest: bool = False) -> bool:
        """At a pass's start: True if the draft rests on the committed text of length `seen`
        (the core is then lent until `give_back`). `expect_rest`: wait for a draft that is not
        resting yet, too."""
        deadline = time.monotonic() + patience_s
        while ((self._state[RESTING] or expect_rest) and self._state[DECIDED] < seen
               and time.monotonic() < deadline):
            time.sleep(POLL_S / 5)
        if not self._lock.acquire(timeout=0.005):
            return False
        try:
            if self._state[RESTING] and self._state[DECIDED] >= seen:
                self._state[LENT] = 1
                return True
            return False
        finally:
            self._lock.release()

    def give_back(self) -> None:
        acquired = self._lock.acquire(timeout=1.0)
        self._state[LENT] = 0  # without the lock only if the draft died holding it: nobody waits
        if acquired:
            self._lock.release()
