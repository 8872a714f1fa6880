"""Where the app's events come from: a live engine, or a recorded log played back in time.
Both put events on the app's queue; the app cannot tell them apart."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from amusd_viz.errors import RunFailed, UserError
from amusd_viz.events import Error


class _RunSink:
    """Forwards one run's events; drops stragglers once a newer run has replaced it."""

    def __init__(self, source: "LiveSource", run_no: int, sink) -> None:
        self.source, self.run_no, self.sink = source, run_no, sink

    def emit(self, event) -> None:
        if self.source.run_no == self.run_no:
            self.sink.emit(event)


class LiveSource:
    """Runs real models: each run is an engine in a thread worker, started by the app."""

    can_run = True

    def __init__(self, prepared, args, prompt: str, devices_for) -> None:
        # multiprocessing starts its resource tracker with a copy of stderr; inside Textual stderr
        # is a capture object without a file descriptor, so start it now, before the app runs.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        self.prepared = prepared
        self.args = args
        self.prompt = prompt
        self.strategy = args.strategy
        self.lookahead = args.lookahead
        self.devices_for = devices_for  # strategy -> (target_device, draft_device)
        self.engine = None
        self.run_no = 0
        self.exit_code = 0

    def start(self, app) -> None:
        self.run(app)

    def run(self, app, strategy: str | None = None, prompt: str | None = None) -> None:
        self.stop()
        self.strategy = strategy or self.strategy
        self.prompt = prompt or self.prompt
        self.run_no += 1
        target_device, draft_device = self.devices_for(self.strategy)
        prepared = dataclasses.replace(self.prepared, strategy=self.strategy,
                                       target_device=target_device, draft_device=draft_device)
        run_no, prompt_now, lookahead = self.run_no, self.prompt, self.lookahead
        app.run_in_thread(lambda: self._job(app, prepared, run_no, prompt_now, lookahead))

    def _events_path(self, run_no: int) -> Path | None:
        path = self.args.events
        if path is None or run_no == 1:
            return path
        return path.with_name(f"{path.stem}.run{run_no}{path.suffix}")

    def _job(self, app, prepared, run_no: int, prompt: str, lookahead: int) -> None:
        from amusd_viz.cli import engine_extra, log_config
        from amusd_viz.engine.run import execute
        from amusd_viz.engine.session import RunCancelled
        from amusd_viz.eventlog import JsonlRecorder, make_header
        from amusd_viz.events import FanOut

        sink = _RunSink(self, run_no, app.sink)
        recorder = None
        try:
            path = self._events_path(run_no)
            if path is not None:
                cfg = log_config(self.args, prompt, prepared.target_device, prepared.draft_device)
                cfg.update(strategy=prepared.strategy, lookahead=lookahead)
                recorder = JsonlRecorder(path, make_header(cfg))
            summary = execute(prepared, FanOut(sink, recorder), prompt, self.args.max_new_tokens,
                              lookahead, engine_extra=engine_extra(self.args, prepared.draft_device),
                              on_engine=self._set_engine)
            if self.args.summary_json and self.run_no == run_no:
                self.args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
            self.exit_code = 0
        except RunCancelled:
            pass
        except RunFailed:  # the engine has already emitted the error event
            self.exit_code = 1
        except UserError as exc:
            self.exit_code = 1
            sink.emit(Error(t=0.0, message=str(exc)))
        except Exception as exc:  # noqa: BLE001 - shown in the app, never a silent hang
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

    def set_lookahead(self, step: int) -> int:
        self.lookahead = max(1, min(32, self.lookahead + step))
        return self.lookahead

    # hooks the app calls on every source
    def advance(self, app) -> None:
        pass

    def set_paused(self, paused: bool) -> bool:
        return paused

    def step(self, app) -> None:
        app.notify("step works in replays; space pauses a live display", severity="warning")

    def status_suffix(self) -> str:
        return ""

    def on_finished(self, app, state) -> None:
        pass


class ReplaySource:
    """Plays a recorded log: a clock advances with real time × speed and releases the events
    whose time has come. Loading time is skipped: playback starts at the first forward pass."""

    can_run = False

    def __init__(self, events: list, speed: float = 1.0, name: str = "") -> None:
        self.events = events
        self.speed = speed
        self.name = name
        self.i = 0
        self.paused = False
        first = next((e.t for e in events if e.type == "forward"), 0.0)
        self.start_t = max(0.0, first - 0.3)
        self.clock = self.start_t
        self.end_t = max((e.t + getattr(e, "dur", 0.0) for e in events), default=0.0)
        self._last = time.monotonic()

    def start(self, app) -> None:
        self._last = time.monotonic()
        self._release(app, lambda e: e.t <= self.clock or e.type in ("run_started", "worker_ready"))

    def _release(self, app, due) -> None:
        while self.i < len(self.events) and due(self.events[self.i]):
            app.sink.emit(self.events[self.i])
            self.i += 1

    def advance(self, app) -> None:
        now = time.monotonic()
        if not self.paused:
            self.clock = min(self.end_t, self.clock + (now - self._last) * self.speed)
            self._release(app, lambda e: e.t <= self.clock)
        self._last = now

    def set_paused(self, paused: bool) -> bool:
        self.paused = paused
        return paused

    def step(self, app) -> None:
        """Play up to and including the next committed token, then hold."""
        self.paused = True
        while self.i < len(self.events):
            event = self.events[self.i]
            app.sink.emit(event)
            self.i += 1
            self.clock = max(self.clock, event.t)
            if event.type == "token_committed":
                break

    def seek(self, app, target: str) -> None:
        """`3.5` seeks to 3.5 s after playback's start; `#42` to just after token 42's commit."""
        target = target.strip()
        if target.startswith("#"):
            try:
                pos = int(target[1:])
            except ValueError:
                raise ValueError(f"not a token position: {target!r}") from None
            stop = next((i + 1 for i, e in enumerate(self.events)
                         if e.type == "token_committed" and e.pos == pos), None)
            if stop is None:
                raise ValueError(f"no token #{pos} in this log")
        else:
            try:
                when = self.start_t + float(target.rstrip("s"))
            except ValueError:
                raise ValueError(f"not a time or #position: {target!r}") from None
            stop = next((i for i, e in enumerate(self.events)
                         if e.t > when and e.type not in ("run_started", "worker_ready")),
                        len(self.events))
        from amusd_viz.ui.state import RunState

        app.sink.queue.clear()
        app.state = RunState()
        app.history.clear()
        for event in self.events[:stop]:
            app.sink.emit(event)
        self.i = stop
        self.clock = max([self.start_t] + [e.t for e in self.events[:stop]])

    def status_suffix(self) -> str:
        state = "paused" if self.paused else "replay"
        done = " (end)" if self.i >= len(self.events) else ""
        return (f"{state} ×{self.speed:g} {self.clock - self.start_t:.1f}/"
                f"{self.end_t - self.start_t:.1f} s{done}")

    def stop(self) -> None:
        pass

    def on_finished(self, app, state) -> None:
        pass
