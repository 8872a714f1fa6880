"""The algorithms, side by side: `ar`, `sync`, and AMUSD's two loops (McDanel 2024).

- `ar_loop`: the target alone, one token per pass.
- `sync_loop`: draft up to k tokens, then verify them in one target pass (one process).
- `amusd_target_loop` and `amusd_draft_loop`: two processes at once. The draft keeps proposing
  on its own line and publishes each draft the moment it is chosen; the target verifies
  whatever drafts extend the committed text and publishes its verdict; on a mismatch the draft
  rolls back (`adopt`) and drafts on. They meet only in shared memory (engine/shared.py).

Every committed token is the target's own choice (engine/passes.Verifier), so the output is the
target's own decoding whatever the drafts were. The speed policies (draft length, bets,
speculation cache, schedule) come from the run's plan (engine/plan.py, engine/policies.py);
each has a null version, so the loops call them all, always.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from amusd_viz.engine.guess import Guesser
from amusd_viz.engine.length import FixedLength
from amusd_viz.engine.passes import TREE_TOKENS, Drafter, Emit, Step, Verifier, rollback_event, sampler_for
from amusd_viz.engine.planner import EXTEND, Planner
from amusd_viz.engine.policies import bets_policy, cache_policy, length_policy
from amusd_viz.engine.request import Outcome, Request
from amusd_viz.engine.runner import Runner
from amusd_viz.engine.schedule import Concurrent
from amusd_viz.engine.seq import common_prefix, first_difference
from amusd_viz.engine.shared import SharedState


def ar_loop(req: Request, target: Runner, device: str, emit: Emit) -> Outcome:
    target.begin()
    v = Verifier(req, target, device, emit)
    phase = "prefill"
    while not v.c.done:
        v.first_token(phase)
        phase = "decode"
    return v.c.outcome


def sync_loop(req: Request, target: Runner, draft: Runner, devices: tuple[str, str],
              emit: Emit) -> Outcome:
    """Classic speculative decoding: the two models take turns in one process, on one device
    or each on its own (`devices`: the target's, the draft's; the paper's baseline)."""
    target.begin()
    draft.begin()
    v = Verifier(req, target, devices[0], emit)
    d = Drafter(req, draft, v.sampler, devices[1], emit, Guesser(req.plan.guesses))
    length = length_policy(req.plan, target.cost, draft.cost)
    bets = bets_policy(req.plan, cost=target.cost)
    v.first_token()
    while not v.c.done:
        line = draft_line(d, length, v.c.seq, min(req.lookahead, v.c.remaining - 1))
        start_pos, started = v.c.n_new, time.perf_counter()
        paths = bets.paths(v.c.seq, line.tokens, TREE_TOKENS - len(line.tokens) - 1, line.others)
        accepted = v.check(line.tokens, line.q_rows, paths, stopped=line.stopped)
        length.observe_verify(time.perf_counter() - started, line.confs, accepted)
        if accepted < len(line.tokens):  # the draft's cache drops these on its next pass
            emit(rollback_event(req, start_pos + accepted, line.tokens[accepted:]))
    return v.c.outcome


@dataclass
class Line:
    """sync's drafts for one pass, with what the verifier and the policies need of them."""

    tokens: list[int] = field(default_factory=list)
    q_rows: list = field(default_factory=list)
    confs: list[float] = field(default_factory=list)
    others: list[list[int]] = field(default_factory=list)
    stopped: str | None = None  # "confidence": the length policy ended it

    def add(self, step: Step) -> None:
        self.tokens.append(step.token)
        self.q_rows.append(step.q)
        self.confs.append(step.conf)
        self.others.append(step.others())


def draft_line(d: Drafter, length: FixedLength, seq: list[int], limit: int) -> Line:
    """Draft up to `limit` tokens after `seq`, while the length policy says one more pays."""
    line = Line()
    while len(line.tokens) < limit:
        if not length.one_more(line.confs, len(seq) - common_prefix(d.draft.ids, seq)):
            line.stopped = "confidence"
            break
        steps = d.steps(seq + line.tokens, room=limit - len(line.tokens) - 1)
        if not steps:
            break
        for step in steps:
            length.observe_draft(step.secs)
            line.add(step)
        if line.tokens[-1] in d.req.eos_ids:
            break
    return line


def amusd_target_loop(req: Request, target: Runner, device: str, shared: SharedState,
                      schedule: Concurrent, emit: Emit) -> Outcome:
    """The verifier: each pass checks whatever drafts extend the committed text (up to the
    lookahead), with the bets beside them; with none, it decodes one token on its own. It never
    waits for drafts."""
    target.begin()
    v = Verifier(req, target, device, emit)
    cache = cache_policy(req.plan, shared, req.n_prompt)
    bets = bets_policy(req.plan, shared, req.n_prompt, target.cost)
    schedule.target_turn()  # one device: the target's prefill goes first
    # a draft that will rest from the start (extra tokens dear: planner.py) lends its core now
    with schedule.target_pass(len(v.c.seq), expect_rest=req.plan.rests and target.cost.dear) as lent:
        v.first_token(lent=lent)
    while True:
        shared.publish_committed(v.c.seq, req.n_prompt, done=v.c.done)
        schedule.hand_to_draft()
        if v.c.done:
            return v.c.outcome
        schedule.target_turn()
        limit = min(req.lookahead, v.c.remaining - 1)
        drafts, q_rows, cached = visible_drafts(v, shared, cache, limit)
        paths = bets.paths(v.c.seq, drafts, TREE_TOKENS - len(drafts) - 1)
        with schedule.target_pass(len(v.c.seq)) as lent:
            v.check(drafts, q_rows, paths, cached=cached, lent=lent)


def visible_drafts(v: Verifier, shared: SharedState, cache, limit: int):
    """(drafts, their q rows when sampling, whether they came from the cache): the drafts that
    extend the committed text, or, where the draft has not rolled back yet, those of a branch
    that bet on the verdict just reached."""
    drafts = shared.read_drafts(v.c.seq, v.req.n_prompt, limit)
    if not drafts:
        drafts, q_rows = cache.confirmed_drafts(v.c.seq, limit)
        return drafts, q_rows, bool(drafts)
    if v.sampler.params.greedy:
        return drafts, [], False
    q_rows = shared.read_q_rows(v.c.n_new, drafts)  # a row a rollback overwrote ends them there
    return drafts[:len(q_rows)], q_rows, False


def amusd_draft_loop(req: Request, draft: Runner, device: str, shared: SharedState,
                     schedule: Concurrent, emit: Emit) -> int:
    """The drafter: proposes from its own line, rolls back (`adopt`) where the target committed
    another token, and grows the speculation cache's branches between main-line steps. It waits
    (no spinning) when far enough ahead, at the token budget, after proposing EOS, when no step
    is worth it (the Planner; one device: its turn's end), or all run where tokens are dear."""
    draft.begin()
    d = Drafter(req, draft, sampler_for(req, draft), device, emit, Guesser(req.plan.guesses))
    planner = Planner(req, d, shared, cache_policy(req.plan, shared, req.n_prompt),
                      rests=req.plan.rests, cost=req.target_cost)
    bets = bets_policy(req.plan, shared, req.n_prompt)
    schedule.begin_run(length_policy(req.plan, req.target_cost))
    seq, passes = list(req.prompt_ids), 0
    if planner.for_good:  # extra tokens dear: it rests all run, its core lent to every pass
        schedule.rest_for_good()
        return passes
    schedule.draft_turn()  # one device: after the target's prefill
    while True:
        shared.clear_wakeup()
        committed, done = shared.read_committed(req.prompt_ids)
        if done:
            return passes
        schedule.back(committed)
        planner.observe(seq, committed)
        seq = adopt(req, seq, committed, planner, shared, emit)
        action = next_action(req, planner, schedule, seq, committed)
        if action is not None:
            schedule.busy()
            passes += 1
        if action is EXTEND:
            longer = extend(req, planner, bets, seq, committed)
            if longer is not None:
                for at in range(len(seq), len(longer)):
                    schedule.drafted(at, planner.info[at - req.n_prompt])
                seq = longer
                continue
        elif action is not None:
            planner.cache.grow(planner, action)
            continue
        schedule.idle(len(committed))  # nothing worth drafting until the target commits more


def adopt(req: Request, seq: list[int], committed: list[int], planner: Planner,
          shared: SharedState, emit: Emit) -> list[int]:
    """The draft's line after the target's latest commits: the one rollback path. On a
    mismatch the draft drops its tokens from there; a branch that bet on the target's pick
    there becomes its line (a cache hit: drafts ready at once), else the committed text does.
    Past its drafts, it adopts the target's tokens."""
    n, cache = req.n_prompt, planner.cache
    at = first_difference(seq, committed, n)
    if at is None:
        cache.settled(committed, n)
    consult = True
    while at is not None:
        hit = cache.verdict(planner, seq, committed, at) if consult else None
        consult = False
        emit(rollback_event(req, at - n, seq[at:]))
        seq = cache.take(planner, hit) if hit is not None else committed
        shared.publish_drafts(seq, n)  # a hit: before its branch leaves the table (no gap)
        cache.clear()
        at = first_difference(seq, committed, n)
    return seq + committed[len(seq):]


def next_action(req: Request, planner: Planner, schedule: Concurrent, seq: list[int],
                committed: list[int]):
    """EXTEND, a branch to grow, or None to rest."""
    generated = len(seq) - req.n_prompt
    can_extend = not (len(seq) - len(committed) >= req.draft_ahead
                      or generated >= req.max_new_tokens
                      or (generated and seq[-1] in req.eos_ids))
    floor = schedule.floor(planner.calibration.acceptance)
    action = planner.choose(seq, committed, can_extend, floor=floor)
    if action is EXTEND and not schedule.worth_another():
        return None  # one device: this turn's drafts are worth verifying now
    return action


def extend(req: Request, planner: Planner, bets, seq: list[int],
           committed: list[int]) -> list[int] | None:
    """One main-line draft pass (with a sibling bet beside it where one is worth a slot, and
    lookup guesses after it where the text repeats itself): the longer line, each draft
    published the moment it is chosen; None when the drafter has nothing to propose."""
    shared, n = planner.shared, req.n_prompt
    generated = len(seq) - n
    room = min(req.draft_ahead - (len(seq) - len(committed)), req.max_new_tokens - generated) - 1
    line = list(seq)

    def publish(i: int, step: Step) -> None:
        """Not after the pass's later guessed steps: a draft that matched its guess would
        reach the target later, a selection by its own value."""
        planner.info[generated + i] = step
        if step.q is not None:
            shared.write_q_row(generated + i, step.token, step.q)  # before the draft is visible
        bets.offer(len(line), step)
        line.append(step.token)
        shared.publish_drafts(line, n)

    sibling = planner.cache.sibling_for(planner, seq, committed)
    steps = planner.drafter.steps(seq, sibling=sibling, room=room, on_step=publish)
    if not steps:
        return None
    planner.drafter.sampler.noise.forget_before(len(committed) - n)
    if steps[0].beside is not None:
        planner.cache.add_sibling(planner, seq, committed, steps[0].beside)
    return line
