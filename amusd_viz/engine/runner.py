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

import torch
from transformers import Cache, DynamicCache

from amusd_viz.engine.estimate import FLAT
from amusd_viz.engine.seq import common_prefix


def tree_mask(keep: int, n: int, paths: Sequence[tuple[int, list[int]]], width: int,
              pad_to: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Which keys each query row sees, and its position, for `n` fed tokens after `keep` cached
    ones, then the paths' tokens: each sees seq before its anchor, and its own path up to
    itself. Padding rows up to `pad_to` (a fixed-size pass: engine/static_runner.py) sit after
    them, each seeing every slot up to its own: never all-masked, so they stay finite, and no
    real row sees them."""
    extra = sum(len(tokens) for _, tokens in paths)
    real = n + extra
    rows = max(real, pad_to)
    allowed = torch.zeros(rows, width, dtype=torch.bool)
    allowed[:n, :keep + n] = torch.ones(n, keep + n, dtype=torch.bool).tril(keep)
    positions = list(range(keep, keep + n))
    row = n  # the query row of the path's first token; its key is keep + row
    for anchor, tokens in paths:
        for j in range(len(tokens)):
            allowed[row + j, :anchor] = True
            allowed[row + j, keep + row:keep + row + j + 1] = True
            positions.append(anchor + j)
        row += len(tokens)
    if rows > real:
        allowed[real:, :keep + rows] = torch.ones(rows - real, keep + rows,
                                                   dtype=torch.bool).tril(keep + real)
        positions += range(keep + real, keep + rows)
    return allowed, positions


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
                paths: Sequence[tuple[int, list[int]]] = ()) -> tuple[torch.Tensor, int, int, int]:
        """Returns (float32 logits [rows, vocab], tokens fed, start_ns, end_ns): the next-token
        logits of seq's last `n_logits` positions, then those of each path's tokens.

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
        if not bool(torch.isfinite(logits).all()):
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
            allowed, positions = tree_mask(keep, n, paths, self.mask_width(keep + len(ids)))
            tree = self._mask_inputs(allowed, positions)
        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                         cache=self.cache, use_cache=True, logits_to_keep=rows, **tree)
        return out.logits[0, -rows:].float()

    def _mask_inputs(self, allowed: torch.Tensor, positions: list[int]) -> dict:
        """position_ids and a 4D attention mask, as this model's attention takes it (sdpa: the
        boolean mask; eager: an additive one)."""
        if getattr(self.model.config, "_attn_implementation", "sdpa") != "sdpa":
            dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed,
                                                                       torch.finfo(dtype).min)
        else:
            mask = allowed
        return {"position_ids": torch.tensor([positions], device=self.device),
                "attention_mask": mask[None, None].to(self.device)}

    def text(self, token_id: int) -> str:
        if token_id not in self._texts:
            self._texts[token_id] = self.tokenizer.decode([token_id]) if self.tokenizer else str(token_id)
        return self._texts[token_id]

    @property
    def vocab(self) -> int:
        return int(self.model.config.vocab_size)

    def top(self, logits_row: torch.Tensor) -> list[dict]:
        """The top candidates at one position, with probabilities and raw logits (the bench's
        near-tie rule needs the logits: amusd_viz/lossless.py)."""
        return self.tops(logits_row[None])[0]

    def tops(self, rows: torch.Tensor) -> list[list[dict]]:
        """`top` for every row of [n, vocab] logits, with one copy to the host (on a GPU, each
        copy is a synchronisation: one per pass, not two per row)."""
        rows = rows.float()
        p, idx = torch.topk(torch.softmax(rows, dim=-1), self.top_k, dim=-1)
        # ids below 2**24 are exact as float32
        host = torch.stack([p, idx.float(), rows.gather(-1, idx)]).cpu().tolist()
        return [[{"id": int(i), "text": self.text(int(i)), "p": round(q, 4), "logit": round(x, 5)}
                 for q, i, x in zip(ps, ids, xs, strict=True)]
                for ps, ids, xs in zip(*host, strict=True)]

    def top_of_probs(self, probs: torch.Tensor) -> list[dict]:
        """The top candidates of a distribution (a sampler's p or q)."""
        return self.tops_of_probs(probs[None])[0]

    def tops_of_probs(self, probs: torch.Tensor) -> list[list[dict]]:
        p, idx = torch.topk(probs, self.top_k, dim=-1)
        host = torch.stack([p.float(), idx.float()]).cpu().tolist()
        return [[{"id": int(i), "text": self.text(int(i)), "p": round(q, 4)}
                 for q, i in zip(ps, ids, strict=True)] for ps, ids in zip(*host, strict=True)]
