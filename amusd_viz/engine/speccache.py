"""amusd's speculation cache: drafts ready for the likeliest verdicts (after speculative
speculative decoding, Kumar, Dao and May 2026). `NoCache` is the null version.

A **branch** bets that the target rejects the draft at position i and commits the draft's
runner-up r there instead. It forks the draft's KV cache at i, feeds r and drafts on after it;
it is worth the chance the main line survives to i times the draft's probability of r (the
chance the target picks r, by the draft's reckoning), times the confidences of the branch's own
drafts so far (the draft's Planner, engine/planner.py, weighs it against its main line).
Besides, every main-line step bets on the draft's runner-up at
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
from typing import Protocol

from amusd_viz.engine.estimate import Calibration
from amusd_viz.engine.passes import Drafter, Step, proposal_event
from amusd_viz.engine.request import Request
from amusd_viz.engine.runner import Runner
from amusd_viz.engine.shared import BRANCH_DEPTH, BRANCH_SLOTS, SharedState, prefix_hash, q_list
from amusd_viz.events import BranchStep, CacheVerdict

MAX_BRANCHES = BRANCH_SLOTS  # each holds a copy of the draft's KV cache
MAX_DEPTH = min(4, BRANCH_DEPTH)  # drafts per branch: the draft drafts on after a hit anyway


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


class Planner(Protocol):
    """What the cache needs of the draft's Planner (engine/planner.py): its main line's steps
    and their calibration."""

    req: Request
    drafter: Drafter
    shared: SharedState
    n_prompt: int
    info: dict[int, Step]
    calibration: Calibration

    def survival(self, start: int, stop: int) -> float: ...


class NoCache:
    """The null speculation policy: no branches, nothing to hand over."""

    branches: list[Branch] = []

    def options(self, planner: Planner, first: int, end: int) -> list[tuple[float, object]]:
        return []

    def open_branch(self, planner: Planner, pos: int, step: Step, value: float,
                    seq: list[int]) -> Branch:
        """A new bet on `step`'s runner-up at `pos`, on a fork of the draft's KV cache."""
        raise AssertionError("no cache, no branches")

    def sibling_for(self, planner: Planner, seq: list[int], committed: list[int]) -> int | None:
        return None

    def add_sibling(self, planner: Planner, seq: list[int], committed: list[int],
                    step: Step) -> None:
        pass

    def grow(self, planner: Planner, branch: Branch) -> None:
        raise AssertionError("no cache, no branches")

    def observe_bet(self, step: Step, pick: int) -> None:
        pass

    def verdict(self, planner: Planner, seq: list[int], committed: list[int],
                at: int) -> Branch | None:
        """The target rejected the line at sequence index `at`: the branch that bet on its
        pick there (a hit), if any. A miss drops every branch."""
        return None

    def take(self, planner: Planner, hit: Branch) -> list[int]:
        """A hit: the branch becomes the main line; returns it."""
        raise AssertionError("no cache, no hits")

    def settled(self, committed: list[int], n_prompt: int) -> None:
        """No rejection: the bets on positions now committed lost."""

    def clear(self) -> None:
        pass

    def confirmed_drafts(self, committed: list[int], limit: int) -> tuple[list[int], list]:
        """The target's side: drafts of a branch whose bet the committed text has just
        confirmed (the draft has not rolled back yet), and (sampling) their q rows; ([], [])
        when none has."""
        return [], []


class BranchCache(NoCache):
    """Drafts ready for the likeliest rejections (see the module's docstring)."""

    def __init__(self, shared: SharedState, n_prompt: int, sibling_bets: bool) -> None:
        self.shared, self.n_prompt, self.sibling_bets = shared, n_prompt, sibling_bets
        self.branches: list[Branch] = []
        self.bet_calibration = Calibration()  # the runner-up's share vs the target's corrections

    def bet_value(self, planner: Planner, first: int, pos: int) -> float:
        """The chance the target rejects the draft at `pos` and picks its runner-up there: the
        line survives to `pos`, is rejected there, and the runner-up gets the target's pick
        (its share of the draft's remaining probability)."""
        step = planner.info[pos]
        share = self.bet_calibration.chance(_share(step))
        return (planner.survival(first, pos) * (1.0 - planner.calibration.chance(step.conf))
                * share)

    def options(self, planner: Planner, first: int, end: int) -> list[tuple[float, object]]:
        """The branches still growing, and a new bet at each position without one."""
        out: list[tuple[float, object]] = [(b.next_value(planner.calibration), b)
                                           for b in self.branches if len(b.steps) < MAX_DEPTH]
        if len(self.branches) >= MAX_BRANCHES:
            return out
        rooted = {b.root for b in self.branches}
        for pos in range(first, end):
            step = planner.info.get(pos)
            if step is None:
                break
            if pos not in rooted and step.alt != step.token:
                out.append((self.bet_value(planner, first, pos), (pos, step)))
        return out

    def open_branch(self, planner: Planner, pos: int, step: Step, value: float,
                    seq: list[int]) -> Branch:
        return self._new(planner, pos, step, value, seq, planner.drafter.draft.fork())

    def _new(self, planner: Planner, pos: int, step: Step, value: float, seq: list[int],
             runner: Runner | None) -> Branch:
        used = {b.slot for b in self.branches}
        slot = next(i for i in range(MAX_BRANCHES) if i not in used)
        branch = Branch(pos, step.alt, value, seq[:planner.n_prompt + pos], runner, slot)
        self.branches.append(branch)
        return branch

    def sibling_for(self, planner: Planner, seq: list[int], committed: list[int]) -> int | None:
        """The runner-up to feed beside seq's last token (a main-line draft the target has not
        judged), where no branch bets there yet and a slot is free or holds a likelier loss:
        that weaker bet is dropped here, so the sibling's branch has its slot after the pass."""
        pos = len(seq) - 1 - planner.n_prompt
        step = planner.info.get(pos)
        if (not self.sibling_bets or len(seq) <= len(committed) or step is None
                or step.token != seq[-1] or step.alt == step.token
                or any(b.root == pos for b in self.branches)):
            return None
        if len(self.branches) >= MAX_BRANCHES:
            value = self.bet_value(planner, len(committed) - planner.n_prompt, pos)
            weakest = min(self.branches, key=lambda b: b.value)
            if weakest.value >= value:
                return None
            self._drop([weakest])
        return step.alt

    def add_sibling(self, planner: Planner, seq: list[int], committed: list[int],
                    step: Step) -> None:
        """The branch a sibling pass drafted: one draft after the runner-up beside seq's last."""
        if len(self.branches) >= MAX_BRANCHES:
            return  # not reached: sibling_for made room and nothing ran since (a guard)
        pos = len(seq) - 1 - planner.n_prompt
        value = self.bet_value(planner, len(committed) - planner.n_prompt, pos)
        branch = self._new(planner, pos, planner.info[pos], value, seq, None)
        branch.steps.append(step)
        _publish(planner, branch, step, value, sibling=True)

    def grow(self, planner: Planner, branch: Branch) -> None:
        """One draft step on a branch."""
        if branch.runner is None:  # a sibling: its first draft came free with the main line's
            branch.runner = planner.drafter.draft.fork()
        value = branch.next_value(planner.calibration)
        step = planner.drafter.steps(branch.seq, phase="branch", runner=branch.runner)[0]
        branch.steps.append(step)
        _publish(planner, branch, step, value)

    def observe_bet(self, step: Step, pick: int) -> None:
        self.bet_calibration.observe([_share(step)], int(pick == step.alt))

    def _drop(self, branches: list[Branch]) -> None:
        gone = {id(b) for b in branches}
        for branch in branches:
            self.shared.clear_branch(branch.slot)
            if branch.runner is not None:
                branch.runner.release()  # a static line back to the pool
        self.branches = [b for b in self.branches if id(b) not in gone]

    def verdict(self, planner: Planner, seq: list[int], committed: list[int],
                at: int) -> Branch | None:
        root, token = at - planner.n_prompt, committed[at]
        hit = next((b for b in self.branches if b.root == root and b.token == token), None)
        wasted = sum(len(b.steps) for b in self.branches if b is not hit)
        planner.drafter.emit(CacheVerdict(
            t=planner.req.secs(time.perf_counter_ns()), pos=root, token_id=token,
            hit=hit is not None, handed=len(hit.steps) if hit else 0,
            branches=len(self.branches), wasted=wasted))
        if hit is None:
            self._drop(self.branches)
        return hit

    def take(self, planner: Planner, hit: Branch) -> list[int]:
        """The hit branch's drafts become main-line drafts: their q rows and bets written before
        the line is published (by the caller, before the branch leaves the table: no gap)."""
        d, now = planner.drafter, time.perf_counter_ns()
        if hit.runner is not None:  # else the next pass crops to the root and feeds the branch
            d.draft.adopt(hit.runner)
        for i, step in enumerate(hit.steps):
            pos = hit.root + 1 + i
            planner.info[pos] = step
            if step.q is not None:
                planner.shared.write_q_row(pos, step.token, step.q)
            planner.shared.write_alts(planner.n_prompt + pos, step.others())
            d.emit(proposal_event(planner.req, d.draft, step, pos, now, branch_root=hit.root))
        return hit.seq

    def settled(self, committed: list[int], n_prompt: int) -> None:
        self._drop([b for b in self.branches
                                  if n_prompt + b.root < len(committed)])

    def clear(self) -> None:
        self._drop(self.branches)


    def confirmed_drafts(self, committed: list[int], limit: int) -> tuple[list[int], list]:
        """Its prefix, then its token: the branch's drafts past the committed text."""
        if limit <= 0:
            return [], []
        n_prompt = self.n_prompt
        for b in self.shared.branches():
            cut = n_prompt + b.root
            if len(committed) <= cut or committed[cut] != b.token:
                continue
            line = [*committed[:cut + 1], *b.drafts]
            if line[:len(committed)] != committed or len(line) <= len(committed):
                continue
            if prefix_hash(committed[:cut]) != b.prefix_hash:
                continue
            first = len(committed) - (cut + 1)  # index of the first draft still to judge
            out = line[len(committed):len(committed) + limit]
            return out, q_list(b.q_rows, first, len(out))
        return [], []

def _publish(planner: Planner, branch: Branch, step: Step, value: float,
             sibling: bool = False) -> None:
    """Into the shared branch table, and onto the timeline."""
    planner.shared.publish_branch(branch.slot, prefix_hash(branch.prefix), branch.root,
                                  branch.token, [s.token for s in branch.steps], step.q)
    depth, d = len(branch.steps), planner.drafter
    d.emit(BranchStep(t=planner.req.secs(step.end_ns), root=branch.root,
                      root_token=branch.token, root_text=d.draft.text(branch.token),
                      pos=branch.root + depth, token_id=step.token, text=d.draft.text(step.token),
                      depth=depth, value=round(value, 4), sibling=sibling))
