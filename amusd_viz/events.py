"""The event vocabulary: what the engine tells its consumers (docs/architecture.md, "Events").

Typed pydantic models, one per `type`. Imports neither torch nor textual, so logs can be read,
replayed, summarised and exported on a machine without models.
"""

from __future__ import annotations

from typing import Annotated, Literal, Protocol, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from amusd_viz.config import EngineStrategy

# 2: sampling (run_started's settings, draft_proposed.q, verify_result's checks, `resampled`).
# 3: a target pass on the draft's borrowed core is `forward.lent`, its device the worker's own
# (version 2 wrote "cpu:0+cpu:1" as its device: read as lent).
# Older logs still read: every new field has a default.
SCHEMA_VERSION = 3

Role = Literal["draft", "target"]
# lookup: the n-gram drafter; branch: a draft step for the speculation cache (a bet on a rejection)
Phase = Literal["prefill", "draft", "verify", "decode", "lookup", "branch"]
How = Literal["accepted", "correction", "resampled", "bonus", "decoded"]


class _Event(BaseModel):
    # Unknown extra fields are kept: newer writers may add fields, older readers pass them on.
    model_config = ConfigDict(extra="allow", frozen=True)

    t: float = Field(description="seconds since the run started (shared monotonic clock)")


class Candidate(BaseModel):
    """One of a model's top candidates at a position."""

    model_config = ConfigDict(frozen=True)

    id: int
    text: str
    p: float
    logit: float | None = None  # the raw logit (greedy target and draft tops)


class Header(BaseModel):
    """First line of a log: what produced it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: Literal["header"] = "header"
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    amusd_viz: str = ""
    machine: dict = Field(default_factory=dict)
    packages: dict = Field(default_factory=dict)
    config: dict = Field(default_factory=dict)


class RunStarted(_Event):
    type: Literal["run_started"] = "run_started"
    strategy: EngineStrategy
    draft: str | None
    target: str
    draft_device: str | None
    target_device: str
    prompt_tokens: int
    dtype: str = "bfloat16"
    lookahead: int = 0
    max_new_tokens: int = 0
    prompt: str = ""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    acceptance: str = "greedy"  # greedy | coupled | rejection


class WorkerReady(_Event):
    type: Literal["worker_ready"] = "worker_ready"
    role: Role
    device: str
    pid: int
    load_s: float
    model: str = ""
    device_info: dict = Field(default_factory=dict)  # engine.devices.device_info
    # timed at load (engine/estimate.PassCost): a one-token pass, and what each further token
    # in the same pass adds, in one-token passes (~0.02 on a GPU or a CPU with matrix units,
    # ~0.8 on an AVX2-only CPU in bf16); None for a lookup drafter
    pass_s: float | None = None
    extra_token: float | None = None
    # CUDA graphs (engine/graphs.py): the pass sizes replayed as graphs, those dropped for the
    # eager pass (size -> why), and the capture's seconds; None where none were captured
    graphs: list[int] | None = None
    graphs_dropped: dict[str, str] = Field(default_factory=dict)
    graph_s: float | None = None

    @property
    def graph_note(self) -> str:
        """'CUDA graphs 1–32 (0.8 s)', and the sizes that run eagerly; '' without graphs."""
        if self.graphs is None:
            return ""
        kept = f"{self.graphs[0]}–{self.graphs[-1]}" if self.graphs else "none kept"
        note = f"CUDA graphs {kept} ({self.graph_s or 0:.1f} s)"
        if self.graphs_dropped:
            note += " · eager for " + ", ".join(f"{size} ({why})"
                                                 for size, why in self.graphs_dropped.items())
        return note


class Forward(_Event):
    """One forward pass; `t` is its start, `dur` its length, `device` its worker's device.
    `lent`: an amusd target pass that also ran on the resting draft's core (engine/lending.py)."""

    type: Literal["forward"] = "forward"
    role: Role
    device: str
    dur: float
    phase: Phase
    n_tokens: int
    lent: bool = False

    @model_validator(mode="before")
    @classmethod
    def _lent_device(cls, data):
        """Schema 2 wrote a lent pass's device as "cpu:0+cpu:1"."""
        if isinstance(data, dict) and "+" in str(data.get("device", "")):
            return {**data, "device": data["device"].split("+")[0], "lent": True}
        return data


class DraftProposed(_Event):
    type: Literal["draft_proposed"] = "draft_proposed"
    pos: int
    token_id: int
    text: str
    top: list[Candidate] = Field(default_factory=list)
    q: float | None = None  # the draft's probability of this token (after temperature, top-k/p)
    # The n-gram drafter: this token copies the one at index ngram_from of prompt + text, which
    # followed an earlier occurrence of the last ngram_n tokens
    ngram_n: int | None = None
    ngram_from: int | None = None
    # amusd's speculation cache: drafted ahead on a branch, handed over at once on a hit
    cached: bool = False
    branch_root: int | None = None  # the position whose verdict that branch bet on
    # a lookup guessed this token and the draft chose it in the pass that drafted the token
    # before it (engine/guess.py): one pass, several drafts
    guessed: bool = False


class VerifyResult(_Event):
    type: Literal["verify_result"] = "verify_result"
    start_pos: int
    proposed: list[int]
    accepted: int
    committed: list[int]
    # The target's top candidates at start_pos, start_pos+1, ... (one list per committed token).
    top: list[list[Candidate]] = Field(default_factory=list)
    # Sampling: one entry per checked draft token (the accepted ones and the first rejected):
    p: list[float] = Field(default_factory=list)  # the target's probability of it
    q: list[float] = Field(default_factory=list)  # the draft's
    accept_prob: list[float] = Field(default_factory=list)  # min(1, p/q)
    u: list[float] = Field(default_factory=list)  # rejection rule: the draw (accept if u < a)
    overlap: list[float] = Field(default_factory=list)  # sum(min(p, q)): expected acceptance
    # Why the draft proposed no more (sync, adaptive lookahead): "confidence" when the chance
    # that one more draft is accepted no longer paid for its step; None: the lookahead, EOS or
    # the token budget
    draft_stop: str | None = None
    # amusd: the drafts came from a speculation-cache branch that bet on the previous verdict
    from_cache: bool = False
    # amusd's cache, checked in the same pass (a token tree): how many branches the pass also
    # checked; where the target rejected the draft at `tree_root` and picked a branch's bet, the
    # branch's drafts it then judged (`tree_proposed`) and how many it accepted. `committed`
    # holds the whole lot: the accepted drafts, the bet, the branch's accepted drafts and the
    # target's own last token.
    tree_paths: int = 0
    tree_root: int | None = None
    tree_proposed: list[int] = Field(default_factory=list)
    tree_accepted: int = 0


class BranchStep(_Event):
    """amusd's speculation cache: a draft step on a branch that bets the target rejects the
    draft at `root` and commits `root_token` there (the draft's own runner-up); `token_id` is
    the draft's proposal at `pos` on that branch (depth 1 = just after the root)."""

    type: Literal["branch_step"] = "branch_step"
    root: int
    root_token: int
    root_text: str
    pos: int
    token_id: int
    text: str
    depth: int
    value: float  # the draft's estimate of the chance this token is needed
    # drafted in a main-line pass, beside the main line's token (a sibling: no pass of its own)
    sibling: bool = False


class CacheVerdict(_Event):
    """amusd's speculation cache at a rejection the draft saw: was a branch ready for the
    target's token at `pos`? On a hit its `handed` drafts were published at once."""

    type: Literal["cache_verdict"] = "cache_verdict"
    pos: int
    token_id: int
    hit: bool
    handed: int = 0  # drafts handed to the target from the branch
    branches: int = 0  # branches that were ready (all dropped now)
    wasted: int = 0  # branch tokens drafted and not used


class Rollback(_Event):
    type: Literal["rollback"] = "rollback"
    to_pos: int
    discarded: list[int]


class TokenCommitted(_Event):
    type: Literal["token_committed"] = "token_committed"
    pos: int
    token_id: int
    text: str
    how: How
    # The target's top candidates at this position (why this token and not another).
    top: list[Candidate] = Field(default_factory=list)


class WorkerLost(_Event):
    """A worker stopped; for the draft the run goes on with the target alone."""

    type: Literal["worker_lost"] = "worker_lost"
    role: Role
    message: str


class RunFinished(_Event):
    type: Literal["run_finished"] = "run_finished"
    new_tokens: int
    wall_s: float
    stop_reason: str = ""
    started_at: float | None = None  # when the prompt went in (models loaded), on the run's clock


class Error(_Event):
    type: Literal["error"] = "error"
    message: str
    role: Role | None = None


Event = Annotated[
    RunStarted
    | WorkerReady
    | Forward
    | DraftProposed
    | VerifyResult
    | Rollback
    | BranchStep
    | CacheVerdict
    | TokenCommitted
    | WorkerLost
    | RunFinished
    | Error,
    Field(discriminator="type"),
]
# type name -> class, derived from the union so that a new event is declared in one place
EVENT_TYPES: dict[str, type[_Event]] = {
    cls.model_fields["type"].default: cls for cls in get_args(get_args(Event)[0])
}
event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


class EventSink(Protocol):
    """Anything that consumes the event stream: the TUI, the recorder, the summary."""

    def emit(self, event: _Event) -> None: ...


class FanOut:
    """Sends each event to several sinks, in order."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = list(sinks)

    def emit(self, event: _Event) -> None:
        for sink in self.sinks:
            sink.emit(event)


class EventList:
    """Keeps every event in memory (tests, summaries)."""

    def __init__(self) -> None:
        self.events: list[_Event] = []

    def emit(self, event: _Event) -> None:
        self.events.append(event)
