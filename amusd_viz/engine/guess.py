"""Lookup guesses for a draft model (staged drafting): where the text repeats an earlier stretch
of it, guess that the draft will go on as it went on there, and let the draft check the
guesses in the pass that drafts its next token (`passes.Drafter.steps`).

The draft still chooses every token itself, from its own logits at that position: a guess only
decides which prefix the pass also computes logits for. While the draft's choice equals the
guess, the next row is the draft's own next step, so one pass can draft several tokens (on a
CPU a pass of 2 tokens costs ~5% more than one, of 5 tokens ~30%). Lossless at no risk: the
drafts are the tokens step-by-step drafting would make (in float32; bf16 may round a near-tie
the other way in a longer pass), and the target checks them all.

Copying pays on edits and on text that quotes its prompt (docs/benchmarks.md: on the bundled
prompts a match of 2+ tokens predicted the next token 81% of the time on `edit`, 73% on `math`,
56% on `code`, and rarely existed on chat and prose). How many guesses a pass carries follows
how often guesses were right in this run.
"""

from __future__ import annotations

from amusd_viz.engine.estimate import Rate
from amusd_viz.engine.ngram import find_match
from amusd_viz.engine.seq import common_prefix

MIN_N, MAX_N = 2, 4  # a one-token match predicts the draft too rarely (7–14% on chat, prose)
MAX_GUESSES = 4
WORTH = 0.25  # guess once more while the chance that every guess so far holds is at least this


class Guesser:
    """Guesses for one run, and this run's record of them (a per-guess hit rate with a prior
    of 1/2 and a fading memory: estimate.Rate). Where a lookup found a match but
    the record said no guess was worth feeding, its first token is still compared with what the
    draft chose, so a run whose guesses failed early can learn that they hold again."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.record = Rate(1.0, 2.0)
        self.unfed: int | None = None  # the lookup's next token where none was fed

    @property
    def rate(self) -> float:
        return self.record.value

    def guesses(self, seq: list[int], room: int) -> list[int]:
        """Up to `room` tokens that followed the latest earlier occurrence of seq's tail."""
        self.unfed = None
        if not self.on or room <= 0:
            return []
        match = find_match(seq, MAX_N, MIN_N)
        if match is None:
            return []
        count = 0
        while count < min(room, MAX_GUESSES) and self.rate ** (count + 1) >= WORTH:
            count += 1
        if count == 0:
            self.unfed = seq[match.end]
        return seq[match.end:match.end + count]

    def observe(self, guesses: list[int], drafted: list[int]) -> None:
        """A pass fed `guesses` and the draft chose `drafted` there (in order): the guesses up
        to the first miss held, the ones after it were never checked."""
        if guesses:
            held = common_prefix(guesses, drafted)
            self._count(held, min(len(guesses), held + 1))
        elif self.unfed is not None and drafted:
            self._count(int(drafted[0] == self.unfed), 1)

    def _count(self, hits: int, checked: int) -> None:
        self.record.add(hits, checked)
