"""Bet policies: what a target pass checks beside its drafts (a token tree, engine/tree.py), and
what the draft leaves for it. Called unconditionally by the loops; `NoBets` is the null version.

- `AltBets`: the draft's other likely tokens beside each draft (its runner-up first). sync
  passes them in-process; amusd's draft writes them into shared memory before publishing the
  draft (`offer`), and the target reads them back.
- `BranchBets`: those, and the speculation cache's branches that leave the line at one of its
  drafts (a bet and the drafts made after it: a hit commits them in the same pass).
"""

from __future__ import annotations

from amusd_viz.engine.shared import SharedState, prefix_hash, q_list
from amusd_viz.engine.tree import Bet, TreePath, bare_bets, within


class NoBets:
    def offer(self, index: int, step) -> None:
        """The draft's side: `step` (engine/passes.Step) is the draft at sequence index `index`."""

    def paths(self, committed: list[int], drafts: list[int], budget: int,
              others: list[list[int]] | None = None) -> list[TreePath]:
        """The target's side: the bets for a pass over committed + drafts, the likeliest within
        `budget` tokens. `others`: the draft's other likely tokens beside each draft, when the
        caller has them (sync); else read from shared memory."""
        return []


class AltBets(NoBets):
    def __init__(self, shared: SharedState | None = None) -> None:
        self.shared = shared

    def offer(self, index: int, step) -> None:
        if self.shared is not None:
            self.shared.write_alts(index, step.others())

    def paths(self, committed: list[int], drafts: list[int], budget: int,
              others: list[list[int]] | None = None) -> list[TreePath]:
        if budget <= 0 or not drafts:
            return []
        if others is None:
            assert self.shared is not None
            if not self.shared.draft_alive:
                return []
            others = self.shared.read_alts(len(committed), len(committed) + len(drafts))
        found = self._leaving(committed, drafts)
        taken = {(b.path.anchor, b.path.token) for b in found}
        return within([*found, *bare_bets(len(committed), drafts, others, taken)], budget)

    def _leaving(self, committed: list[int], drafts: list[int]) -> list[Bet]:
        return []


class BranchBets(AltBets):
    def __init__(self, shared: SharedState, n_prompt: int) -> None:
        super().__init__(shared)
        self.n_prompt = n_prompt

    def _leaving(self, committed: list[int], drafts: list[int]) -> list[Bet]:
        """The published branches that leave committed + drafts at one of the drafts (the
        target rejects that draft and picks the branch's token instead). The sibling branch of
        the last draft comes only with the draft's next step; its runner-up alone is a bet
        meanwhile."""
        assert self.shared is not None
        line, found = [*committed, *drafts], []
        for b in self.shared.branches():
            anchor = self.n_prompt + b.root
            if not len(committed) <= anchor < len(line) or line[anchor] == b.token:
                continue
            if prefix_hash(line[:anchor]) != b.prefix_hash:
                continue
            q_rows = q_list(b.q_rows, 0, len(b.drafts))
            found.append(Bet(0, TreePath(anchor, b.token, b.drafts, q_rows)))
        return found
