"""The coordinator: starts the worker processes, sends them requests, forwards their events to
the sink, and notices a worker that died or stalled. Imports no torch."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_readable
from typing import Any

from typing_extensions import Self

from amusd_viz.config import SamplingParams, parse_ngram
from amusd_viz.engine.devices import check_gpu_memory
from amusd_viz.engine.estimate import FLAT, PassCost
from amusd_viz.engine.messages import Done, Failed, Ready, RunRequest
from amusd_viz.engine.plan import plan_for
from amusd_viz.engine.policies import schedule_for
from amusd_viz.engine.request import Outcome, Request
from amusd_viz.engine.schedule import Concurrent
from amusd_viz.engine.settings import EngineConfig
from amusd_viz.engine.shared import SharedState
from amusd_viz.engine.worker import WorkerSpec, worker_main
from amusd_viz.errors import RunFailed
from amusd_viz.events import Error, WorkerLost, WorkerReady

POLL_S = 0.2  # the pump wakes at least this often to check liveness and stalls
DRAFT_STOP_GRACE_S = 10.0  # after the target is done, the draft must stop within this
CLOSE_GRACE_S = 2.0  # a polite stop, before terminate() and kill()


class RunCancelled(Exception):
    """The run was stopped on purpose (quit, new prompt, Ctrl+C)."""


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
    requests: Any  # a multiprocessing Queue of RunRequest (None: stop)
    events: Connection  # the read end of this worker's own event pipe
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
        self.plan = plan_for(cfg)  # every speed policy, resolved once for both workers
        self.shared: SharedState | None = None
        self.schedule: Concurrent | None = None  # amusd: how the workers share compute
        self._run_id = 0
        self.target_cost = FLAT  # timed at load: its worker_ready says
        self._closed = False
        self._cancelled = False
        self._done: dict[str, Outcome | int] = {}
        self.vocab = cfg.vocab_size()  # the width of p and q rows when sampling

    def now(self) -> float:
        return (time.perf_counter_ns() - self.t0_ns) / 1e9

    # lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        specs = cfg.worker_specs(self.t0_ns, self.plan)
        check_gpu_memory([(src, spec.device) for spec in specs
                          for src in (spec.target_src, spec.draft_src)
                          if src and parse_ngram(src) is None], cfg.dtype)
        if cfg.strategy == "amusd":
            self.shared = SharedState(self._ctx, cfg.capacity,
                                      vocab=0 if cfg.sampling.greedy else self.vocab)
            self.schedule = schedule_for(self.plan, self._ctx, self.shared)
        for spec in specs:
            # One event pipe per worker: a worker killed mid-message can only tear its own pipe
            # (one shared queue would leave its lock held and block the other worker).
            requests = self._ctx.Queue()
            events, worker_end = self._ctx.Pipe(duplex=False)
            process = self._ctx.Process(target=worker_main, name=f"amusd-viz-{spec.role}",
                                        args=(spec, requests, worker_end, self.shared, self.schedule),
                                        daemon=True)
            process.start()
            worker_end.close()  # so a dead worker's pipe reads EOF here
            self.workers[spec.role] = _Worker(spec, process, requests, events)

    def wait_ready(self) -> None:
        self._pump(lambda: all(w.ready or w.lost for w in self.workers.values()), phase="loading")

    def pids(self) -> dict[str, int]:
        return {role: w.process.pid for role, w in self.workers.items()
                if w.process.pid is not None}

    def close(self) -> None:
        """Stop every worker: politely, then by force. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        for w in self.workers.values():
            if w.process.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    w.requests.put(None)
        deadline = time.monotonic() + CLOSE_GRACE_S
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # generation -----------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], max_new_tokens: int, lookahead: int,
                 eos_ids: frozenset[int], max_ahead: int = 0,
                 sampling: SamplingParams | None = None) -> Generation:
        """One run; `sampling` overrides the engine's settings for this run (an engine started
        greedy has no room for the draft's q rows: amusd needs a sampling engine to sample)."""
        if len(prompt_ids) + max_new_tokens + 2 * lookahead + 2 > self.cfg.capacity:
            raise RunFailed("prompt and --max-new-tokens exceed the engine's capacity")
        sampling = sampling or self.cfg.sampling
        if not sampling.greedy and self.shared is not None and not self.shared.vocab:
            raise ValueError("this amusd engine was started greedy: it cannot sample")
        self._run_id += 1
        run_id = self._run_id
        if self.shared is not None and self.schedule is not None:
            self.shared.reset()
            self.schedule.reset()
            self.shared.set_draft_alive(not self.workers["draft"].lost)
        start_ns = time.perf_counter_ns()
        req = Request(list(prompt_ids), max_new_tokens, lookahead, eos_ids, self.t0_ns,
                      max_ahead=self.plan.max_ahead(lookahead, max_ahead), sampling=sampling,
                      vocab=self.vocab, plan=self.plan, target_cost=self.target_cost)
        live = [w for w in self.workers.values() if not w.lost]
        for w in live:
            w.requests.put(RunRequest(run_id, req))
        self._done = {}
        self._pump(lambda: all(w.spec.role in self._done or w.lost for w in live),
                   phase="generating", run_id=run_id)
        outcome = self._done["target"]
        assert isinstance(outcome, Outcome)
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
            sender, msg = self._next_message()
            self._handle(msg, phase, run_id)
            if sender == "target":  # anything from the target's own pipe is progress
                last_target_news = time.monotonic()
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
                    draft_done_deadline = (draft_done_deadline
                                           or time.monotonic() + DRAFT_STOP_GRACE_S)
                    if time.monotonic() > draft_done_deadline and not self.workers["draft"].lost:
                        self._lose("draft", "the draft worker did not stop after the run", phase)

    def _handle(self, msg, phase: str, run_id: int) -> None:
        """Act on one message from a worker: a control message, or an event to forward."""
        match msg:
            case None:
                pass
            case Ready(role=role):
                self.workers[role].ready = True
            case WorkerReady(role="target", pass_s=float(one), extra_token=float(extra)):
                self.target_cost = PassCost(one, one * extra)  # amusd's draft decides by it
                self.sink.emit(msg)
            case Done(role=role, run_id=done_id, outcome=outcome):
                if done_id == run_id:
                    self._done[role] = outcome
            case Failed(role=role, message=message):
                self._lose(role, message, phase)
            case _:  # an event
                self.sink.emit(msg)

    def _next_message(self) -> tuple[str | None, object]:
        """(sender's role, message) from any worker, or (None, None) after POLL_S without one."""
        open_pipes = {w.events: w for w in self.workers.values() if not w.lost and not w.closed}
        for conn in wait_readable(list(open_pipes), timeout=POLL_S):
            assert isinstance(conn, Connection)
            try:
                return open_pipes[conn].spec.role, conn.recv()
            except (EOFError, OSError):  # the worker is gone; its exit code tells the rest
                open_pipes[conn].closed = True
        return None, None

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
