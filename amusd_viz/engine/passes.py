"""The mechanics every loop shares: a target pass that judges drafts and commits the target's
tokens (`Verifier`), a draft pass that proposes (`Drafter`), and the events they emit.

Every committed token is the target's own choice (its argmax, its seeded sample, or the
rejection rule's draw; engine/sampling.py), so each strategy's output is the target's own
decoding whatever the drafts were.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from amusd_viz.engine.guess import Guesser
from amusd_viz.engine.request import Outcome, Request
from amusd_viz.engine.runner import Runner
from amusd_viz.engine.sampling import Check, Sampler, Verdict
from amusd_viz.events import Candidate, DraftProposed, Forward, Rollback, TokenCommitted, VerifyResult

Emit = Callable[[object], None]

# tree passes (sync and amusd): at most this many tokens in one target pass (the drafts' and
# the bets'). On one CPU core the 1.5B target's pass costs ~310 ms for 1 to 13 tokens, 350 for
# 17, 380 for 25 (docs/benchmarks.md): past a dozen, each branch token starts to cost time.
TREE_TOKENS = 12


def forward_event(req: Request, role: str, device: str, phase: str, n: int, start: int,
                  end: int, lent: bool = False) -> Forward:
    return Forward(t=req.secs(start), role=role, device=device, dur=(end - start) / 1e9,
                   phase=phase, n_tokens=n, lent=lent)


def rollback_event(req: Request, to_pos: int, discarded: list[int]) -> Rollback:
    return Rollback(t=req.secs(time.perf_counter_ns()), to_pos=to_pos, discarded=discarded)


def sampler_for(req: Request, runner: Runner) -> Sampler:
    return Sampler(req.sampling, req.vocab or runner.vocab)


class Committer:
    """Appends the target's tokens, emits token_committed, and knows when to stop."""

    def __init__(self, req: Request, runner: Runner, emit: Emit) -> None:
        self.req, self.runner, self.emit = req, runner, emit
        self.seq = list(req.prompt_ids)
        self.outcome = Outcome()

    @property
    def n_new(self) -> int:
        return len(self.seq) - self.req.n_prompt

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
            self.emit(TokenCommitted(t=self.req.secs(now), pos=pos, token_id=token,
                                     text=self.runner.text(token), how=how,
                                     top=[Candidate(**c) for c in top]))
            if token in self.req.eos_ids:
                self.outcome.stop_reason = "eos"
            elif self.remaining <= 0:
                self.outcome.stop_reason = "max_new_tokens"
        self.outcome.token_ids = self.seq[self.req.n_prompt:]
        self.outcome.end_ns = now
        return taken


@dataclass
class Judged:
    """What one target pass decided: the main line's verdict, and a tree path's it went on
    along (None when it did not)."""

    verdict: Verdict
    path: object = None  # the engine/tree.TreePath
    along: Verdict | None = None
    tokens: list[int] = field(default_factory=list)
    hows: list[str] = field(default_factory=list)
    tops: list[list[dict]] = field(default_factory=list)


class Verifier:
    """The target's passes for one run: each judges drafts and commits the target's tokens."""

    def __init__(self, req: Request, target: Runner, device: str, emit: Emit) -> None:
        self.req, self.target, self.device, self.emit = req, target, device, emit
        self.c = Committer(req, target, emit)
        self.sampler = sampler_for(req, target)
        self.greedy = self.sampler.params.greedy  # the host reads the logits' top candidates

    def first_token(self, phase: str = "prefill", lent: bool = False) -> None:
        """One pass with no drafts: the prompt's prefill, or a plain decode step."""
        logits, fed, start, end = self.target.forward(self.c.seq, 1, tops=self.greedy)
        self.emit(forward_event(self.req, "target", self.device, phase, fed, start, end, lent))
        read = self.target.read  # the pass's argmax and top candidates, already on the host
        token, probs = self.sampler.own(logits[0], self.c.n_new, read.argmax[0])
        top = read.tops[0] if probs is None else self.target.top_of_probs(probs)
        self.c.commit([token], ["decoded"], [top])
        self.sampler.noise.forget_before(self.c.n_new)

    def check(self, drafts: list[int], q_rows: list | None = None, paths: Sequence = (),
              stopped: str | None = None, cached: bool = False, lent: bool = False) -> int:
        """One target pass over [last committed] + drafts: judge, commit, report. Returns how
        many drafts were accepted. With `paths` (bets beside the drafts, engine/tree.TreePath),
        the same pass also checks each; where the target rejects a draft and picks exactly the
        token a path bets on there, the verdict goes on along that path's drafts."""
        tree = [(p.anchor, [p.token, *p.drafts]) for p in paths]
        logits, fed, start, end = self.target.forward(self.c.seq + drafts, len(drafts) + 1,
                                                      paths=tree, tops=self.greedy)
        self.emit(forward_event(self.req, "target", self.device, "verify" if drafts else "decode",
                                fed + sum(len(t) for _, t in tree), start, end, lent))
        start_pos = self.c.n_new
        judged = self._judge(logits, drafts, start_pos, q_rows or [], paths)
        committed = self.c.commit(judged.tokens, judged.hows, judged.tops)
        self.emit(_verify_result(self.req.secs(end), start_pos, drafts, judged, committed,
                                 stopped, cached, len(paths)))
        self.sampler.noise.forget_before(self.c.n_new)
        return judged.verdict.accepted

    def _judge(self, logits, drafts: list[int], start_pos: int, q_rows: list,
               paths: Sequence) -> Judged:
        read, row = self.target.read, len(drafts) + 1  # the pass's rows as the host read them
        verdict = self.sampler.verdict(logits[:row], drafts, start_pos, q_rows, read.argmax[:row])
        judged = Judged(verdict, tokens=list(verdict.tokens), hows=list(verdict.hows),
                        tops=self._tops(read.tops[:row], verdict))
        if verdict.accepted == len(drafts):
            return judged
        for path in paths:
            if _goes_on(path, len(self.c.seq) + verdict.accepted, verdict.tokens[-1]):
                # its rows are the target's logits after the bet, as a next pass would compute them
                last = row + 1 + len(path.drafts)
                along = self.sampler.verdict(logits[row:last], path.drafts,
                                             start_pos + len(verdict.tokens), path.q_rows,
                                             read.argmax[row:last])
                judged.path, judged.along = path, along
                judged.tokens += along.tokens
                judged.hows += along.hows
                judged.tops += self._tops(read.tops[row:last], along)
                break
            row += 1 + len(path.drafts)
        return judged

    def _tops(self, tops: list[list[dict]], verdict: Verdict) -> list[list[dict]]:
        """The target's top candidates at each committed position: of p when sampling."""
        n = len(verdict.tokens)
        if verdict.probs is None:
            return tops[:n]
        return self.target.tops_of_probs(verdict.probs[:n])


def _goes_on(path, anchor: int, pick: int) -> bool:
    """Whether a tree pass's verdict goes on along `path`: the branch leaves the line where
    the target rejected a draft, with the very token the target picked there."""
    return path.anchor == anchor and path.token == pick


def _verify_result(t: float, start_pos: int, drafts: list[int], judged: Judged,
                   committed: list[int], stopped: str | None, cached: bool,
                   n_paths: int) -> VerifyResult:
    verdict, along = judged.verdict, judged.along
    return VerifyResult(t=t, start_pos=start_pos, proposed=drafts, accepted=verdict.accepted,
                        committed=committed, draft_stop=stopped, from_cache=cached,
                        tree_paths=n_paths,
                        tree_root=start_pos + verdict.accepted if along else None,
                        tree_proposed=judged.path.drafts if along else [],  # type: ignore[attr-defined]
                        tree_accepted=along.accepted if along else 0,
                        **_check_fields([*verdict.checks, *(along.checks if along else [])]))


def _check_fields(checks: list[Check]) -> dict:
    """Why each checked draft token was accepted or not (empty lists when greedy): the main
    line's, then a tree path's the verdict went on along (its first draft sits right after the
    bet, so entry i is still position start_pos + i)."""
    return {"p": [round(k.p, 6) for k in checks], "q": [round(k.q, 6) for k in checks],
            "accept_prob": [round(k.accept_prob, 6) for k in checks],
            "u": [round(k.u, 6) for k in checks if k.u is not None],
            "overlap": [round(k.overlap, 6) for k in checks if k.overlap is not None]}


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


class Drafter:
    """The draft's passes for one run (a model's, or the n-gram drafter's lookups)."""

    def __init__(self, req: Request, draft: Runner, sampler: Sampler, device: str, emit: Emit,
                 guesser: Guesser | None = None) -> None:
        self.req, self.draft, self.sampler, self.device, self.emit = req, draft, sampler, device, emit
        self.guesser = guesser or Guesser(False)
        self.fed = False  # the first main-line pass is the draft's prefill

    def steps(self, seq: list[int], phase: str | None = None,
              sibling: int | None = None, room: int = 0, runner: Runner | None = None,
              on_step: Callable[[int, Step], None] | None = None) -> list[Step]:
        """One draft pass on `seq` (by `runner`, default the draft; a branch's fork): its
        proposals (none when the n-gram drafter found no match). Emits the pass and, unless it
        is a branch step (`phase` "branch": the caller reports it), the proposals. With `room`,
        the pass also feeds up to that many lookup guesses after seq (engine/guess.py): while
        the draft's choice equals the guess, the next row is its own next step. With `sibling`
        (a token in place of seq's last, engine/speccache.py), the same pass also drafts after
        it: the first step's `beside`.

        `on_step(i, step)` runs as soon as the i-th proposal is chosen, before the next is:
        amusd publishes there, so when a draft becomes visible never depends on its own value
        (docs/protocol.md, "What may decide which drafts the target sees")."""
        runner = runner or self.draft
        guesses = self.guesser.guesses(seq, room)
        paths = [(len(seq) - 1, [sibling])] if sibling is not None else []
        logits, fed, start, end = runner.forward([*seq, *guesses], len(guesses) + 1, paths=paths,
                                                 tops=self.sampler.params.greedy)
        phase = phase or runner.phase_name or ("draft" if self.fed else "prefill")
        self.fed = True
        self.emit(forward_event(self.req, "draft", self.device, phase, fed, start, end))
        if logits is None:
            return []
        secs = (end - start) / 1e9 if fed == 1 else None
        steps = self._choose_rows(runner, logits, seq, guesses, secs, end, phase, on_step)
        self.guesser.observe(guesses, [step.token for step in steps])
        if sibling is not None:
            steps[0].beside = self._step(runner, logits, len(guesses) + 1,
                                         len(seq) - self.req.n_prompt, secs, end)
        return steps

    def _choose_rows(self, runner: Runner, logits, seq: list[int], guesses: list[int],
                     secs: float | None, end: int, phase: str, on_step) -> list[Step]:
        """The pass's proposals, row by row, while each guess held."""
        pos = len(seq) - self.req.n_prompt
        steps: list[Step] = []
        for i in range(len(guesses) + 1):
            if i and (steps[-1].token != guesses[i - 1] or guesses[i - 1] in self.req.eos_ids):
                break  # the guess before this row missed: the row is not the draft's own step
            step = self._step(runner, logits, i, pos + i, secs if i == 0 else None, end)
            steps.append(step)
            if on_step is not None:
                on_step(i, step)
            if phase != "branch":
                self.emit(proposal_event(self.req, runner, step, pos + i, end, guessed=i > 0))
        return steps

    def _step(self, runner: Runner, logits, i: int, pos: int, secs: float | None,
              end: int) -> Step:
        token, q, conf, top = choose(runner, self.sampler, logits[i], pos, runner.read.tops[i])
        alt, alt_p = self.sampler.runner_up(token, pos, q, top)
        return Step(token, q, secs, conf, alt, alt_p, top, end)


def choose(draft: Runner, sampler: Sampler, logits_row, pos: int, top: list[dict]):
    """The draft's proposal at `pos`: (token, q row or None, the draft's probability of it, its
    top candidates). `top`: the row's top candidates, as the host read them (Runner.read)."""
    if sampler.params.greedy:  # the top-5's head is the proposal
        return top[0]["id"], None, float(top[0]["p"]), top
    token, q_x, q = sampler.propose(logits_row, pos)
    assert q is not None and q_x is not None  # a sampler gives q whenever it samples
    return token, q, q_x, draft.top_of_probs(q)


def proposal_event(req: Request, draft: Runner, step: Step, pos: int, end_ns: int,
                   branch_root: int | None = None, guessed: bool = False) -> DraftProposed:
    match = getattr(draft, "last", None)  # the n-gram drafter: where it copied from
    return DraftProposed(t=req.secs(end_ns), pos=pos, token_id=step.token,
                         text=draft.text(step.token), top=step.top, q=round(step.conf, 6),
                         ngram_n=match.n if match else None,
                         ngram_from=match.end if match else None,
                         cached=branch_root is not None, branch_root=branch_root,
                         guessed=guessed)
