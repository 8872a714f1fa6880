"""One run, start to finish: resolve the models, check them, tokenize the prompt, start the
engine, generate, and build the run summary. Used by the headless CLI, the TUI and the bench."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from amusd_viz import stats
from amusd_viz.errors import UserError
from amusd_viz.events import EventList, FanOut, RunFinished, RunStarted
from amusd_viz.engine.runner import common_prefix
from amusd_viz.engine.session import Engine, EngineConfig, Generation
from amusd_viz.models import registry
from amusd_viz.models.loader import check_same_tokenizer, load_tokenizer, materialize


@dataclass
class Prepared:
    """Models found and ready on disk, the prompt tokenized with the target's chat template."""

    strategy: str
    draft: str | None
    target: str
    draft_src: str | None
    target_src: str
    draft_device: str | None
    target_device: str
    dtype: str
    tokenizer: object
    eos_ids: frozenset[int]
    max_context: int | None

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False).input_ids
        return tok(prompt).input_ids

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

    def engine_config(self, strategy: str | None = None, **extra) -> EngineConfig:
        strategy = strategy or self.strategy
        return EngineConfig(strategy=strategy, target_src=self.target_src,
                            draft_src=self.draft_src if strategy != "ar" else None,
                            target_device=self.target_device, draft_device=self.draft_device,
                            dtype=self.dtype, preamble=self.preamble(), **extra)


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


def prepare(strategy: str, draft: str | None, target: str, target_device: str,
            draft_device: str | None, dtype: str, log=lambda m: print(m, file=sys.stderr)) -> Prepared:
    target_res = registry.resolve(target)
    # The draft is resolved even for `ar`, so the TUI can re-run the prompt with sync or amusd.
    draft_res = registry.resolve(draft) if draft else None
    target_src = materialize(target_res, log)
    draft_src = materialize(draft_res, log) if draft_res else None
    tokenizer = load_tokenizer(target_src)
    if draft_res is not None:
        check_same_tokenizer(draft_res.name, draft_src, target_res.name, target_src,
                             target_tok=tokenizer)
    return Prepared(strategy, draft_res.name if draft_res else None, target_res.name, draft_src,
                    target_src, draft_device if draft_res else None, target_device, dtype,
                    tokenizer, _eos_ids(target_src, tokenizer), _max_context(target_src))


def run_started_event(p: Prepared, strategy: str, prompt: str, prompt_ids, max_new_tokens,
                      lookahead) -> RunStarted:
    return RunStarted(t=0.0, strategy=strategy, draft=p.draft if strategy != "ar" else None,
                      target=p.target, draft_device=p.draft_device if strategy != "ar" else None,
                      target_device=p.target_device, prompt_tokens=len(prompt_ids), dtype=p.dtype,
                      lookahead=lookahead if strategy != "ar" else 0,
                      max_new_tokens=max_new_tokens, prompt=prompt)


def summarize(p: Prepared, strategy: str, gen: Generation | None, events, prompt_ids) -> dict:
    s = stats.compute(events)
    token_ids = gen.token_ids if gen else []
    return {
        "strategy": strategy,
        "draft": p.draft if strategy != "ar" else None,
        "target": p.target,
        "draft_device": p.draft_device if strategy != "ar" else None,
        "target_device": p.target_device,
        "dtype": p.dtype,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(token_ids),
        "token_ids": token_ids,
        "text": p.tokenizer.decode(token_ids, skip_special_tokens=True),
        "stop_reason": gen.stop_reason if gen else "failed",
        "wall_s": round(gen.wall_s, 4) if gen else None,
        "ms_per_token": round(1000 * gen.wall_s / len(token_ids), 2) if gen and token_ids else None,
        "mean_accepted_per_pass": s.mean_accepted_per_pass,
        "acceptance_rate": s.acceptance_rate,
        "verify_passes": s.verify_passes,
        "rollbacks": s.rollbacks,
        "wasted_draft_tokens": s.wasted_draft_tokens,
        "busy": s.busy,
        "overlap": s.overlap,
        "draft_lost": bool(gen and gen.draft_lost),
        "lossless_note": None if p.dtype == "float32" else (
            f"{p.dtype}: exact greedy equality with the target alone holds up to numeric near-ties "
            "(one- and multi-token passes round differently); use --dtype float32 for bit-exact "
            "comparisons"),
    }


def execute(p: Prepared, sink, prompt: str, max_new_tokens: int, lookahead: int,
            strategy: str | None = None, engine_extra: dict | None = None,
            on_engine=None) -> dict:
    """Run one prompt on a fresh engine; every event goes to `sink`; returns the summary."""
    strategy = strategy or p.strategy
    prompt_ids = p.encode(prompt)
    p.check_length(prompt_ids, max_new_tokens)
    kept = EventList()
    out = FanOut(sink, kept)
    t0 = time.perf_counter_ns()
    out.emit(run_started_event(p, strategy, prompt, prompt_ids, max_new_tokens, lookahead))
    engine = Engine(p.engine_config(strategy, **(engine_extra or {})), out, t0)
    if on_engine:
        on_engine(engine)
    gen = None
    try:
        engine.start()
        engine.wait_ready()
        gen = engine.generate(prompt_ids, max_new_tokens, lookahead, p.eos_ids)
        out.emit(RunFinished(t=gen.end_t, new_tokens=len(gen.token_ids), wall_s=gen.wall_s,
                             stop_reason=gen.stop_reason, started_at=gen.start_t))
    finally:
        engine.close()
    return summarize(p, strategy, gen, kept.events, prompt_ids)
