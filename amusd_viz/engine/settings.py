"""What an engine is started with: resolved model sources, devices, dtype and the user's speed
switches (engine/plan.py turns those into the run's plan), and the workers it starts. No torch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from amusd_viz.config import GREEDY, EngineStrategy, SamplingParams, draft_runs_with_target, parse_ngram
from amusd_viz.engine.mps import worker_percent
from amusd_viz.engine.plan import Plan
from amusd_viz.engine.worker import WorkerSpec


@dataclass(frozen=True)
class EngineConfig:
    """What the engine's workers need: resolved model sources and devices (built from a
    RunConfig by `Prepared.engine_config`; tests build it directly)."""

    strategy: EngineStrategy
    target_src: str
    draft_src: str | None
    target_device: str
    draft_device: str | None
    dtype: str = "bfloat16"
    capacity: int = 65536  # max tokens (prompt + generated) the shared arrays hold
    stall_timeout: float = 300.0  # seconds without a target event before the run is failed
    # the user's speed switches, as RunConfig has them; engine/plan.py alone resolves them
    adaptive: bool = True
    spec_cache: bool = True
    siblings: bool = True
    tree: bool = True
    draft_lookup: bool = True
    lend_core: bool = True
    draft_quant: str = "none"  # "int8" quantizes the draft's linear layers (CPU devices only)
    kv_cache: str = "dynamic"  # "static": preallocated KV lines (engine/static_runner.py)
    cuda_graphs: bool = False  # with the static cache, on a GPU: engine/graphs.py
    gpu_share: int | None = None  # amusd on one GPU under MPS: the draft's percent (engine/mps.py)
    preamble: tuple[int, ...] = ()  # the prompt head every run shares: cached at load time
    faults: dict[str, str] = field(default_factory=dict)  # tests: role -> fault spec
    sampling: SamplingParams = GREEDY

    def vocab_size(self) -> int:
        """The width of p and q rows: the larger of the two models' vocabularies."""
        sizes = [0]
        for src in (self.target_src, self.draft_src):
            config = Path(src or "") / "config.json"
            if src and config.is_file():
                sizes.append(int(json.loads(config.read_text()).get("vocab_size") or 0))
        return max(sizes)

    @property
    def ngram(self) -> bool:
        return parse_ngram(self.draft_src) is not None

    def worker_specs(self, t0_ns: int, plan: Plan) -> list[WorkerSpec]:
        """amusd: a target and a draft worker; every other strategy: one worker."""
        if self.strategy == "amusd":
            return [
                WorkerSpec("target", "amusd", self.target_device, self.dtype, self.target_src,
                           None, t0_ns, self.faults.get("target", ""), preamble=self.preamble,
                           borrow_core=plan.loan_core, kv_cache=self.kv_cache,
                           cuda_graphs=self.cuda_graphs,
                           mps_percent=worker_percent("target", self.gpu_share)),
                WorkerSpec("draft", "amusd", self.draft_device or self.target_device, self.dtype,
                           None, self.draft_src, t0_ns, self.faults.get("draft", ""),
                           self.draft_quant, preamble=self.preamble,
                           tokenizer_src=self.target_src if self.ngram else None,
                           kv_cache=self.kv_cache, cuda_graphs=self.cuda_graphs,
                           mps_percent=worker_percent("draft", self.gpu_share)),
            ]
        draft_src = self.draft_src if draft_runs_with_target(self.strategy) else None
        # sync with a device per model (the paper's baseline) still runs in one process
        own = self.draft_device if draft_src and self.draft_device != self.target_device else None
        return [WorkerSpec("target", self.strategy, self.target_device, self.dtype,
                           self.target_src, draft_src, t0_ns, self.faults.get("target", ""),
                           self.draft_quant, self.preamble, draft_device=own,
                           kv_cache=self.kv_cache, cuda_graphs=self.cuda_graphs)]
