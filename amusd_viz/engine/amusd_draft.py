"""amusd's drafter: its own process, drafting while the target verifies (engine/loops.py has
the target's side; engine/speccache.py what the draft spends each step on)."""

from __future__ import annotations

import time

from amusd_viz.engine.guess import Guesser
from amusd_viz.engine.lending import LEND_BELOW_ACCEPTANCE, LEND_VALUE
from amusd_viz.engine.loops import DraftBudget, Emit, Request, Step, _secs, draft_steps, sampler_for
from amusd_viz.engine.runner import Runner
from amusd_viz.engine.seq import common_prefix
from amusd_viz.engine.speccache import EXTEND, Planner
from amusd_viz.events import Rollback


def _adopt_committed(req: Request, seq: list[int], committed: list[int], shared,
                     emit: Emit) -> list[int]:
    """The draft's sequence after the target's latest commits: on a mismatch, drop its tokens
    from there (a rollback) and take the target's; past its drafts, adopt the target's."""
    n_prompt = len(req.prompt_ids)
    mismatch = next((i for i in range(n_prompt, min(len(seq), len(committed)))
                     if seq[i] != committed[i]), None)
    if mismatch is not None:
        emit(Rollback(t=_secs(req, time.perf_counter_ns()), to_pos=mismatch - n_prompt,
                      discarded=seq[mismatch:]))
        shared.publish_drafts(committed, n_prompt)
        return committed
    if len(committed) > len(seq):
        return seq + committed[len(seq):]  # the target decoded past our drafts: adopt
    return seq


class Turns:
    """How the draft shares its device with the target.

    One device (SharedState's baton): how far a turn drafts before it hands the device to
    the target, by sync's rule (loops.DraftBudget: one more draft while its chance of being
    accepted, per second of drafting, beats the pass's expected rate). Taking turns on one
    device is sync's schedule, so it gets sync's lookahead; the target's pass is timed from the
    hand-over to the turn coming back.

    Two CPU cores (SharedState.loan): a resting draft lends its core to the target's next pass
    (engine/lending.py), and takes it back before its own next pass. On a fresh verdict after
    resting, while most drafts are rejected, a step must be worth `LEND_VALUE` (the core would
    speed the target's whole pass), not just `speccache.MIN_VALUE`."""

    def __init__(self, adaptive: bool, loan=None) -> None:
        self.adaptive = adaptive
        self.loan = loan
        self.resting = False
        self.budget = DraftBudget()
        self.start = 0  # where this turn's drafts begin in the sequence
        self.drafts: list[Step] = []
        self.handed_at: float | None = None

    def worth_another(self) -> bool:
        return not self.adaptive or self.budget.one_more([d.conf for d in self.drafts])

    def drafted(self, position: int, step: Step) -> None:
        if not self.drafts:
            self.start = position
        self.drafts.append(step)
        self.budget.observe_draft(step.secs)

    def floor(self, acceptance: float) -> float | None:
        """The least value worth a step now (None: the Planner's own), given the run's recent
        per-check acceptance: lending pays only where most drafts are rejected."""
        lend = self.loan is not None and self.resting and acceptance < LEND_BELOW_ACCEPTANCE
        return LEND_VALUE if lend else None

    def idle(self, shared, seen: int) -> None:
        """Nothing worth drafting on the committed text of length `seen`: on one device, hand
        it to the target to verify what this turn drafted and wait for the turn to come back;
        on two, wait for news (on two CPU cores, lending the core meanwhile)."""
        if shared.one_device:
            self.handed_at = time.perf_counter()
            shared.pass_turn("target")
            shared.wait_turn("draft", stop=lambda: shared.run_done)
            return
        if self.loan is not None:
            self.loan.rest(seen)
        self.resting = True
        shared.wait_wakeup(0.5)

    def busy(self, shared) -> None:
        """Before a forward pass: the core back from the target's pass, if it was lent."""
        if self.loan is not None and self.resting:
            self.loan.take(stop=lambda: shared.run_done)
        self.resting = False

    def back(self, committed: list[int]) -> None:
        """The turn came back with the target's verdict on this turn's drafts in `committed`."""
        if self.handed_at is None:
            return
        accepted = common_prefix(committed[self.start:], [d.token for d in self.drafts])
        confs = [d.conf for d in self.drafts]
        self.budget.observe_verify(time.perf_counter() - self.handed_at, confs, accepted)
        self.drafts, self.handed_at = [], None


def _extend(req: Request, plan: Planner, seq: list[int], committed: list[int],
            first: bool, alts: bool, guesser: Guesser, max_ahead: int) -> list[int] | None:
    """One main-line draft pass (with a sibling bet beside it where one is worth a slot, and
    lookup guesses after it where the text repeats itself): the longer line, published; None
    when the drafter has nothing to propose."""
    n_prompt, shared = len(req.prompt_ids), plan.shared
    generated = len(seq) - n_prompt
    room = min(max_ahead - (len(seq) - len(committed)), req.max_new_tokens - generated) - 1
    line = list(seq)

    def publish(i: int, step: Step) -> None:
        """Each draft the moment it is chosen (not after the pass's later guessed steps: a draft
        that matched its guess would reach the target later, a selection by its own value)."""
        plan.info[generated + i] = step
        if step.q is not None:
            shared.write_q_row(generated + i, step.token, step.q)  # before the draft is visible
        if alts:  # the bets the target checks beside this draft in its pass
            shared.write_alts(len(line), step.others())
        line.append(step.token)
        shared.publish_drafts(line, n_prompt, step_s=step.secs)

    steps = draft_steps(req, plan.draft, seq, plan.sampler, plan.device, plan.emit, first=first,
                        sibling=plan.sibling_for(seq, committed), guesser=guesser, room=room,
                        on_step=publish)
    if not steps:
        return None
    plan.sampler.noise.forget_before(len(committed) - n_prompt)
    if steps[0].beside is not None:
        plan.add_sibling(seq, committed, steps[0].beside)
    return line


def amusd_draft_loop(req: Request, draft: Runner, device: str, shared, emit: Emit) -> int:
    """The drafter: keeps proposing from its own sequence; when the target commits a token that
    differs from its own at some position, it drops its tokens (and cache) from there, adopts
    the target's tokens and drafts on. Waits (blocking, no spinning) only when it is far enough
    ahead, at the token budget, after proposing EOS, or (adaptive) when no step is worth it.
    With the speculation cache it also drafts on branches that bet on the target's verdict
    (engine/speccache.py), and lookup guesses in its main-line passes (engine/guess.py). On a
    device shared with the target it drafts up to `lookahead` per turn (Turns) and then hands
    the device over (the baton). Returns the number of passes."""
    draft.begin()
    n_prompt = len(req.prompt_ids)
    seq = list(req.prompt_ids)
    max_ahead = req.lookahead if shared.one_device else req.max_ahead or 2 * req.lookahead
    sampler = sampler_for(req, draft)
    model_draft = getattr(draft, "model", None) is not None
    plan = Planner(req, draft, sampler, device, emit, shared,
                   cache=req.spec_cache and model_draft and not shared.one_device,
                   # a lookup costs nothing: resting would only mean fewer drafts
                   adaptive=req.adaptive and model_draft and not shared.one_device)
    turns = Turns(req.adaptive and model_draft and shared.one_device,
                  loan=shared.loan if plan.adaptive else None)
    alts = req.tree and model_draft and (plan.cache or shared.one_device)
    guesser = Guesser(req.lookup and model_draft)
    passes = 0

    shared.wait_turn("draft", stop=lambda: shared.run_done)  # one device: after the prefill
    while True:
        shared.clear_wakeup()
        committed, done = shared.read_committed(req.prompt_ids)
        if done:
            return passes
        turns.back(committed)
        plan.observe(seq, committed)
        seq = plan.settle(seq, committed)
        seq = _adopt_committed(req, seq, committed, shared, emit)
        generated = len(seq) - n_prompt
        can_extend = not (len(seq) - len(committed) >= max_ahead
                          or generated >= req.max_new_tokens
                          or (generated and seq[-1] in req.eos_ids))
        action = plan.choose(seq, committed, can_extend, floor=turns.floor(plan.calibration.acceptance))
        if action is EXTEND and not turns.worth_another():
            action = None  # one device: this turn's drafts are worth verifying now
        if action is None:
            turns.idle(shared, len(committed))
            continue
        turns.busy(shared)
        passes += 1
        if action is not EXTEND:
            plan.grow(action)
            continue
        longer = _extend(req, plan, seq, committed, passes == 1, alts, guesser, max_ahead)
        if longer is None:  # nothing to propose until the target commits more
            turns.idle(shared, len(committed))
            continue
        for at in range(len(seq), len(longer)):
            turns.drafted(at, plan.info[at - n_prompt])
        seq = longer
