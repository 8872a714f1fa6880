"""Token trees: the bets a target pass checks beside its main line (`passes.Verifier.check`).

On a CPU a target pass of a dozen tokens costs about what one does (the weights are read once
per pass), so a pass can also check, at each draft it verifies, what the target might pick
instead: a *path* whose first token stands in place of that draft (the draft's runner-up, or a
branch's bet with the drafts made after it). Where the target rejects the draft and picks
exactly a path's token, the verdict goes on along that path in the same pass.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TreePath:
    """At sequence index `anchor`, `token` instead of the main line's draft, then `drafts`
    (with their q rows when sampling: the rejection rule judges them with it)."""

    anchor: int
    token: int
    drafts: list[int] = field(default_factory=list)
    q_rows: list = field(default_factory=list)


@dataclass(frozen=True)
class Bet:
    """A path before the budget: `rank` 0 for the likeliest alternative at its anchor."""

    rank: int
    path: TreePath


def bare_bets(first: int, drafts: list[int], others: list[list[int]],
              taken: Collection[tuple[int, int]] = ()) -> list[Bet]:
    """The draft's other likely tokens beside each draft (likeliest first; -1 for none) as
    one-token paths; the draft at `first + i` is drafts[i]. A hit still adds the target's own
    token after the bet."""
    return [Bet(rank, TreePath(first + i, alt))
            for i, row in enumerate(others) for rank, alt in enumerate(row)
            if alt >= 0 and alt != drafts[i] and (first + i, alt) not in taken]


def within(bets: list[Bet], budget: int) -> list[TreePath]:
    """The likeliest bets first, `budget` tokens in all (a path's token and its drafts; the
    last one's drafts cut to fit). An earlier draft is likelier to be the one rejected and a
    likelier alternative the target's pick there; at one anchor a path with drafts goes first."""
    order = sorted(bets, key=lambda b: (b.path.anchor + b.rank, b.path.anchor,
                                        not b.path.drafts))
    out = []
    for bet in order:
        if budget <= 0:
            break
        path = bet.path
        if len(path.drafts) > budget - 1:
            keep = budget - 1
            path = TreePath(path.anchor, path.token, path.drafts[:keep], path.q_rows[:keep])
        out.append(path)
        budget -= 1 + len(path.drafts)
    return out
