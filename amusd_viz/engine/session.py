"""The coordinator: starts the worker processes, sends them requests, forwards their events to
the sink, and notices a worker that died or stalled. Imports no torch."""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import wait as wait_readable
from dataclasses import dataclass, field

from amusd_viz.errors import RunFailed


class RunCancelled(Exception):
    """The run was stopped on purpose (quit, new prompt, Ctrl+C)."""
from amusd_viz.events import Error, WorkerLost
from amusd_viz.engine.loops import Request
from amusd_viz.engine.shared import SharedState
from amusd_viz.engine.worker import WorkerSpec, worker_main

STRATEGIES = ("ar", "sync", "amusd", "hf-generate", "hf-assisted")


@dataclass
class EngineConfig:
    strategy: str
    target_src: str
    draft_src: str | None
    target_device: str
    draft_device: str | None
    dtype: str = "bfloat16"
    capacity: int = 65536  # max tokens (prompt + generated) the shared arrays hold
    stall_timeout: float = 300.0  # seconds without a target event before the run is failed
    wait_steps: float = 0.0  # amusd: >0 lets the target wait for drafts (Pace; docs/protocol.md)
    draft_quant: str = "none"  # "int8" quantizes the draft's linear layers (CPU devices only)
    preamble: tuple[int, ...] = ()  # the prompt head every run shares: cached at load time
    faults: dict[str, str] = field(default_factory=dict)  # tests: role -> fault spec


@dataclass
class Generation:
    token_ids: list[int]
    stop_reason: str
    start_t: float  # seconds on the run's clock when the prompt went in
    end_t: float
    draft_lost: bool = False

    @property
    def wall_s(self) -> float:
        return self.end_t - self.start_t


@dataclass
class _Worker:
    spec: WorkerSpec
    process: mp.process.BaseProcess
    requests: object
    events: object  # the read end of this worker's own event pipe
    ready: bool = False
    lost: bool = False
    closed: bool = False  # its event pipe reached EOF


class Engine:
    """One set of worker processes for one strategy; serves any number of prompts."""

    def __init__(self, cfg: EngineConfig, sink, t0_ns: int | None = None) -> None:
        self.cfg = cfg
        self.sink = sink
        self.t0_ns = t0_ns if t0_ns is not None else time.perf_counter_ns()
        self.workers: dict[str, _Worker] = {}
        self._ctx = mp.get_context("spawn")
        self.shared: SharedState | None = None
        self._run_id = 0
        self._closed = False
        self._cancelled = False

    def now(self) -> float:
        return (time.perf_counter_ns() - self.t0_ns) / 1e9

    # lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        if cfg.strategy == "amusd":
            self.shared = SharedState(self._ctx, cfg.capacity, one_device=(
                (cfg.draft_device or cfg.target_device) == cfg.target_device))
            specs = [
                WorkerSpec("target", "amusd", cfg.target_device, cfg.dtype, cfg.target_src, None,
                           self.t0_ns, cfg.faults.get("target", ""), preamble=cfg.preamble),
                WorkerSpec("draft", "amusd", cfg.draft_device or cfg.target_device, cfg.dtype,
                           None, cfg.draft_src, self.t0_ns, cfg.faults.get("draft", ""),
                           cfg.draft_quant, preamble=cfg.preamble),
            ]
        else:
            specs = [WorkerSpec("target", cfg.strategy, cfg.target_device, cfg.dtype, cfg.target_src,
                                cfg.draft_src if cfg.strategy in ("sync", "hf-assisted") else None,
                                self.t0_ns,
                                cfg.faults.get("target", ""), cfg.draft_quant, cfg.preamble)]
        for spec in specs:
            # One event pipe per worker: a worker killed mid-message can only tear its own pipe
            # (one shared queue would leave its lock held and block the other worker).
            requests = self._ctx.Queue()
            events, worker_end = self._ctx.Pipe(duplex=False)
            process = self._ctx.Process(target=worker_main, name=f"amusd-viz-{spec.role}",
                                        args=(spec, requests, worker_end, self.shared), daemon=True)
            process.start()
            worker_end.close()  # so a dead worker's pipe reads EOF here
            self.workers[spec.role] = _Worker(spec, process, requests, events)

    def wait_ready(self) -> None:
        self._pump(lambda: all(w.ready or w.lost for w in self.workers.values()), phase="loading")

    def pids(self) -> dict[str, int]:
        return {role: w.process.pid for role, w in self.workers.items()}

    def close(self) -> None:
        """Stop every worker: politely, then by force. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        for w in self.workers.values():
            if w.process.is_alive():
                try:
                    w.requests.put(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 2.0
        for w in self.workers.values():
            w.process.join(max(0.0, deadline - time.monotonic()))
        for w in self.workers.values():
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(1.0)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1.0)
        for w in self.workers.values():
            w.requests.cancel_join_thread()
            w.events.close()

    def cancel(self) -> None:
        """Stop now, from any thread: kill the workers; a running generate() raises RunCancelled."""
        self._cancelled = True
        for w in self.workers.values():
            if w.process.is_alive():
                w.process.kill()
        self.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # generation -----------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], max_new_tokens: int, lookahead: int,
                 eos_ids: frozenset[int], max_ahead: int = 0) -> Generation:
        if len(prompt_ids) + max_new_tokens + 2 * lookahead + 2 > self.cfg.capacity:
            raise RunFailed("prompt and --max-new-tokens exceed the engine's capacity")
        self._run_id += 1
        run_id = self._run_id
        if self.shared is not None:
            self.shared.reset()
            self.shared.set_draft_alive(not self.workers["draft"].lost)
        start_ns = time.perf_counter_ns()
        req = Request(list(prompt_ids), max_new_tokens, lookahead, eos_ids, self.t0_ns, max_ahead,
                      self.cfg.wait_steps)
        live = [w for w in self.workers.values() if not w.lost]
        for w in live:
            w.requests.put((run_id, req))
        self._done: dict[str, object] = {}
        self._pump(lambda: all(w.spec.role in self._done or w.lost for w in live),
                   phase="generating", run_id=run_id)
        outcome = self._done["target"]
        return Generation(outcome.token_ids, outcome.stop_reason,
                          (start_ns - self.t0_ns) / 1e9, (outcome.end_ns - self.t0_ns) / 1e9,
                          draft_lost=self.workers.get("draft", None) is not None
                          and self.workers["draft"].lost)

    # the message pump -----------------------------------------------------------------------
    def _pump(self, finished, phase: str, run_id: int = 0) -> None:
        last_target_news = time.monotonic()
        draft_done_deadline = None
        while not finished():
            if self._cancelled:
                raise RunCancelled()
            msg = self._next_message()
            if isinstance(msg, tuple):
                kind, role = msg[0], msg[1]
                if kind == "ready":
                    self.workers[role].ready = True
                elif kind == "done" and msg[2] == run_id:
                    self._done[role] = msg[3]
                elif kind == "failed":
                    self._lose(role, msg[2], phase)
                if role == "target":
                    last_target_news = time.monotonic()
            elif msg is not None:
                if getattr(msg, "role", "target") == "target":
                    last_target_news = time.monotonic()
                self.sink.emit(msg)
            for role, w in self.workers.items():
                if not w.lost and (w.closed or msg is None) and not w.process.is_alive():
                    self._lose(role, f"the {role} worker (pid {w.process.pid}) exited with code "
                               f"{w.process.exitcode}", phase)
            if phase == "generating":
                if time.monotonic() - last_target_news > self.cfg.stall_timeout:
                    self._lose("target", f"the target worker made no progress for "
                               f"{self.cfg.stall_timeout:.0f} s (--stall-timeout)", phase)
                # once the target is done the draft must stop within a few seconds
                if "target" in self._done and "draft" in self.workers and "draft" not in self._done:
                    draft_done_deadline = draft_done_deadline or time.monotonic() + 10.0
                    if time.monotonic() > draft_done_deadline and not self.workers["draft"].lost:
                        self._lose("draft", "the draft worker did not stop after the run", phase)

    def _next_message(self):
        """The next message from any worker, or None after 0.2 s without one."""
        open_pipes = {w.events: w for w in self.workers.values() if not w.lost and not w.closed}
        for conn in wait_readable(list(open_pipes), timeout=0.2):
            try:
                return conn.recv()
            except (EOFError, OSError):  # the worker is gone; its exit code tells the rest
                open_pipes[conn].closed = True
        return None

    def _lose(self, role: str, message: str, phase: str) -> None:
        if self._cancelled:
            raise RunCancelled()
        w = self.workers[role]
        if w.lost:
            return
        w.lost = True
        if w.process.is_alive():
            w.process.kill()
        if role == "draft":
            # The target never depends on the draft, so the run goes on as plain decoding.
            if self.shared is not None:
                self.shared.set_draft_alive(False)
            self.sink.emit(WorkerLost(t=self.now(), role="draft",
                                      message=f"{message}; continuing with the target alone"))
            return
        self.sink.emit(Error(t=self.now(), role=role, message=message))
        raise RunFailed(f"{message}. The run stopped; events up to here are kept.")
