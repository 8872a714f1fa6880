"""What the TUI knows about a run, built from events alone (live or replayed). No textual here:
the widgets read this state; tests can check it without a terminal."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from amusd_viz import stats
from amusd_viz.bound import dear_tokens
from amusd_viz.events import (
    BranchStep,
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
class Span:
    start: float
    end: float
    phase: str
    n_tokens: int


@dataclass
class Lane:
    role: str
    device: str
    spans: list[Span] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)  # sorted span starts, for bisect

    def add(self, span: Span) -> None:
        if self.starts and span.start < self.starts[-1]:  # rare: out-of-order arrival
            i = bisect.bisect(self.starts, span.start)
            self.starts.insert(i, span.start)
            self.spans.insert(i, span)
        else:
            self.starts.append(span.start)
            self.spans.append(span)

    def visible(self, t0: float, t1: float) -> list[Span]:
        """Spans overlapping [t0, t1]: bisect, so the cost follows the window, not the run."""
        i = max(0, bisect.bisect_left(self.starts, t0) - 1)
        j = bisect.bisect_right(self.starts, t1)
        return [s for s in self.spans[i:j] if s.end >= t0]


@dataclass
class Token:
    pos: int
    token_id: int
    text: str
    how: str
    t: float
    top: list = field(default_factory=list)


@dataclass
class RunState:
    strategy: str = ""
    draft: str | None = None
    target: str = ""
    draft_device: str | None = None
    target_device: str = ""
    dtype: str = ""
    lookahead: int = 0
    max_new_tokens: int = 0
    prompt: str = ""
    prompt_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    acceptance: str = "greedy"
    status: str = "loading"  # loading | generating | done | error
    message: str = ""
    started_at: float | None = None
    now: float = 0.0
    lanes: dict[str, Lane] = field(default_factory=dict)  # role -> lane
    tokens: list[Token] = field(default_factory=list)
    rejected: dict[int, tuple[int, str]] = field(default_factory=dict)  # pos -> (id, text)
    proposals: dict[int, DraftProposed] = field(default_factory=dict)  # pos -> latest proposal
    judged: dict[int, DraftProposed] = field(default_factory=dict)  # pos -> the one judged
    checks: dict[int, dict] = field(default_factory=dict)  # pos -> why it was accepted or not
    drafts: dict[int, str] = field(default_factory=dict)  # the draft's live sequence beyond commits
    rollbacks: list[tuple[float, int, int]] = field(default_factory=list)  # (t, to_pos, n)
    # amusd's speculation cache: pos -> (root, its token's text) of the branch its draft came from
    cached: dict[int, tuple[int, str]] = field(default_factory=dict)
    tree_taken: set[int] = field(default_factory=set)  # of those: checked in the rejecting pass
    bets: dict[int, str] = field(default_factory=dict)  # root -> text of the token bet on (hits)
    branch_texts: dict[tuple[int, int], str] = field(default_factory=dict)  # (pos, id) -> text
    accepted_per_pass: list[int] = field(default_factory=list)
    events: list = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    wall_s: float | None = None
    version: int = 0  # bumped on every change; widgets redraw only when it moved

    def ingest(self, e) -> None:
        self.version += 1
        self.events.append(e)
        self.now = max(self.now, e.t + (e.dur if isinstance(e, Forward) else 0.0))
        match e:
            case RunStarted():
                self._started(e)
            case WorkerReady():
                self.lanes.setdefault(e.role, Lane(e.role, e.device))
                self.lanes[e.role].add(Span(e.t - e.load_s, e.t, "load", 0))
                self.message = f"{e.role} ready ({e.load_s:.1f} s)"
                if e.graph_note:
                    self.message += f" · {e.graph_note}"
                if e.role == "target" and (aside := dear_tokens(self.strategy, e.extra_token)):
                    self.message += f" · {aside} on this CPU: drafts step aside (? says why)"
            case Forward():
                if self.status == "loading":
                    self.status, self.message = "generating", ""
                    self.started_at = e.t
                self._forward(e)
            case DraftProposed():
                self._proposed(e)
            case BranchStep():
                self.bets[e.root] = e.root_text
                self.branch_texts[(e.pos, e.token_id)] = e.text
            case VerifyResult():
                self._verified(e)
            case Rollback():
                self._rolled_back(e)
            case TokenCommitted():
                if e.pos == len(self.tokens):
                    self.tokens.append(Token(e.pos, e.token_id, e.text, e.how, e.t, list(e.top)))
                self.drafts.pop(e.pos, None)
            case WorkerLost():
                self.lost.append(e.role)
                self.message = f"{e.role} worker lost: {e.message}"
            case Error():
                self.status, self.message = "error", e.message
            case RunFinished():
                self._finished(e)

    def _started(self, e: RunStarted) -> None:
        for name in ("strategy", "draft", "target", "draft_device", "target_device", "dtype",
                     "lookahead", "max_new_tokens", "prompt", "prompt_tokens",
                     "temperature", "top_p", "top_k", "seed", "acceptance"):
            setattr(self, name, getattr(e, name))
        if e.draft_device:
            self.lanes.setdefault("draft", Lane("draft", e.draft_device))
        self.lanes.setdefault("target", Lane("target", e.target_device))
        self.status, self.message = "loading", "starting workers"

    def _proposed(self, e: DraftProposed) -> None:
        self.proposals[e.pos] = e
        self.drafts[e.pos] = e.text
        if e.cached:
            self._cached_draft(e)
        rejected = self.rejected.get(e.pos)
        if rejected is not None and rejected == (e.token_id, f"<{e.token_id}>"):
            # the draft's worker reported it after the target's verdict reached us
            self.rejected[e.pos] = (e.token_id, e.text)

    def _rolled_back(self, e: Rollback) -> None:
        self.rollbacks.append((e.t, e.to_pos, len(e.discarded)))
        for pos in [p for p in self.drafts if p >= e.to_pos]:
            del self.drafts[pos]
        for pos in [p for p in self.cached if p >= max(e.to_pos, len(self.tokens))]:
            del self.cached[pos]

    def _finished(self, e: RunFinished) -> None:
        self.status = "done"
        self.wall_s = e.wall_s
        self.message = f"{e.new_tokens} tokens in {e.wall_s:.2f} s ({e.stop_reason})"
        if e.started_at is not None:
            self.started_at = e.started_at

    def _forward(self, e: Forward) -> None:
        self.lanes.setdefault(e.role, Lane(e.role, e.device)).add(
            Span(e.t, e.t + e.dur, e.phase, e.n_tokens))
        if e.lent and "draft" in self.lanes:  # the draft's core lent to this target pass
            self.lanes["draft"].add(Span(e.t, e.t + e.dur, "lent", e.n_tokens))

    def _verified(self, e: VerifyResult) -> None:
        for i, token in enumerate(e.proposed[: e.accepted + 1]):
            prop = self.proposals.get(e.start_pos + i)
            if prop is not None and prop.token_id == token:
                self.judged[e.start_pos + i] = prop
        self._add_checks(e)
        if e.from_cache:
            # the target read a branch's drafts before the draft adopted it: the branch
            # bet on the token just before them
            bet_at = e.start_pos - 1
            for pos in range(e.start_pos, e.start_pos + e.accepted):
                self.cached[pos] = (bet_at, self.bets.get(bet_at, "?"))
        root = e.tree_root
        if root is not None:
            # a tree pass went on along a branch: its drafts past the bet came from the cache
            bet = self.tokens[root].text if root < len(self.tokens) else "?"
            for pos in range(root + 1, root + 1 + e.tree_accepted):
                self.cached[pos] = (root, bet)
                self.tree_taken.add(pos)
        if e.proposed:
            self.accepted_per_pass.append(e.accepted)
        if e.accepted < len(e.proposed):
            pos = e.start_pos + e.accepted
            token = e.proposed[e.accepted]
            prop = self.proposals.get(pos)
            text = (prop.text if prop is not None and prop.token_id == token
                    else self.branch_texts.get((pos, token), f"<{token}>"))  # a cached draft
            self.rejected[pos] = (token, text)

    def _cached_draft(self, e: DraftProposed) -> None:
        """A draft handed over from a branch (at a hit): the proposal the target judged there,
        even when the target read it from the branch before this event arrived."""
        root = e.branch_root if e.branch_root is not None else e.pos - 1
        self.cached[e.pos] = (root, self.bets.get(root, "?"))
        if e.pos < len(self.tokens) and self.tokens[e.pos].token_id == e.token_id:
            self.judged[e.pos] = e

    def _add_checks(self, e: VerifyResult) -> None:
        """Sampling: p, q, min(1, p/q), the draw and sum(min(p, q)) of each checked draft."""
        for i in range(len(e.p)):
            self.checks[e.start_pos + i] = {
                "p": e.p[i], "q": e.q[i] if i < len(e.q) else None,
                "accept_prob": e.accept_prob[i] if i < len(e.accept_prob) else None,
                "u": e.u[i] if i < len(e.u) else None,
                "overlap": e.overlap[i] if i < len(e.overlap) else None}

    @property
    def sampling_label(self) -> str:
        if not self.temperature:
            return "greedy"
        extra = "".join([f" top-p {self.top_p:g}" if self.top_p < 1 else "",
                         f" top-k {self.top_k}" if self.top_k else ""])
        return f"T {self.temperature:g}{extra} {self.acceptance} seed {self.seed}"

    def pending(self) -> list[str]:
        """Draft tokens beyond the committed text, not verified yet, in order."""
        out = []
        pos = len(self.tokens)
        while pos in self.drafts:
            out.append(self.drafts[pos])
            pos += 1
        return out

    def elapsed(self) -> float:
        return self.now - self.started_at if self.started_at is not None else 0.0

    def commit_curve(self) -> tuple[list[float], list[int]]:
        """Cumulative tokens against seconds since the prompt went in."""
        base = self.started_at or 0.0
        return [t.t - base for t in self.tokens], list(range(1, len(self.tokens) + 1))

    def stats(self) -> stats.RunStats:
        return stats.compute(self.events)
