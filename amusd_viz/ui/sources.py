"""Where the app's events come from: a live engine, or a recorded log played back in time.

Both are `Source`s: they put events on the sink the app gives them, and declare what they can do
(`can_rerun`, `can_seek`) instead of the app probing for methods. A source never touches the
app's state: a replay's seek hands back the events to show, and the app rebuilds from them.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from amusd_viz.config import MAX_LOOKAHEAD, RunConfig
from amusd_viz.errors import RunFailed, UserError
from amusd_viz.events import Error, EventSink, Forward

Job = Callable[[], None]
UI_NICENESS = 10  # the UI yields the cores to the workers (docs/architecture.md, "Sources")
MIN_SPEED, MAX_SPEED = 1 / 16, 64.0  # replay speed limits for `<` and `>`
REPLAY_LEAD_IN_S = 0.3  # a replay starts this long before the first forward pass


class Source:
    """The contract between the app and whatever feeds it events."""

    can_rerun: ClassVar[bool] = False  # runs models: re-run, new prompt, lookahead
    can_seek: ClassVar[bool] = False  # plays a recording: step, seek, speed

    def __init__(self) -> None:
        self.sink: EventSink | None = None
        self.exit_code = 0

    def attach(self, sink: EventSink) -> None:
        """`sink` takes the events; any thread may call it."""
        self.sink = sink

    def emit(self, event) -> None:
        assert self.sink is not None, "attach() the source first"
        self.sink.emit(event)

    def start(self) -> None:
        """Begin feeding events."""

    def advance(self) -> None:
        """Called on every tick of the app's timer."""

    def set_paused(self, paused: bool) -> bool:
        return paused

    def status_suffix(self) -> str:
        return ""

    def stop(self) -> None:
        """End whatever runs; safe to call more than once."""


class _RunSink:
    """Forwards one run's events; drops stragglers once a newer run has replaced it."""

    def __init__(self, source: LiveSource, run_no: int) -> None:
        self.source, self.run_no = source, run_no

    def emit(self, event) -> None:
        if self.source.run_no == self.run_no:
            self.source.emit(event)


class LiveSource(Source):
    """Runs real models: each run is an engine driven from the source's own launcher thread.

    The launcher thread exists before the UI lowers its own priority (`lower_ui_priority`): on
    Linux a thread's nice value is inherited by the threads and processes it starts, so the
    workers it spawns keep the normal priority while the UI yields the cores to them.
    """

    can_rerun = True

    def __init__(self, prepared, cfg: RunConfig) -> None:
        super().__init__()
        # multiprocessing starts its resource tracker with a copy of stderr; inside Textual stderr
        # is a capture object without a file descriptor, so start it now, before the app runs.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        self.prepared = prepared
        self.cfg = cfg
        self.engine = None
        self.run_no = 0
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._launcher = threading.Thread(target=self._serve_jobs, name="amusd-viz-runs",
                                          daemon=True)
        self._launcher.start()

    def _serve_jobs(self) -> None:
        """One run at a time, in order: a cancelled run ends before the next one starts."""
        while (job := self._jobs.get()) is not None:
            job()

    def start(self) -> None:
        self.run()

    def run(self, strategy: str | None = None, prompt: str | None = None) -> None:
        """Start a run (stopping the one under way): another strategy and/or prompt."""
        from amusd_viz.engine.devices import resolve_run

        self.stop()
        update: dict = {"prompt": prompt} if prompt else {}
        cfg = self.cfg.model_copy(update=update)
        if strategy and strategy != cfg.strategy:
            cfg = resolve_run(cfg.with_strategy(strategy))
        self.cfg = cfg
        self.run_no += 1
        run_no = self.run_no
        self._jobs.put(lambda: self._job(cfg, run_no))

    def _events_path(self, run_no: int) -> Path | None:
        path = self.cfg.events
        if path is None or run_no == 1:
            return path
        return path.with_name(f"{path.stem}.run{run_no}{path.suffix}")

    def _job(self, cfg: RunConfig, run_no: int) -> None:
        from amusd_viz.engine.run import execute
        from amusd_viz.engine.session import RunCancelled
        from amusd_viz.eventlog import JsonlRecorder, make_header
        from amusd_viz.events import FanOut

        sink = _RunSink(self, run_no)
        recorder = None
        try:
            path = self._events_path(run_no)
            if path is not None:
                recorder = JsonlRecorder(path, make_header(cfg.log_config()))
            sinks = [sink] if recorder is None else [sink, recorder]
            summary = execute(self.prepared, cfg, FanOut(*sinks),
                              on_engine=self._set_engine)
            if cfg.summary_json and self.run_no == run_no:
                cfg.summary_json.write_text(summary.to_json() + "\n", encoding="utf-8")
            self.exit_code = 0
        except RunCancelled:
            pass
        except RunFailed:  # the engine has already emitted the error event
            self.exit_code = 1
        except UserError as exc:
            self.exit_code = 1
            sink.emit(Error(t=0.0, message=str(exc)))
        except Exception as exc:
            self.exit_code = 1
            sink.emit(Error(t=0.0, message=f"{type(exc).__name__}: {exc}"))
        finally:
            if recorder:
                recorder.close()

    def _set_engine(self, engine) -> None:
        self.engine = engine

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.cancel()
            self.engine = None

    def change_sampling(self, temperature: float | None = None,
                        acceptance: str | None = None) -> RunConfig:
        """For the next run: a temperature and/or acceptance rule (greedy at 0)."""
        update: dict = {}
        if temperature is not None:
            update["temperature"] = temperature
        if acceptance is not None:
            update["acceptance"] = acceptance
        self.cfg = self.cfg.model_copy(update=update)
        return self.cfg

    def change_lookahead(self, step: int) -> int:
        """For the next run; returns the new value."""
        value = max(1, min(MAX_LOOKAHEAD, self.cfg.lookahead + step))
        self.cfg = self.cfg.model_copy(update={"lookahead": value})
        return value


class ReplaySource(Source):
    """Plays a recorded log: a clock advances with real time × speed and releases the events
    whose time has come. Loading time is skipped: playback starts at the first forward pass."""

    can_seek = True
    _AT_START = ("run_started", "worker_ready")  # shown at once, whatever their time

    def __init__(self, events: list, speed: float = 1.0, name: str = "") -> None:
        super().__init__()
        self.events = events
        self.speed = speed
        self.name = name
        self.i = 0
        self.paused = False
        first = next((e.t for e in events if e.type == "forward"), 0.0)
        self.start_t = max(0.0, first - REPLAY_LEAD_IN_S)
        # the app's one clock: seconds since the prompt went in (RunState.started_at)
        self.zero = next((e.started_at for e in events
                          if e.type == "run_finished" and e.started_at is not None), first)
        self.clock = self.start_t
        self.end_t = max((e.t + (e.dur if isinstance(e, Forward) else 0.0) for e in events),
                         default=0.0)
        self._last = time.monotonic()

    def start(self) -> None:
        self._last = time.monotonic()
        self._release(lambda e: e.t <= self.clock or e.type in self._AT_START)

    def _release(self, due) -> None:
        while self.i < len(self.events) and due(self.events[self.i]):
            self.emit(self.events[self.i])
            self.i += 1

    def advance(self) -> None:
        now = time.monotonic()
        if not self.paused:
            self.clock = min(self.end_t, self.clock + (now - self._last) * self.speed)
            self._release(lambda e: e.t <= self.clock)
        self._last = now

    def set_paused(self, paused: bool) -> bool:
        self.paused = paused
        return paused

    def step(self) -> None:
        """Play up to and including the next committed token, then hold."""
        self.paused = True
        while self.i < len(self.events):
            event = self.events[self.i]
            self.emit(event)
            self.i += 1
            self.clock = max(self.clock, event.t)
            if event.type == "token_committed":
                break

    def change_speed(self, factor: float) -> float:
        self.speed = min(MAX_SPEED, max(MIN_SPEED, self.speed * factor))
        return self.speed

    def seek(self, target: str) -> list:
        """`3.5` seeks to 3.5 s after the prompt went in (the header's clock); `#42` to just
        after token 42's commit. Returns every event up to there: the app rebuilds its view from them."""
        stop = self._seek_index(target.strip())
        self.i = stop
        self.clock = max([self.start_t] + [e.t for e in self.events[:stop]])
        return self.events[:stop]

    def _seek_index(self, target: str) -> int:
        if target.startswith("#"):
            try:
                pos = int(target[1:])
            except ValueError:
                raise ValueError(f"not a token position: {target!r}") from None
            stop = next((i + 1 for i, e in enumerate(self.events)
                         if e.type == "token_committed" and e.pos == pos), None)
            if stop is None:
                raise ValueError(f"no token #{pos} in this log")
            return stop
        try:
            when = self.zero + float(target.rstrip("s"))
        except ValueError:
            raise ValueError(f"not a time or #position: {target!r}") from None
        return next((i for i, e in enumerate(self.events)
                     if e.t > when and e.type not in self._AT_START), len(self.events))

    def status_suffix(self) -> str:
        state = "paused" if self.paused else "replay"
        done = " (end)" if self.i >= len(self.events) else ""
        return (f"{state} ×{self.speed:g} {self.clock - self.zero:.1f}/"
                f"{self.end_t - self.zero:.1f} s{done}")


def lower_ui_priority() -> None:
    """Let the calling thread (the UI's; on Linux the policy and nice value are per thread) run
    only on cores the workers leave idle: SCHED_IDLE where allowed, else nice. A worker using
    every core synchronises its threads at each layer, so any slice the UI takes from one of
    them stalls them all; idle-class drawing waits for the gaps between passes instead. Threads
    started later inherit the policy."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):  # not Linux, or not allowed: fall back to nice
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, UI_NICENESS)
    except (AttributeError, OSError):  # drawing just competes
        pass
