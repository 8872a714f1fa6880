"""Schedules: how amusd's two workers share compute. Built by the coordinator (the cross-process
parts, a baton or a core loan, live in shared memory) and handed to both workers; each loop
calls its side's hooks unconditionally. `Concurrent` is the null version.

- `Concurrent`: two devices, both models compute at once; a draft with nothing worth drafting
  waits for the target's next commit.
- `Baton`: one device. The two workers take turns (sync's schedule): the draft drafts a turn
  (as far as the draft-length policy says, engine/length.py), hands the device to the target,
  which reads and verifies what the turn drafted, and hands it back. A lock also guards each
  forward pass, so the device's passes never overlap.
- `Lending`: two CPU cores. A resting draft lends its core to the target's next pass
  (engine/lending.py), and takes it back before its own next pass; while most drafts are
  rejected, a step must then be worth `LEND_VALUE`, not just `speccache.MIN_VALUE`.
"""

from __future__ import annotations

import contextlib
import time

from amusd_viz.engine.lending import FOR_GOOD, LEND_BELOW_ACCEPTANCE, LEND_VALUE, CoreLoan, borrowed
from amusd_viz.engine.length import FixedLength
from amusd_viz.engine.seq import common_prefix
from amusd_viz.engine.shared import SharedState, poll


class Concurrent:
    """Two devices: nothing to share."""

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        self.begin_run()

    def reset(self) -> None:
        """The coordinator, between runs."""

    def begin_run(self, length: FixedLength | None = None) -> None:
        """The draft, at a run's start: its own state (the target's side keeps none)."""
        self.length = length or FixedLength()
        self.resting = False

    def device_turn(self):
        """Around each forward pass (Runner.turn)."""
        return contextlib.nullcontext()

    # the target's side ------------------------------------------------------------------------
    def target_turn(self) -> None:
        """Before a target pass: wait until the device is the target's."""

    def hand_to_draft(self) -> None:
        """After the target published its verdict."""

    def target_pass(self, seen: int, expect_rest: bool = False):
        """Around a target pass on the committed text of length `seen`: yields whether the
        pass runs on a borrowed core too (`expect_rest`: the draft is expected to rest on it)."""
        return contextlib.nullcontext(False)

    # the draft's side -------------------------------------------------------------------------
    def draft_turn(self) -> None:
        """At the run's start: wait until the draft may compute."""

    def floor(self, acceptance: float) -> float | None:
        """The least value worth a step now (None: the Planner's own)."""
        return None

    def worth_another(self) -> bool:
        """Whether this turn may draft once more (before the Planner's own choice)."""
        return True

    def drafted(self, position: int, step) -> None:
        """A main-line draft at sequence index `position`."""

    def back(self, committed: list[int]) -> None:
        """The draft read the committed text (after the target's verdict)."""

    def idle(self, seen: int) -> None:
        """Nothing worth drafting on the committed text of length `seen`: wait for news."""
        self.resting = True
        self.shared.wait_wakeup(0.5)

    def busy(self) -> None:
        """Before the draft's forward pass."""
        self.resting = False

    def rest_for_good(self) -> None:
        """The draft rests for the whole run (planner.Planner.for_good) and looks for its end
        every 50 ms: not woken by each commit, nor polling every millisecond as a short rest
        does, since a lent pass's OpenMP threads wait for whatever shares their core."""
        self.resting = True
        self.lend_for_good()
        while not self.shared.run_done:
            time.sleep(0.05)

    def lend_for_good(self) -> None:
        """Lending: the core goes to every target pass of the run, with no handshake."""


class Lending(Concurrent):
    """Two CPU cores: the target borrows a resting draft's core for its next pass."""

    def __init__(self, ctx, shared: SharedState, core: int) -> None:
        self.loan = CoreLoan(ctx, core)
        super().__init__(shared)

    def reset(self) -> None:
        self.loan.reset()

    def target_pass(self, seen: int, expect_rest: bool = False):
        return borrowed(self.loan, seen, expect_rest)

    def floor(self, acceptance: float) -> float | None:
        """Lending pays only where most drafts are rejected (lending.py)."""
        return LEND_VALUE if self.resting and acceptance < LEND_BELOW_ACCEPTANCE else None

    def idle(self, seen: int) -> None:
        self.loan.rest(seen)
        super().idle(seen)

    def lend_for_good(self) -> None:
        self.loan.rest(FOR_GOOD)

    def busy(self) -> None:
        if self.resting:
            self.loan.take(stop=lambda: self.shared.run_done)
        super().busy()


class Baton(Concurrent):
    """One device: the workers take turns, each forward pass under a lock."""

    def __init__(self, ctx, shared: SharedState) -> None:
        self.lock = ctx.Lock()
        self.turn = {"target": ctx.Event(), "draft": ctx.Event()}
        super().__init__(shared)

    def reset(self) -> None:
        self.turn["draft"].clear()
        self.turn["target"].set()  # the target goes first: its prefill

    def begin_run(self, length: FixedLength | None = None) -> None:
        super().begin_run(length)
        self.start = 0  # where this turn's drafts begin in the sequence
        self.steps: list = []  # this turn's drafts (engine/passes.Step)
        self.handed_at: float | None = None

    @contextlib.contextmanager
    def device_turn(self):
        """One forward pass at a time. A draft that died holding the lock does not block the
        target (liveness checked every 20 ms)."""
        while not (acquired := self.lock.acquire(timeout=0.02)):
            if not self.shared.draft_alive:
                break
        try:
            yield
        finally:
            if acquired:
                self.lock.release()

    def _wait(self, role: str, stop) -> None:
        if poll(self.turn[role], 3600.0, stop):
            self.turn[role].clear()

    def target_turn(self) -> None:
        self._wait("target", stop=lambda: not self.shared.draft_alive)

    def hand_to_draft(self) -> None:
        self.turn["draft"].set()

    def draft_turn(self) -> None:
        self._wait("draft", stop=lambda: self.shared.run_done)

    def worth_another(self) -> bool:
        return self.length.one_more([s.conf for s in self.steps])

    def drafted(self, position: int, step) -> None:
        if not self.steps:
            self.start = position
        self.steps.append(step)
        self.length.observe_draft(step.secs)

    def back(self, committed: list[int]) -> None:
        """The turn came back with the target's verdict on this turn's drafts; the target's
        pass is timed from the hand-over to the turn coming back."""
        if self.handed_at is None:
            return
        accepted = common_prefix(committed[self.start:], [s.token for s in self.steps])
        self.length.observe_verify(time.perf_counter() - self.handed_at,
                                   [s.conf for s in self.steps], accepted)
        self.steps, self.handed_at = [], None

    def idle(self, seen: int) -> None:
        """Hand the device to the target to verify this turn's drafts; wait for it back."""
        self.handed_at = time.perf_counter()
        self.turn["target"].set()
        self.draft_turn()
