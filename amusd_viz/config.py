"""The typed run configuration: everything that defines one run, built once by the CLI (or a
test) and handed to the live source, the benchmark and the engine. Imports no torch, transformers
or textual (docs/architecture.md, "Layers").

A `RunConfig` holds both what the user asked for (`*_option`: `None` means "the default for this
strategy") and what that resolved to on this machine (`target_device`, `draft_device`,
`draft_quant`); `amusd_viz.engine.devices.resolve_run` fills in the second from the first, so a
re-run with another strategy can resolve again from the same request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from amusd_viz.errors import UserError
from amusd_viz.models.registry import DEFAULT_DRAFT, DEFAULT_TARGET

Strategy = Literal["amusd", "sync", "ar"]
# What a worker can run: the user's strategies and transformers' own generate as baselines.
EngineStrategy = Literal["ar", "sync", "amusd", "hf-generate", "hf-assisted"]
Dtype = Literal["bfloat16", "float16", "float32"]
QuantChoice = Literal["auto", "none", "int8"]
DraftQuant = Literal["none", "int8"]
KvCacheChoice = Literal["auto", "static", "dynamic"]
KvCache = Literal["static", "dynamic"]
OnOffAuto = Literal["auto", "on", "off"]
Role = Literal["draft", "target"]
Acceptance = Literal["coupled", "rejection"]

STRATEGIES: tuple[str, ...] = get_args(Strategy)
ENGINE_STRATEGIES: tuple[str, ...] = get_args(EngineStrategy)
DTYPES: tuple[str, ...] = get_args(Dtype)
QUANT_CHOICES: tuple[str, ...] = get_args(QuantChoice)
KV_CACHE_CHOICES: tuple[str, ...] = get_args(KvCacheChoice)
ACCEPTANCE_RULES: tuple[str, ...] = get_args(Acceptance)

DEFAULT_PROMPT = ("Write a Python function that returns the n-th Fibonacci number iteratively, "
                  "with a docstring and type hints.")
DEFAULT_MAX_NEW = 128
DEFAULT_BENCH_MAX_NEW = 64
DEFAULT_LOOKAHEAD = 8
MAX_LOOKAHEAD = 32  # the TUI's `]` stops here: a verify pass of more tokens is no longer cheap
DEFAULT_STALL_TIMEOUT = 300.0


# Seeds are 32-bit: torch's CPU generator keeps the low 32 bits of what it is seeded with, so
# seeds that differ by a multiple of 2^32 would give the same text (the CLI refuses larger ones).
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen (engine/sampling.py): greedy at temperature 0, else a seeded sample
    verified by the coupled or the rejection rule."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int = 0
    acceptance: str = "greedy"  # greedy | coupled | rejection

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


NGRAM = "ngram"
DEFAULT_NGRAM_N = 3  # the longest match tried: --draft ngram means ngram:3
MAX_NGRAM_N = 32


def parse_ngram(spec: str | None) -> int | None:
    """`ngram` or `ngram:N` -> N (the longest match tried); None for a model's name."""
    if spec is None or (spec != NGRAM and not spec.startswith(NGRAM + ":")):
        return None
    if spec == NGRAM:
        return DEFAULT_NGRAM_N
    text = spec.split(":", 1)[1]
    if not text.isdigit() or not 1 <= int(text) <= MAX_NGRAM_N:
        raise UserError(f"--draft {spec}: N in ngram:N is the longest match tried, a whole number "
                        f"from 1 to {MAX_NGRAM_N} (or plain `ngram` for {DEFAULT_NGRAM_N}).")
    return int(text)


def draft_runs_with_target(strategy: str) -> bool:
    """One-process strategies load the draft beside the target, on the target's device."""
    return strategy in ("sync", "hf-assisted")


class RunConfig(BaseModel):
    """One run: models, devices, dtype, generation settings, outputs (and test-only faults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Strategy = "amusd"
    draft: str = DEFAULT_DRAFT
    target: str = DEFAULT_TARGET
    prompt: str = DEFAULT_PROMPT
    dtype: Dtype = "bfloat16"  # resolved from dtype_option where one was given
    dtype_option: Literal["auto", "bfloat16", "float16", "float32"] | None = None  # --dtype
    lookahead: int = Field(DEFAULT_LOOKAHEAD, ge=1)
    max_new_tokens: int = Field(DEFAULT_MAX_NEW, ge=1)
    stall_timeout: float = Field(DEFAULT_STALL_TIMEOUT, gt=0)
    preamble_cache: bool = True  # feed the chat template's fixed head once, at load time
    adaptive: bool = True  # --adaptive: draft only as far as it is worth (sync, amusd)
    spec_cache: bool = True  # --spec-cache: amusd's speculation cache
    siblings: bool = True  # amusd's cache: a runner-up bet beside every main-line draft (bench)
    tree: bool = True  # sync, amusd: bets checked in the drafts' own target pass (bench)
    draft_lookup: bool = True  # --draft-lookup: lookup guesses checked in the draft's pass
    lend_core: bool = True  # --lend-core: amusd on two CPU cores, the target borrows a resting draft's core
    # Sampling (docs/protocol.md, "Sampling"); temperature 0 is greedy.
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    # the CLI draws a fresh one when none is given, and records it; 32 bits (MAX_SEED)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    acceptance: Acceptance | None = None  # None: coupled when sampling
    # What the user asked for; None: the default for the strategy on this machine.
    target_device_option: str | None = None
    draft_device_option: str | None = None
    draft_quant_option: QuantChoice = "auto"
    kv_cache_option: KvCacheChoice = "auto"
    cuda_graphs_option: OnOffAuto = "auto"
    gpu_share_option: str = Field("baton", pattern=r"^(baton|mps:\d{1,3})$")
    # What that resolved to (engine.devices.resolve_run).
    target_device: str = ""
    draft_device: str | None = None  # None for `ar`
    draft_quant: DraftQuant = "none"
    kv_cache: KvCache = "dynamic"
    cuda_graphs: bool = False
    gpu_share: int | None = None  # amusd on one GPU under MPS: the draft's percent (engine/mps.py)
    # Outputs.
    events: Path | None = None
    summary_json: Path | None = None
    # Tests only: role -> fault spec ("die_after:N" exits that worker after N forward passes).
    faults: dict[Role, str] = Field(default_factory=dict)

    @property
    def resolved(self) -> bool:
        return bool(self.target_device)

    @property
    def uses_draft(self) -> bool:
        return self.strategy != "ar"

    @property
    def ngram_n(self) -> int | None:
        """The n-gram drafter's longest match, or None for a model draft."""
        return parse_ngram(self.draft)

    @property
    def acceptance_rule(self) -> str:
        """greedy at temperature 0; else the chosen rule, coupled by default."""
        return "greedy" if self.temperature == 0 else self.acceptance or "coupled"

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.seed,
                              self.acceptance_rule)

    def with_strategy(self, strategy: str) -> RunConfig:
        """The same request for another strategy, devices not resolved yet."""
        return self.model_copy(update={"strategy": strategy, "target_device": "",
                                       "draft_device": None})

    def log_config(self) -> dict:
        """What the log header records: every setting, paths as strings, no faults."""
        return self.model_dump(mode="json", exclude={"faults"})


class BenchConfig(BaseModel):
    """`amusd-viz bench`: the run settings every strategy shares, and what to run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run: RunConfig
    prompts: Path | None = None  # None: the bundled prompt set
    strategies: tuple[str, ...] = ("ar", "ar-1dev", "sync", "sync-2dev", "amusd", "hf-assisted")
    lookaheads: tuple[int, ...] = (DEFAULT_LOOKAHEAD,)
    repeats: int = Field(1, ge=1)
    limit: int | None = None
    kinds: tuple[str, ...] = ()
    json_out: Path | None = None
    plot: Path | None = None
