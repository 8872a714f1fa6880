"""The generation loops: greedy, lossless, emitting events.

Every committed token comes from the target's own argmax, so each strategy's output equals the
target's greedy decoding. The loops differ only in where draft tokens come from and when:
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


def judge(runner: Runner, logits, drafts: list[int]) -> tuple[int, list[int], list[str], list[list[dict]]]:
    """Greedy verification: accept the longest prefix of `drafts` that matches the target's
    argmax, then add the target's own token (a correction, or a bonus after a full match)."""
    preds = logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == preds[accepted]:
        accepted += 1
    new = [*drafts[:accepted], preds[accepted]]
    if not drafts:
        last = "decoded"
    else:
        last = "bonus" if accepted == len(drafts) else "correction"
    hows = ["accepted"] * accepted + [last]
    tops = [runner.top(logits[i]) for i in range(accepted + 1)]
    return accepted, new, hows, tops


def verify(req: Request, c: Committer, target: Runner, device: str, drafts: list[int],
           emit: Emit) -> int:
    """One target pass over [last committed] + drafts: judge, commit, report. Returns how many
    drafts were accepted."""
    logits, fed, start, end = target.forward(c.seq + drafts, len(drafts) + 1)
    emit(_forward_event(req, "target", device, "verify" if drafts else "decode",
                        fed, start, end))
    start_pos = c.n_new
    accepted, new, hows, tops = judge(target, logits, drafts)
    committed = c.commit(new, hows, tops)
    emit(VerifyResult(t=_secs(req, end), start_pos=start_pos, proposed=drafts, accepted=accepted,
                      committed=committed))
    return accepted


def ar_loop(req: Request, target: Runner, device: str, emit: Emit) -> Outcome:
    target.begin()
    c = Committer(req, target, emit)
    phase = "prefill"
    while not c.done:
        logits, fed, start, end = target.forward(c.seq, 1)
        emit(_forward_event(req, "target", device, phase, fed, start, end))
        phase = "decode"
        token = int(logits[0].argmax())
        c.commit([token], ["decoded"], [target.top(logits[0])])
    return c.outcome


def sync_loop(req: Request, target: Runner, draft: Runner, device: str, emit: Emit) -> Outcome:
    """Classic speculative decoding: the two models take turns on one device."""
    target.begin()
    draft.begin()
    c = Committer(req, target, emit)
    logits, fed, start, end = target.forward(c.seq, 1)
    emit(_forward_event(req, "target", device, "prefill", fed, start, end))
    c.commit([int(logits[0].argmax())], ["decoded"], [target.top(logits[0])])
    while not c.done:
        drafts: list[int] = []
        for _ in range(min(req.lookahead, c.remaining - 1)):
            logits, fed, start, end = draft.forward(c.seq + drafts, 1)
            emit(_forward_event(req, "draft", device,
                                "prefill" if len(draft.ids) == fed else "draft", fed, start, end))
            token = int(logits[0].argmax())
            emit(DraftProposed(t=_secs(req, end), pos=c.n_new + len(drafts), token_id=token,
                               text=draft.text(token), top=draft.top(logits[0])))
            drafts.append(token)
            if token in req.eos_ids:
                break
        start_pos = c.n_new
        accepted = verify(req, c, target, device, drafts, emit)
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
    logits, fed, start, end = target.forward(c.seq, 1)
    emit(_forward_event(req, "target", device, "prefill", fed, start, end))
    c.commit([int(logits[0].argmax())], ["decoded"], [target.top(logits[0])])
    shared.publish_committed(c.seq, n_prompt, done=c.done)
    pace = Pace()
    while not c.done:
        limit = min(req.lookahead, c.remaining - 1)
        drafts = shared.read_drafts(c.seq, n_prompt, limit)
        if req.wait_steps and limit > 0 and shared.draft_alive:
            step = shared.draft_step_s()
            want = pace.drafts_worth_waiting_for(step, limit)
            if len(drafts) < want:
                drafts = shared.wait_for_drafts(c.seq, n_prompt, limit, want,
                                                req.wait_steps * (want - len(drafts)) * step)
        before = c.n_new
        accepted = verify(req, c, target, device, drafts, emit)
        shared.publish_committed(c.seq, n_prompt, done=c.done)
        pace.observe(len(drafts), accepted, c.n_new - before)
    return c.outcome


def amusd_draft_loop(req: Request, draft: Runner, device: str, shared, emit: Emit) -> int:
    """The drafter: keeps proposing from its own sequence; when the target commits a token that
    differs from its own at some position, it drops its tokens (and cache) from there, adopts
    the target's tokens and drafts on. Waits (blocking, no spinning) only when it is far enough
    ahead, at the token budget, or after proposing EOS. Returns the number of forward passes."""
    draft.begin()
    n_prompt = len(req.prompt_ids)
    seq = list(req.prompt_ids)
    max_ahead = req.max_ahead or 2 * req.lookahead
    passes = 0
    while True:
        shared.clear_wakeup()
        committed, done = shared.read_committed(req.prompt_ids)
        if done:
            return passes
        n_committed = len(committed)
        mismatch = next((i for i in range(n_prompt, min(len(seq), n_committed))
                         if seq[i] != committed[i]), None)
        if mismatch is not None:
            emit(Rollback(t=_secs(req, time.perf_counter_ns()), to_pos=mismatch - n_prompt,
                          discarded=seq[mismatch:]))
            seq = committed
            shared.publish_drafts(seq, n_prompt)
        elif n_committed > len(seq):
            seq = seq + committed[len(seq):]  # the target decoded past our drafts: adopt
        generated = len(seq) - n_prompt
        if (len(seq) - n_committed >= max_ahead or generated >= req.max_new_tokens
                or (generated and seq[-1] in req.eos_ids)):
            shared.wait_wakeup(0.5)
            continue
        logits, fed, start, end = draft.forward(seq, 1)
        passes += 1
        emit(_forward_event(req, "draft", device, "prefill" if passes == 1 else "draft",
                            fed, start, end))
        token = int(logits[0].argmax())
        seq = [*seq, token]
        shared.publish_drafts(seq, n_prompt, step_s=(end - start) / 1e9 if fed == 1 else None)
        emit(DraftProposed(t=_secs(req, end), pos=len(seq) - 1 - n_prompt, token_id=token,
                           text=draft.text(token), top=draft.top(logits[0])))


def hf_loop(req: Request, target: Runner, draft: Runner | None, device: str, emit: Emit) -> Outcome:
    """Plain transformers `generate` (draft None) or its assisted generation with the same draft:
    the baselines users would otherwise reach for. Only the committed tokens are reported."""
    import torch

    model = target.model
    kwargs = {}
    if draft is not None:
        # transformers 5.x reads these from the assistant's generation_config; a fixed number of
        # draft tokens (the lookahead) beats its adaptive default on this kind of machine
        # (docs/benchmarks.md), so the peer gets its better setting.
        draft.model.generation_config.num_assistant_tokens = req.lookahead
        draft.model.generation_config.num_assistant_tokens_schedule = "constant"
        kwargs["assistant_model"] = draft.model
    ids = torch.tensor([req.prompt_ids], device=target.device)
    start = time.perf_counter_ns()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=req.max_new_tokens, do_sample=False,
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
