"""CUDA graphs per pass size over the static KV cache (`--cuda-graphs`, issue 30).

An eager transformers forward launches about a thousand kernels from Python: on an H100 every
pass took ~25 ms whatever the model (docs/benchmarks.md, "GPU check"), while the weights stream
in a few. A CUDA graph records one pass's kernels once and replays them with one launch. A graph
replays fixed shapes at fixed addresses, so (as in gpt-fast, SGLang and vLLM) the runner is a
StaticRunner with buckets: every pass is padded to one of a few sizes, its inputs (the ids and
four integers per row, from which the replay itself builds the positions and the attention mask
over the whole line: engine/masks.py) go into the graph's own buffer in one small copy, and
the cache line never moves (forks are other lines; they and any pass larger than the largest
bucket run eagerly, at the bucket's padded size).

Not blind trust: each captured graph is replayed once at load beside the eager pass on the same
inputs, and kept only if every row picks the same token or a near-tie of it
(amusd_viz/lossless.py); a graph that disagrees or fails to capture is dropped for eager, and
`worker_ready` names it. The line's length is fixed at load (GRAPH_LINE_TOKENS): a run that
outgrows it goes on eagerly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from amusd_viz.engine import masks
from amusd_viz.engine.static_runner import StaticRunner

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32)
GRAPH_LINE_TOKENS = 4096


@dataclass
class Captured:
    """One bucket's graph and the buffers it reads and writes."""

    graph: torch.cuda.CUDAGraph
    table: torch.Tensor  # [5, size]: ids, then masks.pass_rows (the mask is built in the replay)
    logits: torch.Tensor  # [1, size, vocab]: overwritten by the next replay


@dataclass
class GraphReport:
    """What `worker_ready` says: the buckets kept, those dropped (and why), the capture time."""

    kept: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    def as_fields(self) -> dict:
        return {"graphs": self.kept, "graph_s": round(self.seconds, 3),
                "graphs_dropped": {str(size): why for size, why in self.dropped.items()}}


class GraphRunner(StaticRunner):
    def __init__(self, model, device: str, tokenizer=None, top_k: int = 5) -> None:
        super().__init__(model, device, tokenizer, top_k, line_tokens=GRAPH_LINE_TOKENS,
                         buckets=GRAPH_BUCKETS)
        self.graphs: dict[int, Captured] = {}
        self._line_of_graphs: object = None  # the line the graphs write: the main line
        self.graph_report: GraphReport | None = None  # set at load (loading._make_runner)
        self.replays = 0  # passes the graphs ran (tests, reports)

    def _call(self, size: int, table: torch.Tensor) -> torch.Tensor:
        captured = self.graphs.get(size)
        if captured is None or self.cache is not self._line_of_graphs:
            return super()._call(size, table)
        captured.table.copy_(table, non_blocking=True)  # the pass's one host-to-device copy
        captured.graph.replay()  # writes the line at the pointer and moves it, as eager does
        self.replays += 1
        return captured.logits[0].clone()

    @torch.inference_mode()
    def capture(self) -> GraphReport:
        """Capture one graph per bucket on the main line, each checked against eager."""
        report, start = GraphReport(), time.perf_counter()
        self.reset()
        self.forward(list(range(3, 3 + 2 * GRAPH_BUCKETS[-1])), 1)  # a few real slots to see
        self._line_of_graphs, pool = self.cache, torch.cuda.graph_pool_handle()
        for size in self.buckets:
            try:
                captured = self._capture(size, pool)
                problem = self._disagreement(size, captured)
            except Exception as exc:  # a capture that fails is dropped, not fatal
                captured, problem = None, f"{type(exc).__name__}: {exc}"[:200]
                self.set_pointer(len(self.ids))  # whatever it wrote is past the line's end
            if problem is None and captured is not None:
                self.graphs[size] = captured
                report.kept.append(size)
            else:
                report.dropped[size] = problem or "no graph"
        self.reset()
        torch.cuda.synchronize(self.device)
        report.seconds = time.perf_counter() - start
        return report

    def _table(self, size: int) -> torch.Tensor:
        """A real pass of `size` tokens after what the line holds: ids, then its rows."""
        ids = torch.tensor([[(7 * i + 3) % self.vocab for i in range(size)]], dtype=torch.long)
        return torch.cat([ids, masks.pass_rows(len(self.ids), size, (), size)])

    def _capture(self, size: int, pool) -> Captured:
        buffers = Captured(torch.cuda.CUDAGraph(), self._table(size).to(self.device),
                           torch.empty(0))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(2):
                self._eager(buffers.table)
                self.cache.crop(-size)  # type: ignore[union-attr]
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.cuda.graph(buffers.graph, pool=pool):
            buffers.logits = self._eager(buffers.table)  # recorded, not run: the pointer stays
        return buffers

    def _disagreement(self, size: int, captured: Captured) -> str | None:
        """Replay beside an eager pass on the same inputs: None where every row agrees."""
        from amusd_viz.lossless import TopTwo, is_near_tie

        eager = self._eager(captured.table)[0].float()
        self.cache.crop(-size)  # type: ignore[union-attr]
        captured.graph.replay()
        graphed = captured.logits[0].float()
        self.cache.crop(-size)  # type: ignore[union-attr]
        if not bool(torch.isfinite(graphed).all()):
            return "not finite"
        dtype = str(self.model.dtype).removeprefix("torch.")
        for row, (e, g) in enumerate(zip(eager, graphed, strict=True)):
            want, got = int(e.argmax()), int(g.argmax())
            top = TopTwo(want, float(e[want]), got, float(e[got]))
            if got != want and not is_near_tie(got, top, dtype, str(self.device)):
                return f"row {row}: token {got} where eager picks {want}"
        return None
