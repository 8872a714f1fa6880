"""A Runner over a static KV cache: preallocated lines with a position pointer (`--kv-cache`).

gpt-fast's layout, through transformers' `StaticCache`: each layer's keys and values live in
tensors of a fixed length; a pass writes at the pointer and moves it; rollback moves it back
(`crop`), and what lies past it is overwritten by the next write. The causal mask hides those
stale slots (a key past the pointer sits at a later position than any query), and a tree pass's
mask is as wide as the line. Every tensor of a line is made and moved under inference mode, as
the passes that write it run. Fixed addresses are what CUDA graphs need (issue 30); on a CPU the
static cache is selectable, so the same bookkeeping is tested against the dynamic cache.

The preamble is saved as a copy of its slots and restored by copying them back into the same
line, not by swapping the cache object. Speculation-cache branches (engine/speccache.py) get
lines of their own from a pool the main line and its forks share: a fork copies only the prefix
slots into a spare line, a dropped branch hands its line back, and a branch that becomes the main
line is copied into it from where the two part (the main line never changes address), so the
lines in use are bounded by the branches (speccache.MAX_BRANCHES) plus the main line. A run
longer than a line grows it (`reserve`: doubled, the slots up to the pointer copied over).

With `buckets`, every pass has one of a few fixed sizes (what a CUDA graph replays,
engine/graphs.py): padded up to the next bucket with rows that see every slot up to their own
(never all-masked: no NaN enters a slot) and that no real row sees; the pointer then moves back
over the padding. A prefill longer than the largest bucket goes in chunks through it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import Cache, StaticCache

from amusd_viz.engine import masks
from amusd_viz.engine.runner import Runner
from amusd_viz.engine.seq import common_prefix

FIRST_LINE_TOKENS = 1024  # a line's first length; a longer run grows it (reserve)
LINE_ROUNDING = 256


class StaticRunner(Runner):
    def __init__(self, model, device: str, tokenizer=None, top_k: int = 5,
                 line_tokens: int = FIRST_LINE_TOKENS, buckets: Sequence[int] = ()) -> None:
        super().__init__(model, device, tokenizer, top_k)
        self.line_tokens = line_tokens
        # fixed pass sizes (what CUDA graphs replay): each pass padded up to one, a longer one
        # fed in chunks through the largest; () feeds every pass at its own length
        self.buckets = tuple(sorted(buckets))
        self._spares: list[Cache] = []  # shared by reference with every fork
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # the preamble's slots

    @torch.inference_mode()
    def reset(self) -> None:
        if self.cache is None:
            self.cache = self._line()
        self.ids = []
        self.set_pointer(0)  # the start of the same line: no new tensors

    @torch.inference_mode()
    def set_preamble(self, ids: list[int]) -> None:
        self.reset()
        self.preamble = list(ids)
        if self.preamble:
            self.forward(self.preamble, 1)
            n = len(self.preamble)
            self._saved = [(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone())
                           for layer in self._layers()]

    @torch.inference_mode()
    def begin(self) -> None:
        """Start a run from the preamble: move the pointer back to it, or, where a prompt
        without it overwrote its slots, copy the saved slots back in."""
        if self.cache is None:
            self.reset()
        n = len(self.preamble)
        if n and self.ids[:n] != self.preamble:
            for layer, (keys, values) in zip(self._layers(), self._saved, strict=True):
                layer.keys[:, :, :n].copy_(keys)
                layer.values[:, :, :n].copy_(values)
            self.ids = list(self.preamble)
            self.set_pointer(n)
        super().begin()

    @torch.inference_mode()
    def fork(self) -> StaticRunner:
        """A branch: a spare line (or a new one) holding this line's slots up to the pointer."""
        other = copy.copy(self)
        other.cache = self._copy_into(self._spare(), len(self.ids))
        other.ids = list(self.ids)
        return other

    @torch.inference_mode()
    def adopt(self, other: Runner) -> None:
        """Take a branch's slots into this line, from where the two part (this line keeps its
        address, which a captured CUDA graph writes); the branch's line goes back to the pool."""
        assert isinstance(other, StaticRunner) and other.cache is not None
        self.reserve(len(other.ids))
        assert self.cache is not None
        other._copy_into(self.cache, len(other.ids), start=common_prefix(self.ids, other.ids))
        self.ids = list(other.ids)
        other.release()

    def release(self) -> None:
        if self.cache is not None:
            self._spares.append(self.cache)
            self.cache, self.ids = None, []

    @torch.inference_mode()
    def reserve(self, tokens: int) -> None:
        """Room for `tokens` in this line: a longer one (doubled, rounded) with the slots up to
        the pointer copied in, where it is short. The spares of the old length are dropped."""
        tokens += self.buckets[-1] if self.buckets else 0  # a pass's padding slots
        if self.cache is not None and tokens <= self.line_tokens:
            return
        if tokens > self.line_tokens:
            wanted = max(2 * self.line_tokens, tokens)
            self.line_tokens = -(-wanted // LINE_ROUNDING) * LINE_ROUNDING
            self._spares.clear()
        self.cache = (self._line() if self.cache is None
                      else self._copy_into(self._line(), len(self.ids)))

    @torch.inference_mode()
    def set_pointer(self, n: int) -> None:
        """Where the next write goes; `ids` must say what lies before it."""
        for layer in self._layers():
            layer.cumulative_length.fill_(n)

    @torch.inference_mode()
    def crop(self, keep: int) -> None:
        super().crop(keep)  # the pointer: an in-place update of the line's own (inference) tensor

    def mask_width(self, total: int) -> int:
        return self.line_tokens

    def _pass(self, ids: list[int], rows: int, keep: int, n: int,
              paths: Sequence[tuple[int, list[int]]]) -> torch.Tensor:
        """With buckets: fixed-size passes. A pass longer than the largest (a prefill) goes in
        chunks of fed tokens; the last holds the rows whose logits are wanted."""
        if not self.buckets or rows > self.buckets[-1]:
            return super()._pass(ids, rows, keep, n, paths)
        while len(ids) > self.buckets[-1]:
            take = min(self.buckets[-1], len(ids) - rows)  # fed tokens only: rows hold the paths
            self._fixed_pass(ids[:take], keep, take, ())
            ids, keep, n = ids[take:], keep + take, n - take
        return self._fixed_pass(ids, keep, n, paths)[len(ids) - rows:].float()

    def _fixed_pass(self, ids: list[int], keep: int, n: int,
                    paths: Sequence[tuple[int, list[int]]]) -> torch.Tensor:
        """`ids` padded to the next bucket: the padding's slots are written past the real ones
        and the pointer moved back over them (the next pass overwrites them)."""
        size = next(b for b in self.buckets if b >= len(ids))
        padded = torch.tensor([[*ids, *[0] * (size - len(ids))]], dtype=torch.long)
        logits = self._call(size, torch.cat([padded, masks.pass_rows(keep, n, paths, size)]))
        assert self.cache is not None
        self.cache.crop(-(size - len(ids)))
        return logits[:len(ids)]

    def _call(self, size: int, table: torch.Tensor) -> torch.Tensor:
        """One fixed-size model call: [size, vocab] logits (a CUDA graph's replay, where one is
        captured: engine/graphs.py). `table` [5, size] (host): the ids, then masks.pass_rows,
        sent to the device in one copy."""
        return self._eager(table.to(self.device))[0]

    def _eager(self, table: torch.Tensor) -> torch.Tensor:
        """The model over a device-side table: [1, size, vocab] logits."""
        return self.model(input_ids=table[:1], cache=self.cache, use_cache=True, logits_to_keep=0,
                          **masks.mask_inputs(table[1:], self.line_tokens, self.model)).logits

    def _line(self) -> StaticCache:
        cfg = self.model.config.get_text_config(decoder=True)
        line = StaticCache(config=cfg, max_cache_len=self.line_tokens)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dtype = next(p.dtype for p in self.model.parameters() if p.dtype.is_floating_point)
        line.early_initialization(1, kv_heads, head_dim, dtype, self.device)
        return line

    def _spare(self) -> Cache:
        while self._spares:
            line = self._spares.pop()
            if _layers(line)[0].max_cache_len == self.line_tokens:
                return line
        return self._line()

    def _copy_into(self, line: Cache, n: int, start: int = 0) -> Cache:
        """This line's slots start..n into `line`, whose pointer then stands at n."""
        for mine, theirs in zip(self._layers(), _layers(line), strict=True):
            theirs.keys[:, :, start:n].copy_(mine.keys[:, :, start:n])
            theirs.values[:, :, start:n].copy_(mine.values[:, :, start:n])
            theirs.cumulative_length.fill_(n)
        return line

    def _layers(self) -> list:
        assert self.cache is not None
        return _layers(self.cache)


def _layers(line) -> list:
    """A line's StaticLayers (keys, values, cumulative_length: the pointer, max_cache_len)."""
    return list(line.layers)
