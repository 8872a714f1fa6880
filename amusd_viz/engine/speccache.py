"""What amusd's draft does next, and its speculation cache: drafts ready for the likeliest
verdicts (after speculative speculative decoding, Kumar, Dao and May 2026).

While the target verifies, the draft can spend a step on one of:
- its **main line**: one more draft after its last one. Needed only if every draft before it is
  accepted: worth the chance of that, the product of the draft's own confidences (its
  probability of each token it proposed) from the committed text on;
- a **branch**: a bet that the target rejects the draft at position i and commits the draft's
  runner-up r there instead. A branch forks the draft's KV cache at i, feeds r and drafts on
  after it; worth the chance the main line survives to i times the draft's probability of r
  (the chance the target picks r, by the draft's reckoning), times the confidences of the
  branch's own drafts so far;
- **rest**, when nothing is worth at least `MIN_VALUE` (adaptive; on a CPU a draft step slows
  the target's pass on the other core through the shared memory bus).
It takes the most valuable. Besides, every main-line step bets on the draft's runner-up at
the position it feeds (a **sibling**, fed in the same pass under a tree attention mask, nearly
free on a CPU core): a branch one draft deep, grown further only if it becomes the most
valuable choice. Each branch is published in shared memory (SharedState's branch
table). When the target's verdict rejects a draft and commits exactly the token a branch bet on
(a **hit**), the target's next pass takes that branch's drafts straight from the table, without
waiting for the draft to notice and roll back: otherwise that pass would find no drafts (a solo
pass, one token for a whole pass). The draft then makes the branch its main line and drafts on.
Any other verdict drops the branches (a **miss**).

Lossless whatever the bets: only the target commits, and every cached draft is the draft's own
proposal on its own prefix (under sampling it keeps the q it was drawn from).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from amusd_viz.engine.loops import Calibration, Emit, Request, Step, draft_step, proposal_event
from amusd_viz.engine.runner import Runner
from amusd_viz.engine.sampling import Sampler
from amusd_viz.engine.shared import BRANCH_DEPTH, BRANCH_SLOTS, prefix_hash
from amusd_viz.events import BranchStep, CacheVerdict, Rollback

MIN_VALUE = 0.1  # adaptive: rest rather than compute a token needed with less than this chance
MAX_BRANCHES = BRANCH_SLOTS  # each holds a copy of the draft's KV cache
MAX_DEPTH = min(4, BRANCH_DEPTH)  # drafts per branch: the draft drafts on after a hit anyway

EXTEND = "extend"


def _share(step: Step) -> float:
    """The draft's chance that the target picks its runner-up, should it reject its token."""
    return min(1.0, step.alt_p / max(1e-9, 1.0 - step.conf))


@dataclass
class Branch:
    root: int  # generated position the bet is on
    token: int  # the token bet on there (the draft's runner-up)
    value: float  # the chance the target commits `token` at `root`, by the draft's reckoning
    prefix: list[int]  # prompt + generated tokens before `root` (the main line it forks)
    runner: Runner | None  # a fork of the draft's KV cache (a sibling gets one when it grows)
    slot: int  # its row in the shared branch table
    steps: list[Step] = field(default_factory=list)

    @property
    def seq(self) -> list[int]:
        return [*self.prefix, self.token, *(s.token for s in self.steps)]

    def next_value(self, calibration: Calibration) -> float:
        value = self.value
        for step in self.steps:
            value *= calibration.chance(step.conf)
        return value


class Planner:
    """The amusd draft's choices (see the module's docstring). `info` holds the step behind
    each main-line draft (by generated position): its confidence and runner-up."""

    def __init__(self, req: Request, draft: Runner, sampler: Sampler, device: str, emit: Emit,
                 shared, cache: bool, adaptive: bool) -> None:
        self.req, self.draft, self.sampler, self.device, self.emit = req, draft, sampler, device, emit
        self.shared = shared
        self.cache, self.adaptive = cache, adaptive
        self.n_prompt = len(req.prompt_ids)
        self.info: dict[int, Step] = {}
        self.branches: list[Branch] = []
        self.calibration = Calibration()  # the draft's confidence vs acceptance
        self.bet_calibration = Calibration()  # its runner-up's share vs the target's corrections
        self._judged = 0  # generated positions whose verdict the calibration has seen

    # choosing ------------------------------------------------------------------------------------
    def survival(self, start: int, stop: int) -> float:
        """The chance that the main line's drafts at generated positions [start, stop) are all
        accepted, by the draft's own confidence."""
        p = 1.0
        for pos in range(start, stop):
            step = self.info.get(pos)
            p *= self.calibration.chance(step.conf) if step is not None else 1.0
        return p

    def bet_value(self, first: int, pos: int) -> float:
        """The chance the target rejects the draft at `pos` and picks its runner-up there: the
        line survives to `pos`, is rejected there, and the runner-up gets the target's pick
        (its share of the draft's remaining probability)."""
        step = self.info[pos]
        share = self.bet_calibration.chance(_share(step))
        return self.survival(first, pos) * (1.0 - self.calibration.chance(step.conf)) * share

    def choose(self, seq: list[int], committed: list[int], can_extend: bool,
               floor: float | None = None):
        """EXTEND, a Branch to grow (new ones are created here), or None to rest (adaptive:
        when nothing is worth `floor`, by default MIN_VALUE)."""
        first, end = len(committed) - self.n_prompt, len(seq) - self.n_prompt
        options: list[tuple[float, object]] = []
        if can_extend:
            value = self.survival(first, end) if self.adaptive or self.cache else 1.0
            options.append((value, EXTEND))
        if self.cache:
            options += [(b.next_value(self.calibration), b) for b in self.branches
                        if len(b.steps) < MAX_DEPTH]
            rooted = {b.root for b in self.branches}
            if len(self.branches) < MAX_BRANCHES:
                for pos in range(first, end):
                    step = self.info.get(pos)
                    if step is None:
                        break
                    if pos not in rooted and step.alt != step.token:
                        options.append((self.bet_value(first, pos), (pos, step)))
        if not options:
            return None
        value, best = max(options, key=lambda o: o[0])
        if self.adaptive and value < (MIN_VALUE if floor is None else floor):
            return None
        if isinstance(best, tuple):  # a new branch at this position
            pos, step = best
            best = self._new_branch(pos, step.alt, value, seq, self.draft.fork())
        return best

    def _new_branch(self, pos: int, token: int, value: float, seq: list[int],
                    runner: Runner | None) -> Branch:
        used = {b.slot for b in self.branches}
        slot = next(i for i in range(MAX_BRANCHES) if i not in used)
        branch = Branch(pos, token, value, seq[:self.n_prompt + pos], runner, slot)
        self.branches.append(branch)
        return branch

    def sibling_for(self, seq: list[int], committed: list[int]) -> int | None:
        """The runner-up to feed beside seq's last token (a main-line draft the target has not
        judged), where no branch bets there yet and a slot is free or holds a likelier loss:
        that weaker bet is dropped here, so the sibling's branch has its slot after the pass."""
        pos = len(seq) - 1 - self.n_prompt
        step = self.info.get(pos)
        if (not self.cache or not self.req.siblings or len(seq) <= len(committed) or step is None
                or step.token != seq[-1] or step.alt == step.token
                or any(b.root == pos for b in self.branches)):
            return None
        if len(self.branches) >= MAX_BRANCHES:
            value = self.bet_value(len(committed) - self.n_prompt, pos)
            weakest = min(self.branches, key=lambda b: b.value)
            if weakest.value >= value:
                return None
            self._drop([weakest])
        return step.alt

    def add_sibling(self, seq: list[int], committed: list[int], step: Step) -> None:
        """The branch a sibling pass drafted: one draft after the runner-up beside seq's last."""
        if len(self.branches) >= MAX_BRANCHES:
            return  # not reached: sibling_for made room and nothing ran since (a guard)
        pos = len(seq) - 1 - self.n_prompt
        value = self.bet_value(len(committed) - self.n_prompt, pos)
        branch = self._new_branch(pos, self.info[pos].alt, value, seq, None)
        branch.steps.append(step)
        self._publish(branch, step, value, sibling=True)

    def _drop(self, branches: list[Branch]) -> None:
        gone = {id(b) for b in branches}
        for branch in branches:
            self.shared.clear_branch(branch.slot)
        self.branches = [b for b in self.branches if id(b) not in gone]

    def grow(self, branch: Branch) -> None:
        """One draft step on a branch."""
        if branch.runner is None:  # a sibling: its first draft came free with the main line's
            branch.runner = self.draft.fork()
        value = branch.next_value(self.calibration)
        step = draft_step(self.req, branch.runner, branch.seq, self.sampler, self.device,
                          self.emit, first=False, phase="branch")
        assert step is not None  # branches only for model drafts
        branch.steps.append(step)
        self._publish(branch, step, value)

    def _publish(self, branch: Branch, step: Step, value: float, sibling: bool = False) -> None:
        """Into the shared branch table, and onto the timeline."""
        self.shared.publish_branch(branch.slot, prefix_hash(branch.prefix), branch.root,
                                   branch.token, [s.token for s in branch.steps], step.q)
        depth = len(branch.steps)
        self.emit(BranchStep(t=(step.end_ns - self.req.t0_ns) / 1e9, root=branch.root,
                             root_token=branch.token, root_text=self.draft.text(branch.token),
                             pos=branch.root + depth, token_id=step.token,
                             text=self.draft.text(step.token), depth=depth,
                             value=round(value, 4), sibling=sibling))

    # the verdict ---------------------------------------------------------------------------------
    def observe(self, seq: list[int], committed: list[int]) -> None:
        """Calibrate on the main-line drafts the target has judged since the last look: those
        it committed as they were, then the first it did not."""
        n = self.n_prompt
        start, stop = max(self._judged, 0), min(len(seq), len(committed)) - n
        confs, accepted = [], 0
        for pos in range(start, stop):
            step = self.info.get(pos)
            if step is None or step.token != seq[n + pos]:
                continue  # not a draft of this line (adopted from the committed text)
            confs.append(step.conf)
            if committed[n + pos] != step.token:
                self.bet_calibration.observe([_share(step)], int(committed[n + pos] == step.alt))
                break
            accepted += 1
        if confs:
            self.calibration.observe(confs, accepted)
        self._judged = max(self._judged, len(committed) - n)

    def settle(self, seq: list[int], committed: list[int]) -> list[int]:
        """The target committed more. At a rejection of the main line, a branch that bet on
        the target's token becomes the main line (published at once); every other branch
        whose bet is decided is dropped. Returns the draft's sequence."""
        if not self.cache:
            return seq
        n = self.n_prompt
        mismatch = next((i for i in range(n, min(len(seq), len(committed)))
                         if seq[i] != committed[i]), None)
        if mismatch is None:  # no rejection: bets on positions now committed lost
            self._drop([b for b in self.branches if n + b.root < len(committed)])
            return seq
        root, token = mismatch - n, committed[mismatch]
        hit = next((b for b in self.branches if b.root == root and b.token == token), None)
        wasted = sum(len(b.steps) for b in self.branches if b is not hit)
        self.emit(CacheVerdict(t=(time.perf_counter_ns() - self.req.t0_ns) / 1e9, pos=root,
                               token_id=token, hit=hit is not None,
                               handed=len(hit.steps) if hit else 0,
                               branches=len(self.branches), wasted=wasted))
        if hit is None:
            self._drop(self.branches)
            return seq  # the usual rollback follows
        now = time.perf_counter_ns()
        self.emit(Rollback(t=(now - self.req.t0_ns) / 1e9, to_pos=root,
                           discarded=seq[mismatch:]))
        if hit.runner is not None:  # else the next pass crops to the root and feeds the branch
            self.draft.adopt(hit.runner)
        for i, step in enumerate(hit.steps):
            pos = root + 1 + i
            self.info[pos] = step
            if step.q is not None:
                self.shared.write_q_row(pos, step.token, step.q)  # before the draft is visible
            self.shared.write_alts(n + pos, step.others())
            self.emit(proposal_event(self.req, self.draft, step, pos, now, branch_root=root))
        new = hit.seq
        self.shared.publish_drafts(new, n)  # before the branch leaves the table: no gap between
        self._drop(self.branches)
        return new
