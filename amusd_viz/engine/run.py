"""One run, start to finish: resolve the models, check them, tokenize the prompt, start the
engine, generate, and build the run summary. Used by the headless CLI, the TUI and the bench."""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amusd_viz import stats
from amusd_viz.config import EngineStrategy, RunConfig
from amusd_viz.engine import mps
from amusd_viz.engine.plan import switches
from amusd_viz.engine.seq import common_prefix
from amusd_viz.engine.session import Engine, EngineConfig, Generation
from amusd_viz.errors import UserError
from amusd_viz.events import EventList, FanOut, RunFinished, RunStarted
from amusd_viz.models import registry
from amusd_viz.models.loader import check_same_tokenizer, load_tokenizer, materialize
from amusd_viz.summary import RunSummary


@dataclass(frozen=True)
class Prepared:
    """Models found and ready on disk, their shared tokenizer, and what the target allows. One
    Prepared serves runs of every strategy (the TUI re-runs a prompt with another)."""

    draft: str | None
    target: str
    draft_src: str | None
    target_src: str
    tokenizer: Any
    eos_ids: frozenset[int]
    max_context: int | None

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False).input_ids
        return tok(prompt).input_ids

    @functools.cached_property
    def preamble(self) -> tuple[int, ...]:
        """The tokens every chat prompt starts with (the template's system turn and the user
        turn's opening), found as the common head of two different encoded prompts. The workers
        feed it while loading; empty without a chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            return ()
        a, b = self.encode("a"), self.encode("?")
        return tuple(a[:common_prefix(a, b)])

    def check_length(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        if not prompt_ids:
            raise UserError("the prompt encodes to no tokens for this tokenizer. Write a prompt "
                            "with some text in it.")
        if self.max_context and len(prompt_ids) + max_new_tokens > self.max_context:
            raise UserError(
                f"the prompt ({len(prompt_ids)} tokens) plus --max-new-tokens {max_new_tokens} "
                f"exceeds the target's context of {self.max_context} tokens. Shorten the prompt "
                "or lower --max-new-tokens.")

    def engine_config(self, cfg: RunConfig, strategy: EngineStrategy | None = None,
                      draft_src: str | None = None) -> EngineConfig:
        """The engine's settings for a resolved run (`strategy`: a bench baseline instead;
        `draft_src`: another drafter, such as the bench's `ngram:3` beside the model draft)."""
        strategy = strategy or cfg.strategy
        return EngineConfig(strategy=strategy, target_src=self.target_src,
                            draft_src=(draft_src or self.draft_src)
                            if strategy not in ("ar", "hf-generate") else None,
                            target_device=cfg.target_device, draft_device=cfg.draft_device,
                            dtype=cfg.dtype, stall_timeout=cfg.stall_timeout,
                            draft_quant=cfg.draft_quant, kv_cache=cfg.kv_cache,
                            cuda_graphs=cfg.cuda_graphs, gpu_share=cfg.gpu_share,
                            **switches(cfg),
                            preamble=self.preamble if cfg.preamble_cache else (),
                            faults={str(role): spec for role, spec in cfg.faults.items()},
                            sampling=cfg.sampling)


def _eos_ids(source: str, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    config = Path(source) / "generation_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _max_context(source: str) -> int | None:
    config = Path(source) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("max_position_embeddings")
    return None


def prepare(cfg: RunConfig, log=lambda m: print(m, file=sys.stderr)) -> Prepared:
    """Resolve both models (the draft even for `ar`, so the TUI can re-run with sync or amusd),
    convert them once if needed, and check that they share a tokenizer."""
    ngram_n = cfg.ngram_n  # the n-gram drafter: no model, it works on the target's ids
    target_res, draft_res = registry.resolve_pair(
        cfg.target, cfg.draft if cfg.draft and ngram_n is None else None)
    target_src = materialize(target_res, log)
    draft_src = materialize(draft_res, log) if draft_res else None
    tokenizer = load_tokenizer(target_src)
    if draft_res is not None and draft_src is not None:
        check_same_tokenizer(draft_res.name, draft_src, target_res.name, target_src,
                             target_tok=tokenizer)
    draft_name = draft_res.name if draft_res else None
    if ngram_n is not None:
        draft_name = draft_src = f"ngram:{ngram_n}"
    return Prepared(draft_name, target_res.name, draft_src, target_src,
                    tokenizer, _eos_ids(target_src, tokenizer), _max_context(target_src))


def run_started_event(p: Prepared, cfg: RunConfig, prompt_ids: list[int]) -> RunStarted:
    spec = cfg.uses_draft
    draft_device = cfg.draft_device and mps.label(cfg.draft_device,
                                                  mps.worker_percent("draft", cfg.gpu_share))
    return RunStarted(t=0.0, strategy=cfg.strategy, draft=p.draft if spec else None,
                      target=p.target, draft_device=draft_device if spec else None,
                      target_device=mps.label(cfg.target_device,
                                              mps.worker_percent("target", cfg.gpu_share)),
                      prompt_tokens=len(prompt_ids),
                      dtype=cfg.dtype, lookahead=cfg.lookahead if spec else 0,
                      max_new_tokens=cfg.max_new_tokens, prompt=cfg.prompt,
                      temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                      seed=None if cfg.temperature == 0 else cfg.seed,
                      acceptance=cfg.acceptance_rule)


def summarize(p: Prepared, cfg: RunConfig, gen: Generation | None, events,
              prompt_ids: list[int]) -> RunSummary:
    token_ids = gen.token_ids if gen else []
    return RunSummary(
        strategy=cfg.strategy, draft=p.draft if cfg.uses_draft else None, target=p.target,
        draft_device=cfg.draft_device if cfg.uses_draft else None,
        target_device=cfg.target_device, dtype=cfg.dtype, prompt_tokens=len(prompt_ids),
        token_ids=token_ids, text=p.tokenizer.decode(token_ids, skip_special_tokens=True),
        stop_reason=gen.stop_reason if gen else "failed", draft_lost=bool(gen and gen.draft_lost),
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        seed=cfg.seed if cfg.temperature else None, acceptance=cfg.acceptance_rule,
        stats=stats.compute(events))


def execute(p: Prepared, cfg: RunConfig, sink, on_engine=None) -> RunSummary:
    """Run one prompt on a fresh engine; every event goes to `sink`; returns the summary."""
    prompt_ids = p.encode(cfg.prompt)
    p.check_length(prompt_ids, cfg.max_new_tokens)
    kept = EventList()
    out = FanOut(sink, kept)
    t0 = time.perf_counter_ns()
    out.emit(run_started_event(p, cfg, prompt_ids))
    engine = Engine(p.engine_config(cfg), out, t0)
    if on_engine:
        on_engine(engine)
    gen = None
    try:
        engine.start()
        engine.wait_ready()
        gen = engine.generate(prompt_ids, cfg.max_new_tokens, cfg.lookahead, p.eos_ids)
        out.emit(RunFinished(t=gen.end_t, new_tokens=len(gen.token_ids), wall_s=gen.wall_s,
                             stop_reason=gen.stop_reason, started_at=gen.start_t))
    finally:
        engine.close()
    return summarize(p, cfg, gen, kept.events, prompt_ids)
