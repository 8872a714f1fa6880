"""Statistics of a run, computed from its events alone. No torch, no textual.

Used by the run summary, `amusd-viz stats`, the benchmark and the TUI's stats panel, so every
figure means the same thing everywhere.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field

from amusd_viz.bound import best_for
from amusd_viz.events import (
    BranchStep,
    CacheVerdict,
    DraftProposed,
    Error,
    Forward,
    Rollback,
    RunFinished,
    RunStarted,
    TokenCommitted,
    VerifyResult,
    WorkerLost,
    WorkerReady,
)


@dataclass
class RunStats:
    strategy: str = ""
    new_tokens: int = 0
    wall_s: float = 0.0
    ms_per_token: float | None = None
    tokens_per_s: float | None = None
    verify_passes: int = 0
    mean_accepted_per_pass: float | None = None  # draft tokens accepted per verify pass
    mean_committed_per_pass: float | None = None  # tokens committed per target pass
    acceptance_rate: float | None = None  # accepted / proposed, over verified draft tokens
    # accepted / checked: a pass checks its drafts up to the first rejection, and the tokens after
    # it are dropped unseen; this is the per-token acceptance that sum(min(p, q)) predicts
    acceptance_per_check: float | None = None
    # sampling: the mean over checked draft tokens of sum(min(p, q)), the acceptance the
    # rejection rule achieves on average (the best any rule can); None when greedy
    expected_acceptance: float | None = None
    acceptance_by_position: list[float] = field(default_factory=list)  # P(accept i | reached i)
    accepted_histogram: dict[int, int] = field(default_factory=dict)  # accepted count -> passes
    rollbacks: int = 0
    wasted_draft_tokens: int = 0
    target_passes: int = 0  # after the prefill: verify passes and solo passes
    solo_passes: int = 0  # target passes with no draft to check (one token for a whole pass)
    lent_passes: int = 0  # amusd on two CPU cores: target passes on the draft's core too (lending)
    mean_drafts_per_verify: float | None = None  # the lookahead actually used
    confidence_stops: int = 0  # sync, adaptive: passes whose drafting stopped on confidence
    # amusd's speculation cache (engine/speccache.py): at each rejection the draft saw, was a
    # branch ready with the target's token? Passes that took their drafts from a branch;
    # branch tokens drafted, and those never handed over
    cache_hits: int = 0
    cache_misses: int = 0
    cache_hit_rate: float | None = None
    cached_passes: int = 0
    # tree passes: where the target's pick at a rejection was a branch's bet and it went on
    # along that branch in the same pass; the tokens it committed past the bet that way
    tree_hits: int = 0
    tree_tokens: int = 0
    branch_tokens: int = 0
    wasted_branch_tokens: int = 0
    draft_tokens: int = 0
    guessed_drafts: int = 0  # drafts a pass drafted after a lookup guess held (engine/guess.py)
    draft_passes: int = 0  # the draft model's passes after its prefill (main line and branches)
    # median forward times: the target's passes after the prefill, the draft model's steps
    target_pass_s: float | None = None
    draft_step_s: float | None = None
    # the same strategy with these pass times and this acceptance but no waste (amusd_viz/bound.py)
    best_ms_per_token: float | None = None
    best_drafts: int | None = None
    # what an extra token in a target pass costs, in one-token passes (timed at load): over
    # bound.DEAR_TOKEN no draft pays for its place in a pass, and the drafts step aside
    extra_token: float | None = None
    busy: dict[str, float] = field(default_factory=dict)  # device -> busy share of the run
    overlap: float | None = None  # share of the run where draft and target both computed
    how: dict[str, int] = field(default_factory=dict)  # committed tokens by how they became final
    workers_lost: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(spans) -> float:
    return sum(e - s for s, e in spans)


def _intersection(a, b) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


class _Tally:
    """What one pass over the events collects."""

    def __init__(self) -> None:
        self.s = RunStats()
        self.start_t: float | None = None
        self.end_t: float | None = None
        self.proposed = self.accepted = self.checked = self.rejections = 0
        self.reached: Counter[int] = Counter()  # verify passes that reached draft position i
        self.passed: Counter[int] = Counter()  # ... and accepted it
        self.committed_per_pass: list[int] = []
        self.spans: dict[tuple[str, str], list[tuple[float, float]]] = {}
        self.first_prefill: float | None = None
        self.overlaps: list[float] = []
        self.handed = 0  # branch drafts handed over at hits
        self.pass_times: dict[str, list[float]] = {"target": [], "draft": []}
        self.lookahead = 0
        self.separate_devices = False

    def add(self, e) -> None:
        s = self.s
        match e:
            case RunStarted():
                s.strategy = e.strategy
                self.lookahead = e.lookahead
                self.separate_devices = bool(e.draft_device) and e.draft_device != e.target_device
            case Forward():
                self.add_forward(e)
            case DraftProposed():
                s.draft_tokens += 1
                s.guessed_drafts += e.guessed
            case VerifyResult():
                self.add_verify(e)
            case BranchStep():
                s.branch_tokens += 1
            case CacheVerdict(hit=True):
                s.cache_hits += 1
                self.handed += e.handed
            case CacheVerdict():
                s.cache_misses += 1
            case Rollback():
                s.rollbacks += 1
                s.wasted_draft_tokens += len(e.discarded)
            case TokenCommitted():
                s.new_tokens = max(s.new_tokens, e.pos + 1)
                s.how[e.how] = s.how.get(e.how, 0) + 1
            case WorkerReady(role="target"):
                s.extra_token = e.extra_token
            case WorkerLost():
                s.workers_lost.append(e.role)
            case Error():
                s.errors.append(e.message)
            case RunFinished():
                s.wall_s = e.wall_s
                self.start_t, self.end_t = e.started_at, e.t

    def add_forward(self, e: Forward) -> None:
        self.spans.setdefault((e.role, e.device), []).append((e.t, e.t + e.dur))
        self.s.lent_passes += e.lent
        if e.phase in ("verify", "decode", "draft", "branch"):  # model work, not a lookup
            self.pass_times[e.role].append(e.dur)
        if e.phase == "prefill" and (self.first_prefill is None or e.t < self.first_prefill):
            self.first_prefill = e.t

    def add_verify(self, e: VerifyResult) -> None:
        s = self.s
        self.committed_per_pass.append(len(e.committed))
        s.target_passes += 1
        s.cached_passes += e.from_cache
        if e.tree_root is not None:
            s.tree_hits += 1
            s.tree_tokens += max(0, len(e.committed) - e.accepted - 1)
        s.confidence_stops += e.draft_stop == "confidence"
        if not e.proposed:
            s.solo_passes += 1
            return
        s.verify_passes += 1
        self.overlaps.extend(e.overlap)
        self.proposed += len(e.proposed)
        self.accepted += e.accepted
        self.checked += min(len(e.proposed), e.accepted + 1)
        self.rejections += e.accepted < len(e.proposed)
        s.accepted_histogram[e.accepted] = s.accepted_histogram.get(e.accepted, 0) + 1
        for i in range(min(e.accepted + 1, len(e.proposed))):
            self.reached[i] += 1
            if i < e.accepted:
                self.passed[i] += 1

    def finish(self) -> RunStats:
        s = self.s
        if s.verify_passes:
            s.mean_accepted_per_pass = self.accepted / s.verify_passes
            s.acceptance_rate = self.accepted / self.proposed if self.proposed else None
            s.acceptance_per_check = self.accepted / self.checked if self.checked else None
            s.acceptance_by_position = [self.passed[i] / self.reached[i]
                                        for i in sorted(self.reached)]
            s.mean_drafts_per_verify = self.proposed / s.verify_passes
        if s.cache_hits + s.cache_misses:
            s.cache_hit_rate = s.cache_hits / (s.cache_hits + s.cache_misses)
        s.wasted_branch_tokens = s.branch_tokens - self.handed
        if self.overlaps:
            s.expected_acceptance = sum(self.overlaps) / len(self.overlaps)
        if self.committed_per_pass:
            s.mean_committed_per_pass = sum(self.committed_per_pass) / len(self.committed_per_pass)
        s.accepted_histogram = dict(sorted(s.accepted_histogram.items()))
        self.model_bound()
        start_t = self.start_t if self.start_t is not None else self.first_prefill
        end_t = self.end_t
        if end_t is None and self.spans:
            end_t = max(e for v in self.spans.values() for _, e in v)
        if not s.wall_s and start_t is not None and end_t is not None:
            s.wall_s = end_t - start_t
        if s.new_tokens and s.wall_s:
            s.ms_per_token = 1000 * s.wall_s / s.new_tokens
            s.tokens_per_s = s.new_tokens / s.wall_s
        if s.wall_s and start_t is not None:
            self.busy_shares(start_t, start_t + s.wall_s)
        return s

    def model_bound(self) -> None:
        s = self.s
        times = {role: statistics.median(v) if v else None for role, v in self.pass_times.items()}
        s.target_pass_s, s.draft_step_s = times["target"], times["draft"]
        s.draft_passes = len(self.pass_times["draft"])
        # tokens a bet won per rejected draft: the tree passes' share of the model
        bets = s.tree_tokens / self.rejections if self.rejections else 0.0
        best = best_for(s.strategy, self.separate_devices, s.acceptance_per_check,
                        s.target_pass_s, s.draft_step_s, self.lookahead, bets)
        if best is not None:
            s.best_ms_per_token, s.best_drafts = best.ms_per_token, best.drafts

    def busy_shares(self, lo: float, hi: float) -> None:
        """Busy share per device and the share where draft and target both computed, inside
        the generation window [lo, hi]."""
        s = self.s

        def clip(v):
            return _union([(max(a, lo), min(b, hi)) for a, b in v if b > lo and a < hi])

        by_role: dict[str, list] = {}
        for (role, device), v in self.spans.items():
            s.busy[f"{role}@{device}"] = _length(clip(v)) / s.wall_s
            by_role.setdefault(role, []).extend(v)
        if "draft" in by_role and "target" in by_role:
            s.overlap = _intersection(clip(by_role["draft"]), clip(by_role["target"])) / s.wall_s


def compute(events) -> RunStats:
    """Every statistic of a run, in one pass over its events."""
    tally = _Tally()
    for e in events:
        tally.add(e)
    return tally.finish()


def _lent(s: RunStats) -> str:
    return f"; {s.lent_passes} on the draft's lent core too" if s.lent_passes else ""


def _guessed(s: RunStats) -> str:
    return (f" ({s.guessed_drafts} after a lookup guess: no pass of their own)"
            if s.guessed_drafts else "")


def _pass_lines(s: RunStats) -> list[str]:
    lines = []
    if s.target_pass_s is not None:
        draft = "" if s.draft_step_s is None else f", draft step {1000 * s.draft_step_s:.0f} ms"
        lines.append(f"pass times (median)    target {1000 * s.target_pass_s:.0f} ms{draft}")
    if s.extra_token is not None:
        lines.append(f"extra token per pass   {s.extra_token:.2f} of a one-token pass (timed at load)")
    return lines


def format_stats(s: RunStats) -> str:
    """A human-readable block for `amusd-viz stats`."""

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    lines = [
        f"strategy               {s.strategy or '-'}",
        f"new tokens             {s.new_tokens}",
        f"wall time              {s.wall_s:.2f} s (prompt in to last token out)",
        f"ms / token             {num(s.ms_per_token, '{:.1f}')}",
        f"tokens / s             {num(s.tokens_per_s)}",
        f"verify passes          {s.verify_passes}",
        f"mean accepted / pass   {num(s.mean_accepted_per_pass)}",
        f"mean committed / pass  {num(s.mean_committed_per_pass)}",
        f"acceptance rate        {pct(s.acceptance_rate)}",
        f"acceptance per check   {pct(s.acceptance_per_check)}",
        f"expected (sum min p,q) {pct(s.expected_acceptance)}",
        "acceptance by position " + (" ".join(f"{i}:{pct(r)}" for i, r in
                                               enumerate(s.acceptance_by_position)) or "-"),
        "accepted per pass      " + (" ".join(f"{k}:{v}" for k, v in s.accepted_histogram.items())
                                     or "-"),
        f"draft tokens           {s.draft_tokens}{_guessed(s)}",
        f"rollbacks              {s.rollbacks}",
        f"wasted draft tokens    {s.wasted_draft_tokens}",
        f"target passes          {s.target_passes} ({s.solo_passes} solo, without drafts{_lent(s)})",
        f"drafts / verify pass   {num(s.mean_drafts_per_verify)}",
        f"stopped on confidence  {s.confidence_stops} passes",
    ]
    lines += _pass_lines(s)
    if s.best_ms_per_token is not None:
        speed = (f" (this run went {s.best_ms_per_token / s.ms_per_token:.0%} as fast)"
                 if s.ms_per_token else "")
        lines.append(f"best with no waste     {s.best_ms_per_token:.1f} ms/token at "
                     f"{s.best_drafts} drafts/pass{speed}")
    if s.cache_hits + s.cache_misses or s.branch_tokens:
        lines += [
            f"speculation cache      {s.cache_hits} hits, {s.cache_misses} misses "
            f"({pct(s.cache_hit_rate)}); {s.cached_passes} passes took a branch's drafts",
            f"branch tokens          {s.branch_tokens} ({s.wasted_branch_tokens} never handed over)",
        ]
    if s.tree_hits:
        lines.append(f"tree passes            {s.tree_hits} picked a bet beside a rejected draft "
                     f"and went on (+{s.tree_tokens} tokens)")
    lines += [
        "committed by kind      " + (" ".join(f"{k}:{v}" for k, v in sorted(s.how.items())) or "-"),
    ]
    for device, share in s.busy.items():
        lines.append(f"busy {device:<18}{pct(share)}")
    lines.append(f"both devices busy      {pct(s.overlap)}")
    if s.workers_lost:
        lines.append(f"workers lost           {', '.join(s.workers_lost)}")
    for err in s.errors:
        lines.append(f"error                  {err}")
    return "\n".join(lines)
