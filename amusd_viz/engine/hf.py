"""The baselines users would otherwise reach for: transformers' own `generate`, and its assisted
generation with the same draft (or its prompt lookup, for the n-gram drafter)."""

from __future__ import annotations

import time

from amusd_viz.engine.passes import Committer, Emit, forward_event
from amusd_viz.engine.request import Outcome, Request
from amusd_viz.engine.runner import Runner


def _hf_sampling(req: Request) -> dict:
    """transformers' own sampler with the same settings (its own random stream, seeded)."""
    params = req.sampling
    if params.greedy:
        return {"do_sample": False}
    import torch

    torch.manual_seed(params.seed)
    # top_k 0 switches transformers' top-k off (None would fall back to its default of 50)
    return {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k}


def hf_loop(req: Request, target: Runner, draft: Runner | None, device: str, emit: Emit) -> Outcome:
    """Plain transformers `generate` (draft None) or its assisted generation with the same draft:
    the baselines users would otherwise reach for. Only the committed tokens are reported."""
    import torch

    model = target.model
    kwargs: dict = {}
    if draft is not None and draft.model is None:  # the n-gram drafter: transformers' own
        kwargs = {"prompt_lookup_num_tokens": req.lookahead,
                  "max_matching_ngram_size": getattr(draft, "max_n", 3)}
    elif draft is not None:
        # transformers 5.x reads these from the assistant's generation_config; a fixed number of
        # draft tokens (the lookahead) beats its adaptive default on this kind of machine
        # (docs/benchmarks.md), so the peer gets its better setting.
        draft.model.generation_config.num_assistant_tokens = req.lookahead
        draft.model.generation_config.num_assistant_tokens_schedule = "constant"
        kwargs["assistant_model"] = draft.model
    ids = torch.tensor([req.prompt_ids], device=target.device)
    start = time.perf_counter_ns()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=req.max_new_tokens, **_hf_sampling(req),
                             eos_token_id=sorted(req.eos_ids) or None,
                             pad_token_id=(sorted(req.eos_ids) or [0])[0], **kwargs)
    if target.is_cuda:
        torch.cuda.synchronize(target.device)
    end = time.perf_counter_ns()
    new = out[0, len(req.prompt_ids):].tolist()
    emit(forward_event(req, "target", device, "decode", len(new), start, end))
    c = Committer(req, target, emit)
    c.commit(new, ["decoded"] * len(new), [[] for _ in new])
    c.outcome.end_ns = end
    c.outcome.stop_reason = c.outcome.stop_reason or "max_new_tokens"
    return c.outcome
