"""The model-free drafter: prompt lookup (n-gram) drafting on the target's own token ids.

To propose, it finds the latest earlier occurrence of the text's last n tokens (n from N down
to 1) in the prompt and the text so far, and proposes what followed there; the next steps copy
on from the same place while the text keeps following it. No model, no tokenizer of its own.

It stands in for a draft `Runner` in the loops: `forward` returns a one-hot row of logits (a
deterministic drafter is a one-hot q: under the rejection rule a token x is accepted with
probability p(x), and a rejected one is corrected from p with x removed, renormalised; under
the coupled rule, acceptance is the same equality test as for a model draft), or None when the
text has no earlier occurrence to copy from.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from amusd_viz.engine.estimate import FLAT
from amusd_viz.engine.runner import HostRows

PLAN_TOKENS = 32  # how far one match is copied at most (the lookahead caps each pass)


@dataclass(frozen=True)
class Match:
    """The last n tokens also end at index `end` (exclusive) of the sequence: copy from there."""

    n: int
    end: int


def find_match(seq: list[int], max_n: int, min_n: int = 1) -> Match | None:
    """The latest earlier occurrence of seq's last n tokens, the longest n (up to max_n, at
    least min_n) first. One pass over seq, right to left."""
    last, cap = len(seq), min(max_n, len(seq) - 1)
    best: Match | None = None
    # the occurrence must end before the text does (something follows it)
    for end in range(last - 1, 0, -1):
        n = 0
        while n < cap and n < end and seq[end - 1 - n] == seq[last - 1 - n]:
            n += 1
        if n >= max(min_n, 1) and (best is None or n > best.n):
            best = Match(n, end)
            if n == cap:
                break
    return best


class NgramDrafter:
    """Prompt lookup with matches up to `max_n` tokens long, for a vocabulary of `vocab`."""

    phase_name = "lookup"  # its steps on the timeline: instant, no model pass
    cost = FLAT  # a lookup computes nothing

    def __init__(self, max_n: int, vocab: int, tokenizer=None, device: str = "cpu") -> None:
        self.max_n = max_n
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        # needs no device turn: it computes nothing there
        self.turn: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.ids: list[int] = []  # the Runner interface: what was looked at last
        self.read = HostRows([], [])  # and what the host read of the last lookup
        self.model = None
        self.last: Match | None = None  # the match behind the latest proposal (the inspector's)
        self._base: list[int] = []  # the text a plan was made for
        self._plan: list[int] = []  # the tokens that followed its match, in order
        self._plan_match: Match | None = None
        self._texts: dict[int, str] = {}

    def begin(self) -> None:
        self.ids, self._base, self._plan, self.last = [], [], [], None

    def set_preamble(self, ids: list[int]) -> None:  # nothing to cache
        pass

    def _next(self, seq: list[int]) -> int | None:
        """Continue the current plan while seq still follows it, else look up afresh."""
        k = len(seq) - len(self._base)
        if (self._plan_match and 0 < k < len(self._plan) and seq[:len(self._base)] == self._base
                and seq[len(self._base):] == self._plan[:k]):
            m = self._plan_match
            self.last = Match(m.n, m.end + k)
            return self._plan[k]
        match = find_match(seq, self.max_n)
        if match is None:
            self.last = None
            return None
        self._base, self._plan_match = list(seq), match
        self._plan = seq[match.end:match.end + PLAN_TOKENS]
        self.last = match
        return self._plan[0]

    def forward(self, seq: list[int], n_logits: int = 1, paths=(), tops: bool = True):
        """(one-hot logits [1, vocab] or None, 0 tokens fed, start_ns, end_ns); what the host
        reads of them in `read`, as a Runner's (its one candidate, whatever `tops` says)."""
        start = time.perf_counter_ns()
        token = self._next(list(seq))
        self.ids = list(seq)
        logits = None
        if token is not None:
            logits = torch.full((1, self.vocab), float("-inf"))
            logits[0, token] = 0.0
            self.read = HostRows([token], [self.top(logits[0])])
        return logits, 0, start, time.perf_counter_ns()

    def text(self, token_id: int) -> str:
        if token_id not in self._texts:
            self._texts[token_id] = (self.tokenizer.decode([token_id]) if self.tokenizer
                                     else str(token_id))
        return self._texts[token_id]

    def top(self, logits_row: torch.Tensor) -> list[dict]:
        """Its only candidate, certain."""
        token = int(logits_row.argmax())
        return [{"id": token, "text": self.text(token), "p": 1.0}]

    def top_of_probs(self, probs: torch.Tensor) -> list[dict]:
        return self.top(probs)


def load_ngram(spec_n: int, target_src: str, device: str, tokenizer=None) -> NgramDrafter:
    """The drafter for a target: its vocabulary width (the p rows it is checked against) and its
    tokenizer (to show the proposed tokens as text)."""
    from transformers import AutoConfig, AutoTokenizer

    vocab = int(AutoConfig.from_pretrained(target_src).vocab_size)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(target_src)
    return NgramDrafter(spec_n, vocab, tokenizer, device)
