"""The harness of test_lossless_paths.py: every path a judged draft can come through, run many
times with seeds, against the target's exact distribution (sampling_cases.py has the bound).

- `Case`: a prompt, sampling settings and a token budget long enough that an accepted draft is
  followed by another judged one; the first `outcome` tokens are compared.
- `run_sync` / `run_amusd`: the loops in this process (amusd's two loops in two threads over a
  real SharedState and the plan's schedule, `make_link`: `PacedShared` only slows the target by
  a fixed time after each commit, so timing selection can show; `SlowTarget` makes each target
  pass longer; one device; lending). `watch_visibility` checks that a draft is
  published before the draft chooses the next step of its pass.
- `Paths`: counts, from the events, how many judged tokens came through each path, so a test
  cannot pass by not taking its path.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from amusd_viz.config import SamplingParams
from amusd_viz.engine.loops import amusd_draft_loop, amusd_target_loop, sync_loop
from amusd_viz.engine.passes import Drafter, Verifier
from amusd_viz.engine.plan import Plan, resolve
from amusd_viz.engine.policies import schedule_for
from amusd_viz.engine.request import Request
from amusd_viz.engine.sampling import processed
from amusd_viz.engine.schedule import Concurrent
from amusd_viz.engine.shared import SharedState


@dataclass(frozen=True)
class Case:
    prompt: tuple[int, ...]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 3  # three outcomes a position: the first tokens can be enumerated
    max_new: int = 5
    lookahead: int = 3
    outcome: int = 3  # the first tokens compared (position 0 is the prefill's, then drafts)

    def params(self, seed: int = 0, rule: str = "rejection") -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, seed, rule)

    def request(self, seed: int, rule: str = "rejection", plan: Plan | None = None) -> Request:
        plan = plan or Plan()
        return Request(list(self.prompt), self.max_new, self.lookahead, frozenset(), 0,
                       max_ahead=plan.max_ahead(self.lookahead), sampling=self.params(seed, rule),
                       plan=plan)


def plan_of(strategy: str, shared_device: bool = False, loan_core: int | None = None,
            **flags) -> Plan:
    """A plan with every switch off but `flags` (RunConfig's names)."""
    off = {"adaptive": False, "spec_cache": False, "tree": False, "draft_lookup": False}
    return resolve(strategy, **{**off, **flags}, shared_device=shared_device,
                   loan_core=loan_core)


def exact_distribution(target, case: Case) -> dict[tuple[int, ...], float]:
    """The target's own distribution of the case's first `outcome` tokens, by enumeration."""
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(case.outcome):
        grown = {}
        for head, mass in out.items():
            target.begin()
            logits, *_ = target.forward([*case.prompt, *head], 1)
            p = processed(logits[0], case.params())
            for token in torch.nonzero(p).flatten().tolist():
                grown[(*head, token)] = mass * float(p[token])
        out = grown
    return out


@dataclass
class Paths:
    """Judged tokens per path, from the events of both workers (a sink for each)."""

    counts: Counter = field(default_factory=Counter)
    _guessed: dict[int, tuple[int, bool]] = field(default_factory=dict)
    _lent: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, e) -> None:
        with self._lock:
            if e.type == "draft_proposed":
                self._guessed[e.pos] = (e.token_id, e.guessed)
            elif e.type == "forward" and e.role == "target":
                self._lent = e.lent
            elif e.type == "verify_result":
                self._verdict(e)

    def _verdict(self, e) -> None:
        main = min(len(e.proposed), e.accepted + 1)
        c = self.counts
        c["judged"] += len(e.p)
        c["second"] += max(0, main - 1)  # a draft judged after an accepted one in its pass
        c["cache"] += main if e.from_cache else 0
        c["confidence"] += main if e.draft_stop == "confidence" else 0
        c["lent"] += main if self._lent else 0
        if e.tree_root is not None:  # committed through a bet's rows, its drafts judged there
            c["tree"] += 1 + min(len(e.tree_proposed), e.tree_accepted + 1)
        c["guessed"] += sum(self._guessed.get(e.start_pos + i) == (token, True)
                            for i, token in enumerate(e.proposed[:main]))

    def reset_run(self) -> None:
        self._guessed.clear()


def run_sync(target, draft, case: Case, seed: int, paths: Paths | None = None,
             rule: str = "rejection", **flags) -> tuple[int, ...]:
    emit = paths or (lambda e: None)
    if paths is not None:
        paths.reset_run()
    req = case.request(seed, rule, plan_of("sync", **flags))
    out = sync_loop(req, target, draft, ("cpu", "cpu"), emit)
    return tuple(out.token_ids[:case.outcome])


# amusd's schedules -------------------------------------------------------------------------------

def _ctx():
    return mp.get_context("spawn")


class PacedShared(SharedState):
    """No helper that waits for drafts: the target only sleeps a fixed time after each commit
    (a tiny target would otherwise decode alone before the draft thread runs), whatever the
    drafts are. What the target reads then is whatever the draft has published."""

    PACE_S = 0.002

    def publish_committed(self, seq, n_prompt, done):
        super().publish_committed(seq, n_prompt, done)
        if not done:
            time.sleep(self.PACE_S)


def draft_step_s(runner, prompt: tuple[int, ...]) -> float:
    """This host's time for one draft step past `prompt` (median of five). The paced target
    must leave the draft a few steps between verdicts for the draft to be seen at all: ~1 ms a
    step on the Xeon, several on a CPU without AVX-512."""
    runner.begin()
    seq = list(prompt)
    runner.forward(seq)  # the prefill
    times = []
    for token in prompt[:5]:
        seq.append(token)
        start = time.perf_counter()
        runner.forward(seq)
        times.append(time.perf_counter() - start)
    runner.begin()
    return sorted(times)[len(times) // 2]


def watch_visibility(monkeypatch, shared: SharedState) -> Counter:
    """Check, each time amusd's draft is about to choose a step that is not its pass's first
    (only after a lookup guess held), that every draft it chose before in that pass is already
    published: counts `later steps` and `hidden` (a chosen draft the target could not see)."""
    from amusd_viz.engine.shared import DRAFTS_LEN

    original_step, original_steps = Drafter._step, Drafter.steps
    seen, in_pass = Counter(), threading.local()

    def step(self, *args, **kwargs):
        line = getattr(in_pass, "line", None)
        if line is not None:
            if in_pass.steps:
                seen["later steps"] += 1
                published = int(shared.meta[DRAFTS_LEN])
                seen["hidden"] += max(0, line + in_pass.steps - published)
            in_pass.steps += 1
        return original_step(self, *args, **kwargs)

    def steps(self, seq, *args, **kwargs):
        if kwargs.get("phase") == "branch":  # the main line's passes only
            return original_steps(self, seq, *args, **kwargs)
        in_pass.line, in_pass.steps = len(seq), 0
        try:
            return original_steps(self, seq, *args, **kwargs)
        finally:
            in_pass.line = None

    monkeypatch.setattr(Drafter, "_step", step)
    monkeypatch.setattr(Drafter, "steps", steps)
    return seen


@dataclass
class Link:
    """What amusd's two loops share: the state, the plan's schedule, and the plan."""

    shared: SharedState
    schedule: Concurrent
    plan: Plan


def make_link(kind: str, vocab: int, **flags) -> Link:
    """"paced", "one-device" (the baton), "lend" (paced, the target may borrow the resting
    draft's core), "free" (nothing paces the target: use a SlowTarget); `flags` as plan_of."""
    one, core = kind == "one-device", 1 if kind == "lend" else None
    plan = plan_of("amusd", shared_device=one, loan_core=core, **flags)
    shared = (SharedState(_ctx(), 256, vocab=vocab) if kind in ("one-device", "free")
              else PacedShared(_ctx(), 256, vocab=vocab))
    return Link(shared, schedule_for(plan, _ctx(), shared), plan)


def run_amusd(target, draft, case: Case, seed: int, link: Link,
              paths: Paths | None = None, rule: str = "rejection") -> tuple[int, ...]:
    req = case.request(seed, rule, link.plan)
    emit = paths or (lambda e: None)
    if paths is not None:
        paths.reset_run()
    link.shared.reset()
    link.schedule.reset()
    link.shared.set_draft_alive(True)
    failed: list[BaseException] = []

    def draft_side():
        try:
            amusd_draft_loop(req, draft, "cpu", link.shared, link.schedule, emit)
        except BaseException as exc:  # surfaced below: a draft that raised must fail the test
            failed.append(exc)
            link.shared.set_draft_alive(False)

    worker = threading.Thread(target=draft_side)
    worker.start()
    try:
        out = amusd_target_loop(req, target, "cpu", link.shared, link.schedule, emit)
    finally:
        worker.join(10)
    if failed:
        raise failed[0]
    return tuple(out.token_ids[:case.outcome])


class SlowTarget:
    """The target runner, each pass longer by a fixed time (a tiny target is as fast as its
    draft; a real one is several times slower): the draft drafts and grows its branches while
    the target computes, and the target reads the table right after its verdict."""

    def __init__(self, runner, secs: float) -> None:
        self.runner, self.secs = runner, secs

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def forward(self, seq, n_logits=1, **tree):
        time.sleep(self.secs)
        return self.runner.forward(seq, n_logits, **tree)


# mutations: each breaks one path, and that path's test must see it ----------------------------

def _always_accept(monkeypatch, when=lambda: True) -> None:
    from amusd_viz.engine import sampling
    from amusd_viz.engine.sampling import Check

    original = sampling._check

    def check(p, q, x, u):
        c = original(p, q, x, u)
        return Check(c.p, c.q, 1.0, c.u, c.overlap) if when() else c

    monkeypatch.setattr(sampling, "_check", check)


def accept_after_accepted(monkeypatch) -> None:
    """A draft judged after an accepted one in the same pass is accepted without its check."""
    from amusd_viz.engine.sampling import Sampler

    original, seen = Sampler.verdict, threading.local()

    def verdict(self, *args, **kwargs):
        seen.checks = 0
        return original(self, *args, **kwargs)

    def later() -> bool:
        seen.checks = getattr(seen, "checks", 0) + 1
        return seen.checks > 1

    monkeypatch.setattr(Sampler, "verdict", verdict)
    _always_accept(monkeypatch, later)


class _RowsAhead:
    """A target runner whose pass returns each row's logits one position too late."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def forward(self, seq, n_logits=1, **tree):
        from amusd_viz.engine.runner import HostRows

        logits, *rest = self.runner.forward(seq, n_logits, **tree)
        read = self.runner.read  # what the host read of the rows: one too late as well
        self.read = HostRows(read.argmax[1:] + read.argmax[-1:], read.tops[1:] + read.tops[-1:])
        return (torch.cat([logits[1:], logits[-1:]]), *rest)


def _rows_ahead_when(monkeypatch, flag: str) -> None:
    """Target passes whose `check` is called with `flag` (cached, lent) judge each draft
    against the target's row after it."""
    original = Verifier.check

    def check(self, *args, **kwargs):
        if not kwargs.get(flag):
            return original(self, *args, **kwargs)
        target, self.target = self.target, _RowsAhead(self.target)
        try:
            return original(self, *args, **kwargs)
        finally:
            self.target = target

    monkeypatch.setattr(Verifier, "check", check)


def cached_rows_off_by_one(monkeypatch) -> None:
    """A pass over drafts read from the speculation cache's branch table judges each against
    the target's row after it (an off-by-one where the cached drafts start)."""
    _rows_ahead_when(monkeypatch, "cached")


def any_path_goes_on(monkeypatch) -> None:
    """A tree pass goes on along any bet at the rejected draft, not only the target's pick."""
    from amusd_viz.engine import passes

    monkeypatch.setattr(passes, "_goes_on", lambda path, anchor, pick: path.anchor == anchor)


def _hold_steps(monkeypatch, keep) -> None:
    """Draft passes whose `on_step` calls wait for the pass's end; `keep(steps, phase)` False
    withholds the pass's drafts altogether."""
    original = Drafter.steps

    def steps(self, *args, on_step=None, **kwargs):
        held: list = []
        out = original(self, *args, on_step=lambda i, s: held.append((i, s)), **kwargs)
        if not keep(out, kwargs.get("phase")):
            return []
        for i, s in held:
            if on_step is not None:
                on_step(i, s)
        return out

    monkeypatch.setattr(Drafter, "steps", steps)


def publish_after_pass(monkeypatch) -> None:
    """The bug this file was written for: a pass's drafts published together at its end, so
    a draft that matched its lookup guess waits for the next step before the target sees it."""
    _hold_steps(monkeypatch, lambda steps, phase: True)


def withhold_sure(monkeypatch, above: float = 0.4) -> None:
    """A length policy that looks at the draft it is about to stop before: a pass whose draft
    is sure (q(x) at least `above`) is withheld, as if the drafting had stopped before it."""
    _hold_steps(monkeypatch, lambda steps, phase: not (steps and steps[0].conf >= above
                                                       and phase != "branch"))


def lent_rows_off_by_one(monkeypatch) -> None:
    """A pass on the borrowed core judges each draft against the target's row after it."""
    _rows_ahead_when(monkeypatch, "lent")


def q_before_processing(monkeypatch) -> None:
    """The draft samples from its processed q but sends q of its raw logits (temperature 1, no
    top-k, no top-p)."""
    from amusd_viz.engine import sampling
    from amusd_viz.engine.sampling import Sampler

    original = Sampler.propose

    def propose(self, logits_row, pos):
        token, q_x, q = original(self, logits_row, pos)
        if q is None:
            return token, q_x, q
        plain = dataclasses.replace(self.params, temperature=1.0, top_p=1.0, top_k=0)
        raw = sampling._pad(processed(logits_row.cpu()[None], plain)[0], self.vocab)
        return token, float(raw[token]), raw

    monkeypatch.setattr(Sampler, "propose", propose)
