"""The Textual app. A *source* (a live engine in a thread worker, or a recorded log) appends
events to a queue; a timer drains it a few times a second into RunState, and the widgets redraw
from that state. A live run and a replay take exactly this path."""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterable
from pathlib import Path

from rich.text import Text
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, Label, Markdown, Static

from amusd_viz.ui import charts
from amusd_viz.ui.palette import help_markdown
from amusd_viz.ui.sources import LiveSource, ReplaySource, Source
from amusd_viz.ui.state import RunState
from amusd_viz.ui.widgets import (
    Chart,
    Inspector,
    Legend,
    RunHeader,
    StatsPanel,
    Timeline,
    TokenStream,
)

TICK_S = 1 / 8  # redraw rate of the fast widgets (header, timeline, text)
SLOW_TICK_S = 1.0  # stats and inspector
CHART_TICK_S = 2.0  # the four plotext charts, the costliest frame, while a run is going on
TEMPERATURES = (0.0, 0.3, 0.7, 1.0)  # what `t` cycles through
MAX_EVENTS_PER_TICK = 5000  # a burst (a replay seek, a fast replay) spreads over a few ticks


class QueueSink:
    """An event sink any thread may call; the app drains it on its timer."""

    def __init__(self) -> None:
        self.queue: collections.deque = collections.deque()

    def emit(self, event) -> None:
        self.queue.append(event)


HELP = """\
# amusd-viz

A small **draft** model proposes tokens; a large **target** model verifies them. With **amusd**
both run at once on two devices; **sync** alternates them on one device; **ar** is the target alone.

| key | action |
|---|---|
| `←` `→` / `h` `l` | move the inspector's cursor over the tokens; `home` / `end` |
| `space` | pause / resume the display (live) or the playback (replay) |
| `+` `-` | zoom the timeline; `{` `}` scroll it; `f` follow the present |
| `1` `2` `3` | live: re-run this prompt with ar, sync or amusd (charts overlay the runs) |
| `[` `]` | live: lookahead down / up (for the next run) |
| `t` / `a` | live: temperature 0 → 0.3 → 0.7 → 1.0 / acceptance rule coupled ↔ rejection (next run) |
| `n` | live: a new prompt |
| `p` | the whole prompt (its start is above the text) |
| `s` | save the event log and a Perfetto trace of this run |
| `j` | replay: step to the next token; `g` seek (seconds, or #token); `<` `>` slower / faster |
| `ctrl+p` | command palette |
| `?` | this help; `escape` closes it |
| `q` | quit (stops every worker) |

**Stats**: *solo target passes* verified no draft (the draft had nothing ready); *no-waste
model* is the ms/token this run's pass times would give if no draft were wasted and no worker
waited, and *reached* how close the run came; *capped by* says why amusd cannot get far ahead of
sync here: on one shared device its workers take turns, and on two cores of one CPU sync gives
every pass both cores while amusd gives each model one. *drafts step aside* appears where a
pass's extra token costs most of a pass (a CPU without matrix units, AVX2 only: timed when the
models load): a verify pass of k drafts then costs nearly k passes, no draft can pay for its
place, and the adaptive policies let the target decode alone (amusd's draft rests and lends its
core). `--adaptive off` speculates anyway, to watch it, at a loss there.

"""


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP + help_markdown())


class FullPrompt(ModalScreen):
    """The run's whole prompt (the line above the text shows its start)."""

    BINDINGS = [Binding("escape,q,p", "dismiss", "close")]

    def __init__(self, prompt: str) -> None:
        super().__init__()
        self.prompt = prompt

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Label("[b]the prompt[/b] (escape closes)")
            yield Static(Text(self.prompt))


class PromptScreen(ModalScreen[str | None]):
    """Asks for a line of text (a new prompt, or a seek target)."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, title: str, placeholder: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical(id="prompt-box"):
            yield Label(self.title_text)
            yield Input(placeholder=self.placeholder, id="prompt-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class AmusdApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "amusd-viz"
    # app.tcss: the layout under 44 rows, and under 30 (no charts)
    VERTICAL_BREAKPOINTS = [(0, "-tiny"), (30, "-short"), (44, "-tall")]
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help"),
        Binding("space", "pause", "pause"),
        Binding("left,h", "cursor(-1)", "←", show=False),
        Binding("right,l", "cursor(1)", "→", show=False),
        Binding("home", "cursor_to(0)", show=False),
        Binding("end", "cursor_to(-1)", show=False),
        Binding("plus,equals_sign", "zoom(0.5)", "zoom", show=False),
        Binding("minus", "zoom(2)", show=False),
        Binding("left_curly_bracket", "scroll_timeline(-0.5)", show=False),
        Binding("right_curly_bracket", "scroll_timeline(0.5)", show=False),
        Binding("f", "follow", "follow", show=False),
        Binding("1", "rerun('ar')", "ar"),
        Binding("2", "rerun('sync')", "sync"),
        Binding("3", "rerun('amusd')", "amusd"),
        Binding("left_square_bracket", "lookahead(-1)", "look-", show=False),
        Binding("right_square_bracket", "lookahead(1)", "look+", show=False),
        Binding("n", "new_prompt", "new prompt"),
        Binding("p", "show_prompt", "prompt", show=False),  # the prompt line says so
        Binding("t", "temperature", "temp", show=False),
        Binding("a", "acceptance", "rule", show=False),
        Binding("s", "save", "save"),
        Binding("j", "step", "step"),
        Binding("g", "seek", "seek"),
        Binding("less_than_sign", "speed(0.5)", "slower"),
        Binding("greater_than_sign", "speed(2)", "faster"),
    ]
    # the footer offers only what works in this mode
    LIVE_ONLY = frozenset({"rerun", "new_prompt", "lookahead", "temperature", "acceptance"})
    REPLAY_ONLY = frozenset({"step", "seek", "speed"})

    def __init__(self, source: Source, save_dir: Path | None = None,
                 warnings: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.source = source
        self.warnings = warnings  # a replayed log's (a torn tail, ...): shown on the screen
        self.sink = QueueSink()
        source.attach(self.sink)
        self.state = RunState()
        self.history: list[RunState] = []  # finished runs on the current prompt
        self.cursor: int | None = None
        self.paused = False
        self.save_dir = save_dir or Path.cwd()
        self._drawn = -1
        self._slow_drawn = -1
        self._last_slow = 0.0
        self._last_chart = 0.0

    # layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        yield Timeline(id="timeline")
        with Horizontal(id="middle"):
            with Vertical(id="text-pane"):
                yield Label("", id="prompt-line")
                yield Legend(id="legend")
                with VerticalScroll(id="text-scroll"):
                    yield TokenStream(id="tokens")
            with Vertical(id="side"):
                yield StatsPanel(id="stats")
                yield Inspector(id="inspector")
        with Horizontal(id="charts"):
            yield Chart(charts.cumulative, id="chart-cumulative")
            yield Chart(charts.throughput, id="chart-throughput")
            yield Chart(charts.accepted_histogram, id="chart-histogram")
            yield Chart(charts.acceptance_by_position, id="chart-position")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#timeline").border_title = "timeline: one lane per device"
        self.query_one("#text-pane").border_title = "generated text"
        self.query_one("#stats").border_title = "stats"
        self.query_one("#inspector").border_title = "token inspector"
        self.set_interval(TICK_S, self.tick)
        for warning in self.warnings:
            self.notify(warning, title="the log", severity="warning", timeout=15)
        self.source.start()
        self.tick()

    # the event path -------------------------------------------------------------------------
    def tick(self) -> None:
        self.source.advance()
        if not (self.paused and self.source.can_rerun):  # a paused replay still takes its steps
            drained = 0
            while self.sink.queue and drained < MAX_EVENTS_PER_TICK:
                self._ingest(self.sink.queue.popleft())
                drained += 1
        # compose makes every widget: only a last tick during shutdown finds one missing
        with contextlib.suppress(NoMatches):
            self._redraw()

    def _ingest(self, event) -> None:
        if event.type == "run_started" and self.state.events:
            if self.state.prompt != event.prompt:
                self.history.clear()
            self.history.append(self.state)
            self.state = RunState()
            self.cursor = None
        self.state.ingest(event)

    def show_from(self, events: list) -> None:
        """Forget what is shown and rebuild it from `events` (a replay's seek)."""
        self.sink.queue.clear()
        self.state = RunState()
        self.history.clear()
        self.cursor = None
        for event in events:
            self._ingest(event)
        self._redraw(force=True)

    def _redraw(self, force: bool = False) -> None:
        state = self.state
        # a seekable source (a replay) says "paused" in its own suffix
        status = "paused" if self.paused and not self.source.can_seek else ""
        if state.version != self._drawn or force:
            self._drawn = state.version
            self.query_one(RunHeader).show(state, status + self.source.status_suffix())
            self._show_prompt_line(state.prompt)
            self.query_one(TokenStream).show(state, self.cursor)
            if self.cursor is None:
                self.query_one("#text-scroll").scroll_end(animate=False)
        self.query_one(Timeline).show(state)
        now = time.monotonic()
        # the slow widgets catch up at once whenever the run is not going on (done, paused)
        settled = state.status != "generating" or self.paused
        if ((state.version != self._slow_drawn and (settled or now - self._last_slow >= SLOW_TICK_S))
                or force):
            self._slow_drawn, self._last_slow = state.version, now
            stats = state.stats()  # one pass over the run's events per slow redraw
            self.query_one(StatsPanel).show(state, stats, self._ar_ms(), self.source.can_rerun)
            self.query_one(Inspector).show(state, self.cursor)
            if force or state.status != "generating" or now - self._last_chart >= CHART_TICK_S:
                self._last_chart = now
                self._draw_charts(stats.acceptance_by_position)

    def _show_prompt_line(self, prompt: str | None) -> None:
        line = " ".join((prompt or "").split())
        label = self.query_one("#prompt-line", Label)
        label.display = bool(line)
        label.update(Text.assemble(("prompt: ", "bold"), line, (" (p: all of it)", "grey50")))

    def _ar_ms(self) -> float | None:
        for run in reversed(self.history):
            if run.strategy == "ar" and run.status == "done" and run.tokens and run.wall_s:
                return 1000 * run.wall_s / len(run.tokens)
        return None

    def _draw_charts(self, acceptance_by_position: list[float]) -> None:
        state = self.state
        runs = [(f"{r.strategy} (earlier)" if r.strategy == state.strategy else r.strategy,
                 *r.commit_curve()) for r in self.history if r.tokens]
        runs.append((state.strategy or "run", *state.commit_curve()))
        self.query_one("#chart-cumulative", Chart).redraw(runs)
        self.query_one("#chart-throughput", Chart).redraw(state)
        self.query_one("#chart-histogram", Chart).redraw(state)
        self.query_one("#chart-position", Chart).redraw(acceptance_by_position)

    # actions --------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Live runs and replays have different keys: the other mode's are off (out of the
        footer and the palette; the help lists both)."""
        replay = not self.source.can_rerun
        return action not in (self.LIVE_ONLY if replay else self.REPLAY_ONLY)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_show_prompt(self) -> None:
        if self.state.prompt:
            self.push_screen(FullPrompt(self.state.prompt))
        else:
            self.notify("this run's log does not record its prompt", severity="warning")

    def action_pause(self) -> None:
        self.paused = self.source.set_paused(not self.paused)
        self._redraw(force=True)

    def action_cursor(self, step: int) -> None:
        n = len(self.state.tokens)
        if not n:
            return
        self.cursor = (n - 1 if step < 0 else 0) if self.cursor is None else \
            max(0, min(n - 1, self.cursor + step))
        self._redraw(force=True)

    def action_cursor_to(self, pos: int) -> None:
        n = len(self.state.tokens)
        if n:
            self.cursor = n - 1 if pos < 0 else min(pos, n - 1)
            self._redraw(force=True)

    def action_zoom(self, factor: float) -> None:
        self.query_one(Timeline).zoom(factor)

    def action_scroll_timeline(self, fraction: float) -> None:
        self.query_one(Timeline).scroll_by(fraction)

    def action_follow(self) -> None:
        self.query_one(Timeline).follow = True

    def _live(self) -> LiveSource | None:
        if isinstance(self.source, LiveSource):
            return self.source
        self.notify("a replay cannot run models", severity="warning")
        return None

    def _replay(self, what: str) -> ReplaySource | None:
        if isinstance(self.source, ReplaySource):
            return self.source
        self.notify(f"{what} works in replays; space pauses a live display", severity="warning")
        return None

    def action_rerun(self, strategy: str) -> None:
        if live := self._live():
            live.run(strategy=strategy)

    def action_lookahead(self, step: int) -> None:
        if live := self._live():
            value = live.change_lookahead(step)
            self.notify(f"lookahead {value} for the next run (press 1/2/3 to run)")

    def action_temperature(self, value: float | None = None) -> None:
        """Cycle the next run's temperature through TEMPERATURES (or set one)."""
        if live := self._live():
            now = live.cfg.temperature
            if value is None:
                later = [t for t in TEMPERATURES if t > now]
                value = later[0] if later else TEMPERATURES[0]
            cfg = live.change_sampling(temperature=value)
            self.notify(f"next run: {'greedy' if not value else f'temperature {value:g}'}, "
                        f"rule {cfg.acceptance_rule} (press 1/2/3 to run)")

    def action_acceptance(self, rule: str | None = None) -> None:
        """Switch the next run's acceptance rule (coupled / rejection)."""
        if live := self._live():
            if rule is None:
                rule = "rejection" if live.cfg.acceptance_rule == "coupled" else "coupled"
            cfg = live.change_sampling(acceptance=rule)
            note = "" if cfg.temperature else " (applies once the temperature is above 0: t)"
            self.notify(f"next run: acceptance {rule}{note}")

    def action_new_prompt(self) -> None:
        live = self._live()
        if live is None:
            return

        def submitted(text: str | None) -> None:
            if text:
                live.run(prompt=text)

        self.push_screen(PromptScreen("New prompt (enter runs it with the current strategy):",
                                      "e.g. Write a binary search in Python"), submitted)

    def action_save(self) -> None:
        from amusd_viz.eventlog import save_run

        try:
            log_path, trace_path = save_run(self.state.events, self.save_dir, self.state.strategy)
        except OSError as exc:
            self.notify(f"could not save: {exc}", severity="error")
            return
        self.notify(f"saved {log_path.name} and {trace_path.name}")

    def action_step(self) -> None:
        if replay := self._replay("step"):
            replay.step()

    def action_seek(self) -> None:
        replay = self._replay("seek")
        if replay is None:
            return

        def submitted(text: str | None) -> None:
            if text:
                try:
                    self.show_from(replay.seek(text))
                except ValueError as exc:
                    self.notify(str(exc), severity="error")

        self.push_screen(PromptScreen("Seek to a time in seconds (e.g. 3.5) or a token (#42):"),
                         submitted)

    def action_speed(self, factor: float) -> None:
        if replay := self._replay("speed"):
            replay.change_speed(factor)
            self._redraw(force=True)

    async def action_quit(self) -> None:
        self.source.stop()
        self.exit()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help", "Keys, colours and lanes explained", self.action_help)
        yield SystemCommand("Pause / resume", "Freeze or continue the display", self.action_pause)
        yield SystemCommand("Save run", "Write the event log and a Perfetto trace",
                            self.action_save)
        if self.source.can_rerun:
            for strategy in ("ar", "sync", "amusd"):
                yield SystemCommand(f"Re-run with {strategy}", "Same prompt; charts overlay runs",
                                    lambda s=strategy: self.action_rerun(s))
            yield SystemCommand("New prompt", "Type a prompt and run it", self.action_new_prompt)
            yield SystemCommand("Lookahead +1", "For the next run", lambda: self.action_lookahead(1))
            for value in TEMPERATURES:
                yield SystemCommand(f"Temperature {value:g}", "For the next run (0: greedy)",
                                    lambda v=value: self.action_temperature(v))
            for rule in ("coupled", "rejection"):
                yield SystemCommand(f"Acceptance rule: {rule}", "For the next sampled run",
                                    lambda r=rule: self.action_acceptance(r))
            yield SystemCommand("Lookahead -1", "For the next run", lambda: self.action_lookahead(-1))
        else:
            yield SystemCommand("Seek", "Jump to a time or a token position", self.action_seek)
            yield SystemCommand("Step", "Play up to the next token", self.action_step)
