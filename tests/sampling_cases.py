"""Shared by the distribution tests (test_sampling.py, test_ngram.py): the target's exact
distribution of the first tokens by enumeration, many seeded runs of the loops in this process,
and the total-variation bound a correct sampler stays under (Bretagnolle-Huber-Carol:
P(sum |p_hat - p| >= l) <= 2^K exp(-N l^2 / 2) for K outcomes, at a failure probability of
1e-6)."""

from __future__ import annotations

import math
from collections import Counter

import torch

from amusd_viz.config import SamplingParams
from amusd_viz.engine import sampling
from amusd_viz.engine.loops import sync_loop
from amusd_viz.engine.request import Request
from amusd_viz.engine.sampling import gumbel_argmax, processed

FAILURE_PROBABILITY = 1e-6
PROMPT = [11, 12, 13]
TOKENS = 3  # the first three generated tokens: the rule decides the second
PARAMS = dict(temperature=1.0, top_p=1.0, top_k=3)
DRAWS = 20000
# Mutations far off the target's distribution are caught with fewer runs: "always accept" and a
# tree pass going on along the wrong path measured a total variation of 0.94 and 0.58 at 4,000
# runs, against a bound of 0.09 at 2,000. A subtle one (the correction drawn from p: 0.064 at
# 4,000) keeps DRAWS, as do the tests that a correct rule passes.
MUTATION_DRAWS = 2000

__all__ = ["sampling"]


def tv_bound(outcomes: int, draws: int = DRAWS) -> float:
    """Total variation that a correct sampler exceeds with probability < 1e-6."""
    l1 = math.sqrt(2 * (outcomes * math.log(2) + math.log(1 / FAILURE_PROBABILITY)) / draws)
    return l1 / 2


def tv(counts: Counter, exact: dict, draws: int = DRAWS) -> float:
    keys = set(counts) | set(exact)
    return 0.5 * sum(abs(counts.get(k, 0) / draws - exact.get(k, 0.0)) for k in keys)


def load_target(tiny_models):
    from amusd_viz.engine.loading import load_model

    torch.set_num_threads(1)
    return Memo(load_model(str(tiny_models["target"]), "float32", "cpu", pack=False))


def exact_distribution(target, prompt=PROMPT) -> dict[tuple[int, ...], float]:
    """The target's own distribution of the first TOKENS tokens, by enumeration."""
    params = SamplingParams(**PARAMS)
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(TOKENS):
        grown = {}
        for head, mass in out.items():
            target.begin()
            logits, *_ = target.forward(list(prompt) + list(head), 1)
            p = processed(logits[0], params)
            for token in torch.nonzero(p).flatten().tolist():
                grown[(*head, token)] = mass * float(p[token])
        out = grown
    return out


def request(seed: int, rule: str, prompt=PROMPT) -> Request:
    return Request(list(prompt), TOKENS, 2, frozenset(), 0,
                   sampling=SamplingParams(**PARAMS, seed=seed, acceptance=rule))


def run_sync(target, draft, seed: int, rule: str, prompt=PROMPT) -> tuple[int, ...]:
    return tuple(sync_loop(request(seed, rule, prompt), target, draft, ("cpu", "cpu"),
                           lambda e: None).token_ids)


class Memo:
    """A model runner whose passes are looked up by what they see. A model's logits for a
    sequence are the same in every run, and recomputing them took four fifths of these tests'
    time (20,000 runs of a few passes each over a few hundred distinct sequences). A miss is a
    fresh pass over the whole sequence; everything the rule under test does runs as it would."""

    def __init__(self, runner) -> None:
        self.runner, self.passes = runner, {}

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def forward(self, seq, n_logits=1, paths=(), tops=True):
        key = (tuple(seq), n_logits, tuple((anchor, tuple(tokens)) for anchor, tokens in paths),
               tops)
        if key not in self.passes:
            self.runner.reset()
            self.passes[key] = self.runner.forward(seq, n_logits, paths, tops), self.runner.read
        out, self.read = self.passes[key]  # what the host read of that pass, as Runner.read
        return out


class CountingTarget:
    """The target runner, counting the passes that verified drafts."""

    def __init__(self, runner) -> None:
        self.runner, self.verified = runner, 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def forward(self, seq, n_logits=1, **tree):
        self.verified += n_logits > 1
        return self.runner.forward(seq, n_logits, **tree)


def empirical(run, draws: int = DRAWS) -> Counter:
    return Counter(run(seed) for seed in range(draws))


def residual_from_p(self, p, q, x, pos):
    """A broken correction: drawn from p, not from the residual max(0, p - q)."""
    return gumbel_argmax(p, self.noise.gumbel(pos, sampling.RESIDUAL))
