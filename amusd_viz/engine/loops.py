"""The generation loops: lossless, greedy or sampled, emitting events.

Every committed token comes from the target's own choice (its argmax, its seeded sample, or the
rejection rule's draw; engine/sampling.py), so each strategy's output is the target's own
decoding. The loops differ only in where draft tokens come from and when:
- `ar_loop`: the target alone, one token per pass.
- `sync_loop`: draft k tokens, then verify them in one target pass (one process, both models).
- `amusd_target_loop` / `amusd_draft.amusd_draft_loop`: two processes running at once, sharing
  the committed and the drafted sequences through `SharedState` (engine/shared.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from amusd_viz.engine.guess import Guesser
from amusd_viz.engine.lending import borrowed
from amusd_viz.engine.runner import Runner
from amusd_viz.engine.sampling import GREEDY, Check, Sampler, SamplingParams, Verdict
from amusd_viz.engine.tree import bare_bets, within
from amusd_viz.events import (
    Candidate,
    DraftProposed,
    Forward,
    Rollback,
    TokenCommitted,
    VerifyResult,
)

Emit = Callable[[object], None]

# tree passes (sync and amusd): at most this many tokens in one target pass (the drafts' and
# the bets'). On one CPU core the 1.5B target's pass costs ~310 ms for 1 to 13 tokens, 350 for
# 17, 380 for 25 (docs/benchmarks.md): past a dozen, each branch token starts to cost time.
TREE_TOKENS = 12


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
    # sync and amusd: draft only as far as the draft's confidence makes it worth it (DraftBudget,
    # speccache.Planner)
    adaptive: bool = False
    spec_cache: bool = False  # amusd: prepare drafts for the likeliest rejections (speccache)
    siblings: bool = True  # with the cache: a bet fed beside each main-line draft (speccache)
    # tree passes: the target checks the draft's other likely tokens (amusd with the cache: and
    # its branches) in the pass that checks its drafts (engine/tree.py)
    tree: bool = True
    # sync and amusd: a lookup guesses the draft's next tokens and the draft checks the guesses
    # in its own pass (engine/guess.py)
    lookup: bool = False


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
           emit: Emit, sampler: Sampler, q_rows: list | None = None,
           stopped: str | None = None, cached: bool = False, paths: Sequence = ()) -> int:
    """One target pass over [last committed] + drafts: judge, commit, report. Returns how many
    drafts were accepted. With `paths` (bets beside the drafts, engine/tree.TreePath), the same
    pass also checks each; where the target rejects a draft and picks exactly the token a path
    bets on there, the verdict goes on along that path's drafts."""
    tree = [(p.anchor, [p.token, *p.drafts]) for p in paths]
    logits, fed, start, end = target.forward(c.seq + drafts, len(drafts) + 1, paths=tree)
    emit(_forward_event(req, "target", device, "verify" if drafts else "decode",
                        fed + sum(len(t) for _, t in tree), start, end))
    start_pos = c.n_new
    main = logits[:len(drafts) + 1]
    verdict = sampler.verdict(main, drafts, start_pos, q_rows or [])
    tokens, hows = list(verdict.tokens), list(verdict.hows)
    tops = _tops(target, main, verdict, sampler)
    taken, row = None, len(drafts) + 1
    for path in paths:
        if verdict.accepted < len(drafts) and _goes_on(path, len(c.seq) + verdict.accepted,
                                                       verdict.tokens[-1]):
            # its rows are the target's logits after the bet, as a next pass would compute them
            rows = logits[row:row + 1 + len(path.drafts)]
            taken = sampler.verdict(rows, path.drafts, start_pos + len(verdict.tokens),
                                    path.q_rows)
            tokens += taken.tokens
            hows += taken.hows
            tops += _tops(target, rows, taken, sampler)
            break
        row += 1 + len(path.drafts)
    committed = c.commit(tokens, hows, tops)
    emit(VerifyResult(t=_secs(req, end), start_pos=start_pos, proposed=drafts,
                      accepted=verdict.accepted, committed=committed, draft_stop=stopped,
                      from_cache=cached, tree_paths=len(paths),
                      tree_root=start_pos + verdict.accepted if taken else None,
                      tree_proposed=path.drafts if taken else [],
                      tree_accepted=taken.accepted if taken else 0,
                      **_check_fields([*verdict.checks, *(taken.checks if taken else [])])))
    sampler.noise.forget_before(c.n_new)
    return verdict.accepted


def _goes_on(path, anchor: int, pick: int) -> bool:
    """Whether a tree pass's verdict goes on along `path`: the branch leaves the line where
    the target rejected a draft, with the very token the target picked there."""
    return path.anchor == anchor and path.token == pick


def _check_fields(checks: list[Check]) -> dict:
    """Why each checked draft token was accepted or not (empty lists when greedy): the main
    line's, then a tree path's the verdict went on along (its first draft sits right after the
    bet, so entry i is still position start_pos + i)."""
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


def choose(draft: Runner, sampler: Sampler, logits_row, pos: int):
    """The draft's proposal at `pos`: (token, q row or None, the draft's probability of it, its
    top candidates)."""
    if sampler.params.greedy:  # the top-5's head is the proposal: one copy to the host
        top = draft.top(logits_row)
        return top[0]["id"], None, float(top[0]["p"]), top
    token, q_x, q = sampler.propose(logits_row, pos)
    assert q is not None and q_x is not None  # a sampler gives q whenever it samples
    return token, q, q_x, draft.top_of_probs(q)


def proposal_event(req: Request, draft: Runner, step: Step, pos: int, end_ns: int,
                   branch_root: int | None = None, guessed: bool = False) -> DraftProposed:
    match = getattr(draft, "last", None)  # the n-gram drafter: where it copied from
    return DraftProposed(t=_secs(req, end_ns), pos=pos, token_id=step.token,
                         text=draft.text(step.token), top=step.top,
                         q=round(step.conf, 6),
                         ngram_n=match.n if match else None,
                         ngram_from=match.end if match else None,
                         cached=branch_root is not None, branch_root=branch_root,
                         guessed=guessed)


@dataclass
class Step:
    """One draft proposal and what the adaptive policies need to know about it."""

    token: int
    q: object  # the draft's q row when sampling (torch tensor), else None
    secs: float | None  # the pass's length when it fed one token (the draft's step time)
    conf: float  # the draft's own probability of the token
    alt: int  # its guess at the target's token should this one be rejected
    alt_p: float  # the draft's probability of that guess
    top: list = field(default_factory=list)  # the draft's top candidates there
    end_ns: int = 0  # when the pass ended
    beside: Step | None = None  # the proposal after a sibling fed in the same pass

    def others(self) -> list[int]:
        """The draft's other likely tokens here, its runner-up first: bets on the target's
        pick should it reject this one."""
        first = [self.alt] if self.alt != self.token else []
        return [*first, *(c["id"] for c in self.top
                          if c["id"] not in (self.token, self.alt) and c["p"] > 0)]


def draft_step(req: Request, draft: Runner, seq: list[int], sampler: Sampler, device: str,
               emit: Emit, first: bool, phase: str | None = None,
               sibling: int | None = None) -> Step | None:
    """One draft step on `seq` (a model pass, or a lookup), or None when the drafter has
    nothing to propose (the n-gram drafter found no match). See `draft_steps`."""
    steps = draft_steps(req, draft, seq, sampler, device, emit, first, phase, sibling)
    return steps[0] if steps else None


def draft_steps(req: Request, draft: Runner, seq: list[int], sampler: Sampler, device: str,
                emit: Emit, first: bool, phase: str | None = None, sibling: int | None = None,
                guesser: Guesser | None = None, room: int = 0,
                on_step: Callable[[int, Step], None] | None = None) -> list[Step]:
    """One draft pass on `seq`: its proposals (none when the n-gram drafter found no match).
    Emits the pass and, unless it is a branch step (`phase` "branch": the caller reports it),
    the proposals. With a `guesser` (engine/guess.py) the pass also feeds up to `room` lookup
    guesses after seq: while the draft's choice equals the guess, the next row is its own next
    step, so the pass drafts one token more per guess held; the guesser learns how many held.
    With `sibling` (a token in place of seq's last, engine/speccache.py), the same pass also
    drafts after it: the first step's `beside`.

    `on_step(i, step)` runs as soon as the i-th proposal is chosen, before the next is: amusd
    publishes there, so when a draft becomes visible never depends on its own value (whether
    it matched a guess decides only whether a later draft exists; docs/protocol.md, "What may
    decide which drafts the target sees")."""
    guesses = guesser.guesses(seq, room) if guesser is not None else []
    line = [*seq, *guesses]
    paths = [(len(seq) - 1, [sibling])] if sibling is not None else []
    logits, fed, start, end = (draft.forward(line, len(guesses) + 1, paths=paths) if paths
                               else draft.forward(line, len(guesses) + 1))
    phase = phase or draft.phase_name or ("prefill" if first else "draft")
    emit(_forward_event(req, "draft", device, phase, fed, start, end))
    if logits is None:
        return []
    pos = len(seq) - len(req.prompt_ids)
    secs = (end - start) / 1e9 if fed == 1 else None
    steps: list[Step] = []
    for i in range(len(guesses) + 1):
        if i and (steps[-1].token != guesses[i - 1] or guesses[i - 1] in req.eos_ids):
            break  # the guess before this row missed: the row is not the draft's own step
        step = _step(draft, sampler, logits[i], pos + i, secs if i == 0 else None, end)
        steps.append(step)
        if on_step is not None:
            on_step(i, step)
        if phase != "branch":
            emit(proposal_event(req, draft, step, pos + i, end, guessed=i > 0))
    if guesser is not None:
        guesser.observe(guesses, [step.token for step in steps])
    if sibling is not None:
        steps[0].beside = _step(draft, sampler, logits[len(guesses) + 1], pos, secs, end)
    return steps


def _step(draft: Runner, sampler: Sampler, row, pos: int, secs: float | None,
          end: int) -> Step:
    token, q, conf, top = choose(draft, sampler, row, pos)
    alt, alt_p = sampler.runner_up(token, pos, q, top)
    return Step(token, q, secs, conf, alt, alt_p, top, end)


class Calibration:
    """How well the draft's own confidence (its probability of each token it proposes) has
    predicted acceptance so far in this run: accepted drafts / the sum of their confidences,
    over checked drafts (the accepted ones and the first rejected one), with a prior of 1 and a
    fading memory. A sharp draft is often surer than it should be; a tiny one, or one sampled
    at a high temperature, is often right with a low probability."""

    LOW, HIGH = 0.2, 5.0

    def __init__(self) -> None:
        self.predicted, self.accepted, self.checked = 2.0, 2.0, 2.0

    def observe(self, confs: list[float], accepted: int) -> None:
        """`confs`: the checked drafts' confidences, in order; the first `accepted` passed."""
        self.predicted = 0.9 * self.predicted + sum(confs)
        self.accepted = 0.9 * self.accepted + accepted
        self.checked = 0.9 * self.checked + len(confs)

    @property
    def acceptance(self) -> float:
        """Accepted drafts per checked draft, lately (1 before any verdict)."""
        return self.accepted / self.checked

    @property
    def factor(self) -> float:
        return min(self.HIGH, max(self.LOW, self.accepted / self.predicted))

    def chance(self, conf: float) -> float:
        """The chance a draft of this confidence is accepted, by this run's record."""
        return min(1.0, conf * self.factor)


class DraftBudget:
    """How far `sync` drafts (adaptive lookahead): after k drafts whose chance of all being
    accepted is P_k (the product of the draft's calibrated confidences), one more draft costs a
    draft step and adds at most P_k expected tokens; it is worth it while P_k / draft_s beats the
    pass's expected rate, E_k / (k * draft_s + verify_s), with E_k = 1 + P_1 + ... + P_k. On a CPU
    a verify pass of up to ~8 tokens costs about one token's pass, so the lookahead stays the
    upper bound."""

    def __init__(self) -> None:
        self.draft_s: float | None = None
        self.verify_s: float | None = None
        self.calibration = Calibration()

    @staticmethod
    def _avg(old: float | None, new: float) -> float:
        return new if old is None else 0.8 * old + 0.2 * new

    def observe_draft(self, secs: float | None) -> None:
        if secs is not None:
            self.draft_s = self._avg(self.draft_s, secs)

    def observe_verify(self, secs: float, confs: list[float], accepted: int) -> None:
        self.verify_s = self._avg(self.verify_s, secs)
        self.calibration.observe(confs[:accepted + 1], accepted)

    def survivals(self, confs: list[float]) -> list[float]:
        out, p = [], 1.0
        for conf in confs:
            p *= self.calibration.chance(conf)
            out.append(p)
        return out

    def one_more(self, confs: list[float]) -> bool:
        if not confs or self.draft_s is None or self.verify_s is None:
            return True
        survivals = self.survivals(confs)
        k = len(confs)
        rate = (1 + sum(survivals)) / (k * self.draft_s + self.verify_s)
        return survivals[-1] / self.draft_s >= rate


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
    budget = DraftBudget()
    guesser = Guesser(req.lookup and draft.model is not None)
    while not c.done:
        drafts: list[int] = []
        q_rows: list = []
        confs: list[float] = []
        others: list[list[int]] = []
        stopped = None
        limit = min(req.lookahead, c.remaining - 1)
        while len(drafts) < limit:
            if req.adaptive and not budget.one_more(confs):
                stopped = "confidence"
                break
            steps = draft_steps(req, draft, c.seq + drafts, sampler, device, emit, first,
                                guesser=guesser, room=limit - len(drafts) - 1)
            first = False
            if not steps:
                break
            for step in steps:
                budget.observe_draft(step.secs)
                drafts.append(step.token)
                q_rows.append(step.q)
                confs.append(step.conf)
                others.append(step.others())
            if drafts[-1] in req.eos_ids:
                break
        start_pos = c.n_new
        started = time.perf_counter()
        # the draft's other likely tokens, checked in the same pass (engine/tree.py)
        bets = (within(bare_bets(len(c.seq), drafts, others), TREE_TOKENS - len(drafts) - 1)
                if req.tree else [])
        accepted = verify(req, c, target, device, drafts, emit, sampler, q_rows, stopped,
                          paths=bets)
        budget.observe_verify(time.perf_counter() - started, confs, accepted)
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
    lookahead), or else those of a speculation-cache branch that bet on the verdict it has just
    reached (engine/speccache.py); with none, it decodes one token on its own. With the cache,
    the same pass also checks the branches that leave its line at one of its drafts (a token
    tree, `verify`). It waits for drafts only when `wait_steps` > 0 (an experiment; see Pace)."""
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
    cache_lookup = req.spec_cache and not shared.one_device
    while not c.done:
        # one device: wait for the draft's turn to end, then read the drafts it made
        shared.wait_turn("target", stop=draft_gone)
        limit = min(req.lookahead, c.remaining - 1)
        drafts = shared.read_drafts(c.seq, n_prompt, limit)
        cached = False
        q_rows: list = []
        if not drafts and cache_lookup:
            # the draft has not rolled back yet: a branch may have bet on this very verdict
            drafts, q_rows = shared.read_branch_drafts(c.seq, n_prompt, limit)
            cached = bool(drafts)
        if req.wait_steps and not cached and limit > 0 and shared.draft_alive:
            step = shared.draft_step_s()
            want = pace.drafts_worth_waiting_for(step, limit)
            if len(drafts) < want:
                drafts = shared.wait_for_drafts(c.seq, n_prompt, limit, want,
                                                req.wait_steps * (want - len(drafts)) * step)
        if drafts and not req.sampling.greedy and not cached:
            # the q of each draft, as the draft published it; a row already overwritten by a
            # rollback ends the drafts there
            q_rows = shared.read_q_rows(c.n_new, drafts)
            drafts = drafts[:len(q_rows)]
        # the cache's branches and the draft's other likely tokens (on one device, only these:
        # sync's bets, as the turns are sync's schedule)
        paths = (shared.read_tree_paths(c.seq, n_prompt, drafts, TREE_TOKENS - len(drafts) - 1)
                 if req.tree and (cache_lookup or shared.one_device) else [])
        before = c.n_new
        # two CPU cores: a pass the draft sits out runs on both (engine/lending.py)
        with borrowed(shared.loan, len(c.seq)) as lent:
            accepted = verify(req, c, target, f"{device}+cpu:{shared.loan.core}" if lent else device,
                              drafts, emit, sampler, q_rows, cached=cached, paths=paths)
        shared.publish_committed(c.seq, n_prompt, done=c.done)
        shared.pass_turn("draft")
        pace.observe(len(drafts), accepted, c.n_new - before)
    return c.outcome


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
