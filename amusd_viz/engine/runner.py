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

import torch
from transformers import DynamicCache

from amusd_viz.engine.seq import common_prefix


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
        self.cache: DynamicCache | None = None
        self.preamble: list[int] = []
        self._preamble_cache: DynamicCache | None = None
        self._texts: dict[int, str] = {}
        self.is_cuda = self.device.type == "cuda"
        self.turn = contextlib.nullcontext  # a shared device: SharedState.device_turn

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

    def crop(self, keep: int) -> None:
        drop = len(self.ids) - keep
        if drop > 0:
            assert self.cache is not None
            self.cache.crop(-drop)
            del self.ids[keep:]

    @torch.inference_mode()
    def forward(self, seq: list[int], n_logits: int = 1,
                sibling: int | None = None) -> tuple[torch.Tensor, int, int, int]:
        """Returns (float32 logits [n_logits, vocab], tokens fed, start_ns, end_ns).

        With `sibling`, the same pass also feeds that token in place of seq's last one (a tree
        of two leaves: it sees only the tokens before seq's last) and returns its next-token
        logits as one more row; it leaves nothing in the cache. On a CPU core a pass of two
        tokens costs about what one does (the weights are read once), so the amusd draft bets
        on its runner-up at every position almost for free (engine/speccache.py)."""
        if self.cache is None:
            self.reset()
        keep = min(common_prefix(self.ids, seq), len(seq) - n_logits)
        self.crop(keep)
        feed = seq[keep:]
        tree = {} if sibling is None else self._sibling_inputs(keep, len(feed))
        rows = n_logits + (sibling is not None)
        with self.turn():
            start = time.perf_counter_ns()
            out = self.model(
                input_ids=torch.tensor([feed if sibling is None else [*feed, sibling]],
                                       dtype=torch.long, device=self.device),
                cache=self.cache,
                use_cache=True,
                logits_to_keep=rows,
                **tree,
            )
            logits = out.logits[0, -rows:].float()
            if self.is_cuda:
                torch.cuda.synchronize(self.device)  # stamp the end of the real work
            end = time.perf_counter_ns()
        if sibling is not None:
            assert self.cache is not None
            self.cache.crop(-1)  # the sibling's keys and values: the line goes on without it
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits(
                f"the model's logits are not finite (NaN or inf) in {self.model.dtype} on "
                f"{self.device}: it overflows in this dtype (float16 does in Qwen2-family "
                "models). Use --dtype bfloat16 or --dtype float32.")
        self.ids.extend(feed)
        return logits, len(feed), start, end

    def _sibling_inputs(self, keep: int, n: int) -> dict:
        """Positions and an attention mask for `n` fed tokens after `keep` cached ones, plus a
        sibling of the last: it takes that token's position and sees the tokens before it."""
        last = keep + n - 1
        positions = [*range(keep, keep + n), last]
        allowed = torch.ones(n + 1, keep + n + 1, dtype=torch.bool).tril(keep)
        allowed[n, last] = False  # not the token it stands beside
        allowed[n, keep + n] = True  # itself
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
