"""The generation loops: lossless, greedy or sampled, emitting events.

Every committed token comes from the target's own choice (its argmax, its seeded sample, or the
rejection rule's draw; engine/sampling.py), so each strategy's output is the target's own
decoding. The loops differ only in where draft tokens come from and when:
- `ar_loop`: the target alone, one token per pass.
- `sync_loop`: draft k tokens, then verify them in one target pass (one process, both models).
- `amusd_target_loop` / `amusd_draft_loop`: two processes running at once, sharing the committed
  and the drafted sequences through `SharedState` (engine/shared.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from amusd_viz.engine.runner import Runner
from amusd_viz.engine.sampling import GREEDY, Sampler, SamplingParams, Verdict
from amusd_viz.events import (
    Candidate,
    DraftProposed,
    Forward,
    Rollback,
    TokenCommitted,
    VerifyResult,
)

Emit = Callable[[object], None]


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    lookahead: int
    eos_ids: frozenset[int]
    t0_ns: int  # the run's zero on the shared monotonic clock
    max_ahead: int = 0  # amusd: how far the draft may run past the committed text (0: 2×lookahead)
    wait_steps: float = 0.0  # amusd: how long the target may wait for drafts (0: never waits)
    sampling: SamplingParams = GREEDY
    vocab: int = 0  # sampling: the width of p and q rows (the larger model vocabulary)


@dataclass
class Outcome:
    token_ids: list[int] = field(default_factory=list)
    end_ns: int = 0
    stop_reason: str = ""


def _secs(req: Request, ns: int) -> float:
    return (ns - req.t0_ns) / 1e9


def _forward_event(req: Request, role: str, device: str, phase: str, n: int, start: int,
                   end: int) -> Forward:
    return Forward(t=_secs(req, start), role=role, device=device, dur=(end - start) / 1e9,
                   phase=phase, n_tokens=n)


class Committer:
    """Appends the target's tokens, emits token_committed, and knows when to stop."""

    def __init__(self, req: Request, runner: Runner, emit: Emit) -> None:
        self.req, self.runner, self.emit = req, runner, emit
        self.seq = list(req.prompt_ids)
        self.outcome = Outcome()

    @property
    def n_new(self) -> int:
        return len(self.seq) - len(self.req.prompt_ids)

    @property
    def remaining(self) -> int:
        return self.req.max_new_tokens - self.n_new

    @property
    def done(self) -> bool:
        return bool(self.outcome.stop_reason)

    def commit(self, ids: list[int], hows: list[str], tops: list[list[dict]]) -> list[int]:
        """Commit ids in order, stopping at EOS or the token budget; returns what was committed."""
        taken = []
        now = time.perf_counter_ns()
        for token, how, top in zip(ids, hows, tops, strict=False):
            if self.done:
                break
            pos = self.n_new
            self.seq.append(token)
            taken.append(token)
            self.emit(TokenCommitted(t=_secs(self.req, now), pos=pos, token_id=token,
                                     text=self.runner.text(token), how=how,
                                     top=[Candidate(**c) for c in top]))
            if token in self.req.eos_ids:
                self.outcome.stop_reason = "eos"
            elif self.remaining <= 0:
                self.outcome.stop_reason = "max_new_tokens"
        self.outcome.token_ids = self.seq[len(self.req.prompt_ids):]
        self.outcome.end_ns = now
        return taken


def sampler_for(req: Request, runner: Runner) -> Sampler:
    return Sampler(req.sampling, req.vocab or runner.vocab)


def _tops(runner: Runner, logits, verdict: Verdict, sampler: Sampler) -> list[list[dict]]:
    """The target's top candidates at each committed position: of p when sampling."""
    n = len(verdict.tokens)
    if verdict.probs is None:
        return runner.tops(logits[:n])
    return runner.tops_of_probs(verdict.probs[:n])


def verify(req: Request, c: Committer, target: Runner, device: str, drafts: list[int],
           emit: Emit, sampler: Sampler, q_rows: list | None = None) -> int:
    """One target pass over [last committed] + drafts: judge, commit, report. Returns how many
    drafts were accepted."""
    logits, fed, start, end = target.forward(c.seq + drafts, len(drafts) + 1)
    emit(_forward_event(req, "target", device, "verify" if drafts else "decode",
                        fed, start, end))
    start_pos = c.n_new
    verdict = sampler.verdict(logits, drafts, start_pos, q_rows or [])
    committed = c.commit(verdict.tokens, verdict.hows, _tops(target, logits, verdict, sampler))
    emit(VerifyResult(t=_secs(req, end), start_pos=start_pos, proposed=drafts,
                      accepted=verdict.accepted, committed=committed,
                      **_check_fields(verdict)))
    sampler.noise.forget_before(c.n_new)
    return verdict.accepted


def _check_fields(verdict: Verdict) -> dict:
    """Why each checked draft token was accepted or not (empty lists when greedy)."""
    checks = verdict.checks
    return {"p": [round(k.p, 6) for k in checks], "q": [round(k.q, 6) for k in checks],
            "accept_prob": [round(k.accept_prob, 6) for k in checks],
            "u": [round(k.u, 6) for k in checks if k.u is not None],
            "overlap": [round(k.overlap, 6) for k in checks if k.overlap is not None]}


def first_token(req: Request, c: Committer, target: Runner, device: str, emit: Emit,
                sampler: Sampler, phase: str = "prefill") -> None:
    """One pass with no drafts: the prompt's prefill, or a plain decode step."""
    logits, fed, start, end = target.forward(c.seq, 1)
    emit(_forward_event(req, "target", device, phase, fed, start, end))
    token, probs = sampler.own(logits[0], c.n_new)
    top = target.top(logits[0]) if probs is None else target.top_of_probs(probs)
    c.commit([token], ["decoded"], [top])


def propose(req: Request, draft: Runner, sampler: Sampler, logits_row, pos: int, end: int,
            emit: Emit):
    """The draft's token at `pos`; emits draft_proposed with q(x). Returns (token, q row)."""
    if sampler.params.greedy:  # the top-5's head is the proposal: one copy to the host
        top = draft.top(logits_row)
        token, q_x, q = top[0]["id"], top[0]["p"], None
    else:
        token, q_x, q = sampler.propose(logits_row, pos)
        assert q is not None  # a sampler gives q whenever it samples
        top = draft.top_of_probs(q)
    match = getattr(draft, "last", None)  # the n-gram drafter: where it copied from
    emit(DraftProposed(t=_secs(req, end), pos=pos, token_id=token, text=draft.text(token),
                       top=top, q=None if q_x is None else round(q_x, 6),
                       ngram_n=match.n if match else None,
                       ngram_from=match.end if match else None))
    return token, q


def draft_step(req: Request, draft: Runner, seq: list[int], sampler: Sampler, device: str,
               emit: Emit, first: bool):
    """One draft step on `seq` (a model pass, or a lookup): (token, q row, seconds), or None
    when the drafter has nothing to propose (the n-gram drafter found no match)."""
    logits, fed, start, end = draft.forward(seq, 1)
    phase = draft.phase_name or ("prefill" if first else "draft")
    emit(_forward_event(req, "draft", device, phase, fed, start, end))
    if logits is None:
        return None
    token, q = propose(req, draft, sampler, logits[0], len(seq) - len(req.prompt_ids), end, emit)
    return token, q, (end - start) / 1e9 if fed == 1 else None


def ar_loop(req: Request, target: Runner, device: str, emit: Emit) -> Outcome:
    target.begin()
    c = Committer(req, target, emit)
    sampler = sampler_for(req, target)
    phase = "prefill"
    while not c.done:
        first_token(req, c, target, device, emit, sampler, phase)
        sampler.noise.forget_before(c.n_new)
        phase = "decode"
    return c.outcome


def sync_loop(req: Request, target: Runner, draft: Runner, device: str, emit: Emit) -> Outcome:
    """Classic speculative decoding: the two models take turns on one device."""
    target.begin()
    draft.begin()
    c = Committer(req, target, emit)
    sampler = sampler_for(req, target)
    first_token(req, c, target, device, emit, sampler)
    first = True
    while not c.done:
        drafts: list[int] = []
        q_rows: list = []
        for _ in range(min(req.lookahead, c.remaining - 1)):
            step = draft_step(req, draft, c.seq + drafts, sampler, device, emit, first)
            first = False
            if step is None:
                break
            token, q, _ = step
            drafts.append(token)
            q_rows.append(q)
            if token in req.eos_ids:
                break
        start_pos = c.n_new
        accepted = verify(req, c, target, device, drafts, emit, sampler, q_rows)
        if accepted < len(drafts):  # the draft's cache drops these on its next forward pass
            emit(Rollback(t=_secs(req, time.perf_counter_ns()), to_pos=start_pos + accepted,
                          discarded=drafts[accepted:]))
    return c.outcome


class Pace:
    """What the verifier knows of the run so far: the draft's acceptance and the run's own
    throughput (moving averages). A pass holding m drafts may wait for draft m+1 when that draft
    is expected to add more tokens per second of waiting than the run is making anyway:
    a^(m+1) / draft_step > throughput (a^(m+1): the chance all m+1 are accepted)."""

    def __init__(self) -> None:
        self.accepts, self.rejects = 4.0, 1.0  # a prior of 0.8, soon outweighed
        self.rate: float | None = None  # committed tokens per second
        self._last_commit: float | None = None

    @property
    def acceptance(self) -> float:
        return min(0.98, self.accepts / (self.accepts + self.rejects))

    def observe(self, proposed: int, accepted: int, committed: int) -> None:
        now = time.perf_counter()
        if proposed:
            # a geometric run: `accepted` successes, then one failure unless all were accepted
            self.accepts = 0.9 * self.accepts + accepted
            self.rejects = 0.9 * self.rejects + (accepted < proposed)
        if self._last_commit is not None and now > self._last_commit:
            rate = committed / (now - self._last_commit)
            self.rate = rate if self.rate is None else 0.8 * self.rate + 0.2 * rate
        self._last_commit = now

    def drafts_worth_waiting_for(self, draft_step_s: float, limit: int) -> int:
        if self.rate is None or draft_step_s <= 0:
            return 0
        want = 0
        while want < limit and self.acceptance ** (want + 1) / draft_step_s > self.rate:
            want += 1
        return want


def amusd_target_loop(req: Request, target: Runner, device: str, shared, emit: Emit) -> Outcome:
    """The verifier. Each pass checks whatever draft tokens extend the committed text (up to the
    lookahead); with none, it decodes one token on its own. It waits for drafts only when
    `wait_steps` > 0 (an experiment; see Pace)."""
    target.begin()
    c = Committer(req, target, emit)
    n_prompt = len(req.prompt_ids)
    sampler = sampler_for(req, target)
    draft_gone = lambda: not shared.draft_alive  # noqa: E731
    shared.wait_turn("target", stop=draft_gone)  # one device: the target's prefill goes first
    first_token(req, c, target, device, emit, sampler)
    shared.publish_committed(c.seq, n_prompt, done=c.done)
    shared.pass_turn("draft")
    pace = Pace()
    while not c.done:
        # one device: wait for the draft's turn to end, then read the drafts it made
        shared.wait_turn("target", stop=draft_gone)
        limit = min(req.lookahead, c.remaining - 1)
        drafts = shared.read_drafts(c.seq, n_prompt, limit)
        if req.wait_steps and limit > 0 and shared.draft_alive:
            step = shared.draft_step_s()
            want = pace.drafts_worth_waiting_for(step, limit)
            if len(drafts) < want:
                drafts = shared.wait_for_drafts(c.seq, n_prompt, limit, want,
                                                req.wait_steps * (want - len(drafts)) * step)
        q_rows: list = []
        if drafts and not req.sampling.greedy:
            # the q of each draft, as the draft published it; a row already overwritten by a
            # rollback ends the drafts there
            q_rows = shared.read_q_rows(c.n_new, drafts)
            drafts = drafts[:len(q_rows)]
        before = c.n_new
        accepted = verify(req, c, target, device, drafts, emit, sampler, q_rows)
        shared.publish_committed(c.seq, n_prompt, done=c.done)
        shared.pass_turn("draft")
        pace.observe(len(drafts), accepted, c.n_new - before)
    return c.outcome


def _adopt_committed(req: Request, seq: list[int], committed: list[int], shared,
                     emit: Emit) -> list[int]:
    """The draft's sequence after the target's latest commits: on a mismatch, drop its tokens
    from there (a rollback) and take the target's; past its drafts, adopt the target's."""
    n_prompt = len(req.prompt_ids)
    mismatch = next((i for i in range(n_prompt, min(len(seq), len(committed)))
                     if seq[i] != committed[i]), None)
    if mismatch is not None:
        emit(Rollback(t=_secs(req, time.perf_counter_ns()), to_pos=mismatch - n_prompt,
                      discarded=seq[mismatch:]))
        shared.publish_drafts(committed, n_prompt)
        return committed
    if len(committed) > len(seq):
        return seq + committed[len(seq):]  # the target decoded past our drafts: adopt
    return seq


def amusd_draft_loop(req: Request, draft: Runner, device: str, shared, emit: Emit) -> int:
    """The drafter: keeps proposing from its own sequence; when the target commits a token that
    differs from its own at some position, it drops its tokens (and cache) from there, adopts
    the target's tokens and drafts on. Waits (blocking, no spinning) only when it is far enough
    ahead, at the token budget, or after proposing EOS. On a device shared with the target it
    drafts `lookahead` tokens per turn and then hands the device over (SharedState's baton).
    Returns the number of forward passes."""
    draft.begin()
    n_prompt = len(req.prompt_ids)
    seq = list(req.prompt_ids)
    max_ahead = req.lookahead if shared.one_device else req.max_ahead or 2 * req.lookahead
    sampler = sampler_for(req, draft)
    passes = 0

    def idle() -> None:
        if shared.one_device:  # the target's turn: verify what this turn drafted
            shared.pass_turn("target")
            shared.wait_turn("draft", stop=lambda: shared.run_done)
        else:
            shared.wait_wakeup(0.5)

    shared.wait_turn("draft", stop=lambda: shared.run_done)  # one device: after the prefill
    while True:
        shared.clear_wakeup()
        committed, done = shared.read_committed(req.prompt_ids)
        if done:
            return passes
        seq = _adopt_committed(req, seq, committed, shared, emit)
        generated = len(seq) - n_prompt
        if (len(seq) - len(committed) >= max_ahead or generated >= req.max_new_tokens
                or (generated and seq[-1] in req.eos_ids)):
            idle()
            continue
        passes += 1
        step = draft_step(req, draft, seq, sampler, device, emit, first=passes == 1)
        if step is None:  # nothing to propose until the target commits more
            idle()
            continue
        token, q, step_s = step
        if q is not None:
            shared.write_q_row(generated, token, q)  # before the draft that needs it is visible
        sampler.noise.forget_before(len(committed) - n_prompt)
        seq = [*seq, token]
        shared.publish_drafts(seq, n_prompt, step_s=step_s)


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
    emit(_forward_event(req, "target", device, "decode", len(new), start, end))
    c = Committer(req, target, emit)
    c.commit(new, ["decoded"] * len(new), [[] for _ in new])
    c.outcome.end_ns = end
    c.outcome.stop_reason = c.outcome.stop_reason or "max_new_tokens"
    return c.outcome
