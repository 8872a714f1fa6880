"""A causal LM with its KV cache, fed incrementally.

`ids` is exactly what the cache holds. `forward(seq, n)` keeps the longest cached prefix of `seq`,
crops the rest (that *is* the rollback: dropped tokens leave the cache, nothing is fed twice),
feeds what is missing and returns logits for the last `n` positions of `seq`.

A run starts from the *preamble*: the tokens every prompt begins with (the chat template's fixed
system turn), fed once when the model loads, like a server's prefix cache. Every run starts
from exactly that state, whatever ran before, so runs cost the same in any order.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache

from amusd_viz.engine import masks
from amusd_viz.engine.estimate import FLAT
from amusd_viz.engine.seq import common_prefix


@dataclass
class HostRows:
    """What the host reads of a pass's logits rows, in one device-to-host copy (on a GPU each
    copy is a synchronisation, so a pass makes one): per row the argmax and the top candidates,
    and whether every logit is finite."""

    argmax: list[int]
    tops: list[list[dict]]
    finite: bool = True


class NonFiniteLogits(RuntimeError):
    """A forward pass produced NaN or inf: every strategy would pick token 0 from then on."""


class Runner:
    phase_name: str | None = None  # a model's draft steps are "prefill" then "draft" passes

    def __init__(self, model, device: str, tokenizer=None, top_k: int = 5) -> None:
        self.model = model
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.ids: list[int] = []
        self.cache: Cache | None = None
        self.preamble: list[int] = []
        self._preamble_cache: Cache | None = None
        self._texts: dict[int, str] = {}
        self.read = HostRows([], [])  # what the host read of the last pass (forward)
        self.is_cuda = self.device.type == "cuda"
        self.cost = FLAT  # what a pass and each extra token in it cost: measured at load
        # before each pass: a shared device's turn (schedule.py), or sync-2dev's core
        self.turn: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def reset(self) -> None:
        self.ids = []
        self.cache = DynamicCache(config=self.model.config)

    def set_preamble(self, ids: list[int]) -> None:
        """Feed the shared prompt head now (at load time), so that runs start past it."""
        self.reset()
        self.preamble = list(ids)
        if self.preamble:
            self.forward(self.preamble, 1)
            self._preamble_cache = copy.deepcopy(self.cache)  # a few hundred KB: one per model

    def begin(self) -> None:
        """Start a run from the preamble: crop what the last run added, or, where a prompt
        without it replaced it, restore the saved copy."""
        if not self.preamble:
            self.reset()
        elif common_prefix(self.ids, self.preamble) == len(self.preamble):
            self.crop(len(self.preamble))
        else:
            self.cache = copy.deepcopy(self._preamble_cache)
            self.ids = list(self.preamble)

    def fork(self) -> Runner:
        """Another line over the same model: a copy of this KV cache that can be fed and
        cropped on its own (the speculation cache's branches; engine/speccache.py)."""
        other = copy.copy(self)
        other.cache = copy.deepcopy(self.cache)
        other.ids = list(self.ids)
        return other

    def adopt(self, other: Runner) -> None:
        """Take over a fork's cache and ids (a branch became the main line)."""
        self.cache, self.ids = other.cache, other.ids

    def release(self) -> None:
        """A dropped branch is done with its cache (a static line goes back to the pool)."""

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` in the cache before a pass (a dynamic cache always has it)."""

    def mask_width(self, total: int) -> int:
        """Keys a tree pass's mask spans: what the cache will hold (a static line: its length)."""
        return total

    def crop(self, keep: int) -> None:
        drop = len(self.ids) - keep
        if drop > 0:
            assert self.cache is not None
            self.cache.crop(-drop)
            del self.ids[keep:]

    @torch.inference_mode()
    def forward(self, seq: list[int], n_logits: int = 1,
                paths: Sequence[tuple[int, list[int]]] = (),
                tops: bool = True) -> tuple[torch.Tensor, int, int, int]:
        """Returns (float32 logits [rows, vocab], tokens fed, start_ns, end_ns): the next-token
        logits of seq's last `n_logits` positions, then those of each path's tokens. What the
        host reads of them (argmax and, with `tops`, the top candidates) is in `self.read`, row
        for row. A sampling caller passes tops=False: its candidates come from the processed
        distribution, and the softmax and top-k over the vocabulary would be work thrown away.

        A path (anchor, tokens) is a line that leaves seq at index `anchor`: its first token
        stands in place of seq[anchor] (seeing only seq[:anchor], at that position), the others
        follow it. Paths go into the same pass under a tree attention mask and leave nothing in
        the cache. On a CPU a pass of a dozen tokens costs about what one does (the weights are
        read once), so the amusd draft bets on its runner-up beside every draft (a sibling: the
        path (index of the draft, [runner-up]), passes.Drafter.steps) and the target checks the
        draft's branches in the pass that checks its main line (engine/speccache.py)."""
        if self.cache is None:
            self.reset()
        keep = min(common_prefix(self.ids, seq), len(seq) - n_logits)
        self.crop(keep)
        feed = seq[keep:]
        extra = [t for _, tokens in paths for t in tokens]
        self.reserve(keep + len(feed) + len(extra))
        rows = n_logits + len(extra)
        logits, start, end = self._timed_pass([*feed, *extra], rows, keep, len(feed), paths)
        if extra:
            assert self.cache is not None
            self.cache.crop(-len(extra))  # the paths' keys and values: the line goes on alone
        self.ids.extend(feed)  # before any raise: ids must always say what the cache holds
        self.read = self.rows_to_host(logits, tops)  # the pass's one copy to the host
        if not self.read.finite:
            raise NonFiniteLogits(
                f"the model's logits are not finite (NaN or inf) in {self.model.dtype} on "
                f"{self.device}: it overflows in this dtype (float16 does in Qwen2-family "
                "models). Use --dtype bfloat16 or --dtype float32.")
        return logits, len(feed), start, end

    def _timed_pass(self, ids: list[int], rows: int, keep: int, n: int,
                    paths: Sequence[tuple[int, list[int]]]) -> tuple[torch.Tensor, int, int]:
        """One pass on this device's turn: the last `rows` logits (float32), start and end."""
        with self.turn():
            start = time.perf_counter_ns()
            logits = self._pass(ids, rows, keep, n, paths)
            if self.is_cuda:
                torch.cuda.synchronize(self.device)  # stamp the end of the real work
            return logits, start, time.perf_counter_ns()

    def _pass(self, ids: list[int], rows: int, keep: int, n: int,
              paths: Sequence[tuple[int, list[int]]]) -> torch.Tensor:
        """One model call over `ids` (n fed tokens after `keep` cached ones, then the paths')."""
        tree = {}
        if paths:
            table = masks.pass_rows(keep, n, paths).to(self.device)
            tree = masks.mask_inputs(table, self.mask_width(keep + len(ids)), self.model)
        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                         cache=self.cache, use_cache=True, logits_to_keep=rows, **tree)
        return out.logits[0, -rows:].float()

    def text(self, token_id: int) -> str:
        if token_id not in self._texts:
            self._texts[token_id] = self.tokenizer.decode([token_id]) if self.tokenizer else str(token_id)
        return self._texts[token_id]

    @property
    def vocab(self) -> int:
        return int(self.model.config.vocab_size)

    def rows_to_host(self, rows: torch.Tensor, tops: bool = True) -> HostRows:
        """Each row's argmax, finiteness and (with `tops`) top candidates, with probabilities
        and raw logits (the bench's near-tie rule needs the logits: amusd_viz/lossless.py),
        packed into one copy to the host (before: a copy each for the finite check, the argmax
        and the top-k, three host synchronisations a pass on a GPU)."""
        rows = rows.float()
        k = self.top_k if tops else 0
        p, idx = torch.topk(torch.softmax(rows, dim=-1), k, dim=-1) if k else (rows[:, :0],) * 2
        finite = torch.isfinite(rows).all(dim=-1, keepdim=True)
        # ids below 2**24 are exact as float32
        packed = torch.cat([finite.float(), rows.argmax(dim=-1, keepdim=True).float(), p,
                            idx.float(), rows.gather(-1, idx.long())], dim=-1).cpu().tolist()
        best = [[{"id": int(i), "text": self.text(int(i)), "p": round(q, 4), "logit": round(x, 5)}
                 for q, i, x in zip(row[2:2 + k], row[2 + k:2 + 2 * k], row[2 + 2 * k:],
                                    strict=True)] for row in packed]
        return HostRows([int(row[1]) for row in packed], best, all(row[0] for row in packed))

    def top_of_probs(self, probs: torch.Tensor) -> list[dict]:
        """The top candidates of a distribution (a sampler's p or q)."""
        return self.tops_of_probs(probs[None])[0]

    def tops_of_probs(self, probs: torch.Tensor) -> list[list[dict]]:
        p, idx = torch.topk(probs, self.top_k, dim=-1)
        host = torch.stack([p.float(), idx.float()]).cpu().tolist()
        return [[{"id": int(i), "text": self.text(int(i)), "p": round(q, 4)}
                 for q, i in zip(ps, ids, strict=True)] for ps, ids in zip(*host, strict=True)]
