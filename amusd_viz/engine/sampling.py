"""Lossless sampling: the processed distributions, seeded noise per position, and the two
verification rules (docs/protocol.md, "Sampling").

- greedy (temperature 0): argmax of the logits, exactly the greedy path.
- coupled (drafter-invariant, Daliri, Musco and Suresh 2024): one Gumbel vector g per position,
  drawn from (seed, position). The target's token is argmax(log p + g); the draft proposes
  argmax(log q + g) with the same g; verification is equality. The output is the target's own
  seeded sample whatever the draft and the timing.
- rejection (Leviathan et al. 2023, Chen et al. 2023): the draft samples x ~ q (its own noise
  stream); the target accepts x with probability min(1, p(x)/q(x)), and at the first rejection
  draws from the residual max(0, p - q), normalised; after a full match, a bonus from p.

p and q are the distributions after temperature, top-k and top-p (`processed`). Noise comes
from torch generators seeded by (seed, position, stream) and is drawn once per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from amusd_viz.config import GREEDY, MAX_SEED, SamplingParams

__all__ = ["GREEDY", "MisalignedDraft", "Sampler", "SamplingParams", "Verdict", "processed"]

# Independent noise streams per position: the target's own choice (shared with a coupled draft),
# a rejection-rule draft's proposal, the acceptance draw, and the residual draw.
TARGET, DRAFT, ACCEPT, RESIDUAL = range(4)
_MIX = 0x9E3779B97F4A7C15  # a 64-bit odd constant (golden ratio) spreads seeds apart
_MASK = (1 << 63) - 1


def processed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, then top-k, then top-p (rows of a [n, vocab] tensor, or
    one row). Top-p keeps the smallest head of the sorted distribution whose mass reaches p."""
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ahead of each one
        drop = before >= params.top_p
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.softmax(x, dim=-1)


def gumbel_argmax(probs: torch.Tensor, g: torch.Tensor) -> int:
    """argmax(log probs + g): a sample from `probs` when g is standard Gumbel noise."""
    return int(torch.argmax(torch.log(probs.double()) + g))


@dataclass
class Noise:
    """Seeded noise, one draw per (position, stream), cached while the positions are live."""

    seed: int
    vocab: int
    _gumbel: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= MAX_SEED:  # torch keeps 32 bits: a larger seed repeats a smaller
            raise ValueError(f"seed {self.seed} is not between 0 and {MAX_SEED}")

    def _generator(self, pos: int, stream: int) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(((self.seed * _MIX) ^ (pos * 0x100000001B3 + stream * 0x51ED27)) & _MASK)
        return gen

    def gumbel(self, pos: int, stream: int) -> torch.Tensor:
        key = (pos, stream)
        if key not in self._gumbel:
            u = torch.rand(self.vocab, generator=self._generator(pos, stream), dtype=torch.float64)
            u = u.clamp_(min=torch.finfo(torch.float64).tiny)
            self._gumbel[key] = -torch.log(-torch.log(u))
        return self._gumbel[key]

    def uniform(self, pos: int, stream: int) -> float:
        return float(torch.rand(1, generator=self._generator(pos, stream), dtype=torch.float64))

    def forget_before(self, pos: int) -> None:
        """Committed positions never come back: drop their noise (151k doubles a position)."""
        for key in [k for k in self._gumbel if k[0] < pos]:
            del self._gumbel[key]


class MisalignedDraft(RuntimeError):
    """A draft reached the verifier without the q row it was drawn from. Every drafter gives
    one (the n-gram drafter a one-hot row, by construction): a missing row, or one that gives
    the draft's own token no probability, belongs to another proposal, and judging the draft
    against it would bias the output. An engine bug, never a user's error."""


@dataclass(frozen=True)
class Check:
    """One draft token under verification: why it was accepted or not."""

    p: float  # the target's probability of the draft token
    q: float  # the draft's probability of it
    accept_prob: float  # min(1, p/q): the rejection rule's acceptance probability
    u: float | None  # the rejection rule's draw (accepted when u < accept_prob)
    overlap: float | None  # sum(min(p, q)) over the vocabulary: the rule's expected acceptance


@dataclass
class Verdict:
    accepted: int
    tokens: list[int]  # accepted drafts, then the target's own token
    hows: list[str]
    checks: list[Check]
    probs: torch.Tensor | None = None  # sampling: p at each position of the pass


def _pad(row: torch.Tensor, vocab: int) -> torch.Tensor:
    if row.shape[-1] == vocab:
        return row
    out = torch.zeros(vocab, dtype=row.dtype)
    n = min(vocab, row.shape[-1])
    out[:n] = row[:n]
    return out


class Sampler:
    """One worker's choices for one run: its own token at a position, a draft proposal, and
    the verdict on a list of drafts. Greedy parameters give the plain argmax path."""

    def __init__(self, params: SamplingParams, vocab: int) -> None:
        self.params = params
        self.noise = Noise(params.seed, vocab)
        self.vocab = vocab

    def own(self, logits_row: torch.Tensor, pos: int,
            argmax: int | None = None) -> tuple[int, torch.Tensor | None]:
        """The target's token at `pos` (and its processed distribution when sampling).
        `argmax`: the row's, where the host has already read it (Runner.read)."""
        if self.params.greedy:
            return int(logits_row.argmax()) if argmax is None else argmax, None
        # a one-row batch: the same processing as a verify pass's rows (the logits themselves
        # may differ in the last bits between pass shapes: docs/protocol.md, "Sampling")
        p = _pad(processed(logits_row.cpu()[None], self.params)[0], self.vocab)
        return self._pick(p, pos), p

    def _pick(self, p: torch.Tensor, pos: int) -> int:
        return gumbel_argmax(p, self.noise.gumbel(pos, TARGET))

    def propose(self, logits_row: torch.Tensor,
                pos: int) -> tuple[int, float | None, torch.Tensor | None]:
        """The draft's token at `pos`, its probability q(x), and q. Greedy: the argmax, with
        q(x) and q left to the caller (its top-5 already holds q(x))."""
        if self.params.greedy:
            return int(logits_row.argmax()), None, None
        q = _pad(processed(logits_row.cpu()[None], self.params)[0], self.vocab)
        stream = TARGET if self.params.acceptance == "coupled" else DRAFT
        token = gumbel_argmax(q, self.noise.gumbel(pos, stream))
        return token, float(q[token]), q

    def runner_up(self, token: int, pos: int, q: torch.Tensor | None,
                  top: list[dict]) -> tuple[int, float]:
        """The draft's guess at the target's token at `pos` should the target reject `token`,
        and the draft's probability of that guess. Greedy: the draft's second choice; coupled:
        its second choice under the noise the target will use there; rejection: the likeliest
        other token under the residual draw's noise. Only a guess: the target decides."""
        if q is None:  # greedy: the top-5 has it
            second = next((c for c in top if c["id"] != token), None)
            return (int(second["id"]), float(second["p"])) if second else (token, 0.0)
        stream = TARGET if self.params.acceptance == "coupled" else RESIDUAL
        scores = torch.log(q.double()) + self.noise.gumbel(pos, stream)
        scores[token] = float("-inf")
        alt = int(torch.argmax(scores))
        return alt, float(q[alt])

    def verdict(self, logits: torch.Tensor, drafts: list[int], start_pos: int,
                q_rows: list[torch.Tensor | None], argmax: list[int] | None = None) -> Verdict:
        """Judge `drafts` (at positions start_pos, ...) against the target's logits rows (one
        more row than drafts). `argmax`: the rows', where the host has already read them."""
        if self.params.greedy:
            return _greedy_verdict(logits.argmax(dim=-1).tolist() if argmax is None else argmax,
                                   drafts)
        probs = processed(logits.cpu(), self.params)  # every row at once
        if probs.shape[-1] != self.vocab:
            probs = torch.stack([_pad(row, self.vocab) for row in probs])
        checks: list[Check] = []
        tokens: list[int] = []
        rows = [q for q in q_rows[:len(drafts)] if q is not None]
        if len(rows) < len(drafts):
            raise MisalignedDraft(f"{len(drafts)} drafts at position {start_pos} came with "
                                  f"{len(rows)} q rows")
        for i, x in enumerate(drafts):
            check, ok, replacement, how = self._judge(probs[i], rows[i], x, start_pos + i)
            checks.append(check)
            if not ok:
                tokens.append(replacement)
                return Verdict(i, tokens, ["accepted"] * i + [how], checks, probs)
            tokens.append(x)
        bonus = self._pick(probs[len(drafts)], start_pos + len(drafts))
        last = "bonus" if drafts else "decoded"
        return Verdict(len(drafts), [*tokens, bonus], ["accepted"] * len(drafts) + [last], checks,
                       probs)

    def _judge(self, p: torch.Tensor, q: torch.Tensor, x: int,
               pos: int) -> tuple[Check, bool, int, str]:
        """One draft x at `pos`: (its check, accepted, the token in its place if not, how).
        Each rule draws only the noise it needs: a target sample (coupled), or a residual sample
        once a draft is rejected (rejection); every (position, stream) has its own generator,
        so skipping one draw changes no other."""
        coupled = self.params.acceptance == "coupled"
        check = _check(p, q, x, None if coupled else self.noise.uniform(pos, ACCEPT))
        if coupled:
            own = self._pick(p, pos)
            return check, x == own, own, "correction"
        assert check.u is not None
        if check.u < check.accept_prob:
            return check, True, -1, "resampled"
        return check, False, self._residual(p, q, x, pos), "resampled"

    def _residual(self, p: torch.Tensor, q: torch.Tensor, x: int, pos: int) -> int:
        """A draw from max(0, p - q), normalised."""
        residual = torch.clamp(p - q, min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q: any rejection came from rounding; draw from p
            residual = p
        return gumbel_argmax(residual / residual.sum(), self.noise.gumbel(pos, RESIDUAL))


def _check(p: torch.Tensor, q: torch.Tensor, x: int, u: float | None) -> Check:
    px, qx = float(p[x]), float(q[x])
    if qx <= 0:  # x was drawn from q: a q row without it belongs to another proposal
        raise MisalignedDraft(f"the draft's q row gives its own token {x} probability {qx}")
    return Check(p=px, q=qx, accept_prob=min(1.0, px / qx), u=u,
                 overlap=float(torch.minimum(p, q).sum()))


def _greedy_verdict(preds: list[int], drafts: list[int]) -> Verdict:
    """Accept the longest prefix of `drafts` matching the target's argmax at each row
    (`preds`), then add the target's own token (a correction, or a bonus after a full match)."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == preds[accepted]:
        accepted += 1
    if not drafts:
        last = "decoded"
    else:
        last = "bonus" if accepted == len(drafts) else "correction"
    return Verdict(accepted, [*drafts[:accepted], preds[accepted]],
                   ["accepted"] * accepted + [last], [])
