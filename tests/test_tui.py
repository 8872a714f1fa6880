"""The TUI, driven by Textual's Pilot: replays of a recorded real run (deterministic), and live
runs of tiny models (a crash is shown, quitting leaves no worker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amusd_viz.eventlog import read_log
from amusd_viz.ui.app import AmusdApp, HelpScreen
from amusd_viz.ui.sources import ReplaySource
from amusd_viz.ui.widgets import Inspector, RunHeader, TokenStream

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PROSE = ASSETS / "sample-amusd-prose.jsonl"
SIZE = (160, 48)


def replay_app(speed=1e9, path=PROSE):
    return AmusdApp(ReplaySource(read_log(path).events, speed, path.name))


def plain(widget) -> str:
    """A widget's current text, whatever renderable it shows."""
    import io

    from rich.console import Console

    content = widget.content  # what the widget was last given to show
    if hasattr(content, "plain"):
        return content.plain
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(content)
    return console.export_text()


async def test_replay_shows_the_whole_run():
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        state = app.state
        assert state.status == "done" and len(state.tokens) == 64
        text = plain(app.query_one(TokenStream))
        assert "coastal" in text or "morning" in text
        header = plain(app.query_one(RunHeader))
        assert "qwen-coder-0.5b" in header and "cpu:1" in header and "cpu:0" in header
        await pilot.press("q")
    assert app.return_code == 0


async def test_stats_show_the_no_waste_model_and_why_amusd_is_capped_here():
    """The recorded amusd run was on cpu:0 and cpu:1: the panel names what sharing one CPU
    costs, and how close the run came to its no-waste model (amusd_viz/bound.py)."""
    from amusd_viz.ui.widgets import StatsPanel

    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        text = plain(app.query_one(StatsPanel))
        assert "no-waste model" in text and "reached" in text
        assert "capped by two cores of one CPU" in " ".join(text.split())
        await pilot.press("q")


async def test_inspector_follows_the_cursor():
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        await pilot.press("left")  # cursor onto the last token
        assert app.cursor == 63
        await pilot.press("home")
        assert app.cursor == 0
        await pilot.press("right", "right")
        assert app.cursor == 2
        text = plain(app.query_one(Inspector))
        assert "position 2" in text and "target top-5" in text and "%" in text
        # a correction shows the rejected draft token
        corrections = [t.pos for t in app.state.tokens if t.how == "correction"]
        assert corrections
        app.cursor = corrections[0]
        app._redraw(force=True)
        assert "rejected" in plain(app.query_one(Inspector))


async def test_the_stats_take_the_rows_an_empty_inspector_leaves():
    """At 100x30, before a token is inspected, the inspector is its one-line hint and the stats
    show their rows; inspecting one gives the inspector its whole verdict back."""
    from amusd_viz.ui.widgets import StatsPanel

    app = replay_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await _settle(pilot)
        inspector, stats = app.query_one(Inspector), app.query_one(StatsPanel)
        assert app.cursor is None and inspector.region.height <= 5, inspector.region
        shown = len(plain(stats).splitlines())
        assert shown >= 6 and stats.region.height >= 8, (shown, stats.region)
        await pilot.press("left")
        await pilot.pause(0.1)
        lines = plain(inspector).splitlines()
        assert inspector.region.height >= 11 and len(lines) <= inspector.region.height - 2


async def test_replay_pause_step_and_seek():
    app = replay_app(speed=1.0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("space")
        assert app.source.paused
        before = len(app.state.tokens)
        await pilot.press("j")
        await pilot.pause(0.3)
        assert len(app.state.tokens) == before + 1
        app.show_from(app.source.seek("#40"))
        await pilot.pause(0.3)
        assert len(app.state.tokens) == 41
        app.show_from(app.source.seek("0.5"))
        await pilot.pause(0.3)
        assert len(app.state.tokens) < 41
        with pytest.raises(ValueError):
            app.source.seek("#999")
        await pilot.press("greater_than_sign")
        assert app.source.speed == 2.0


async def test_help_screen_and_timeline_zoom():
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.2)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        timeline = app.query_one("#timeline")
        before = timeline.seconds_per_cell
        await pilot.press("minus")
        assert timeline.seconds_per_cell == before * 2
        await pilot.press("left_curly_bracket")
        assert timeline.follow is False
        await pilot.press("f")
        assert timeline.follow is True


async def test_a_torn_logs_warning_is_on_the_screen(tmp_path):
    """A log cut short (a crash mid-write) replays what is whole, and says so on the screen,
    not only on stderr behind the TUI."""
    raw = PROSE.read_text()
    torn = tmp_path / "torn.jsonl"
    torn.write_text(raw[:len(raw) - 40])
    log = read_log(torn)
    assert log.warnings
    app = AmusdApp(ReplaySource(log.events, 1e9, torn.name), warnings=tuple(log.warnings))
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause(0.3)
        shown = [n.message for n in app._notifications]
        assert any("cut short" in m for m in shown), shown
        assert app.state.tokens  # what is whole replays


async def test_replay_cannot_start_models():
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("1")
        await pilot.pause(0.1)
        assert app.state.strategy == "amusd"  # nothing was re-run


async def test_save_writes_a_valid_log_and_trace(tmp_path):
    app = AmusdApp(ReplaySource(read_log(PROSE).events, 1e9), save_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        await pilot.press("s")
    logs = list(tmp_path.glob("*.jsonl"))
    traces = list(tmp_path.glob("*.trace.json"))
    assert len(logs) == 1 and len(traces) == 1
    assert len(read_log(logs[0]).events) == len(read_log(PROSE).events)


SIZES = [(80, 24), (100, 30), (120, 40), SIZE]


@pytest.mark.parametrize("size", SIZES)
async def test_every_pane_fits_and_keeps_the_essentials(size):
    """At every size from 80x24 up: nothing scrolls off the screen; the header shows the mode,
    the progress and the strategy before any model path; the inspector shows both top-5 lists
    whole; the legend wraps instead of being cut; the footer offers the replay's keys, not a
    live run's. Under 30 rows the charts give way (app.tcss)."""
    from amusd_viz.ui.palette import LABELS, LEGEND_KEYS

    app = replay_app()
    async with app.run_test(size=size) as pilot:
        await pilot.pause(0.3)
        app.cursor = 3
        app._redraw(force=True)
        await pilot.pause(0.1)
        assert app.screen.max_scroll_y == 0 and app.screen.max_scroll_x == 0
        footer_row = size[1] - 1
        panes = ["#timeline", "#text-pane", "#stats", "#inspector"]
        panes += ["#charts"] if size[1] >= 30 else []
        for pane in panes:
            region = app.query_one(pane).region
            assert region.height >= 3 and region.bottom <= footer_row, (pane, region)
            assert region.right <= size[0], (pane, region)
        assert app.query_one("#charts").display == (size[1] >= 30)
        header = plain(app.query_one(RunHeader))[:size[0]]  # what fits on the line
        assert "replay" in header and "64/64 tokens" in header and "amusd" in header
        inspector = app.query_one(Inspector)
        lines = plain(inspector).splitlines()
        assert len(lines) <= inspector.region.height - 2, "the inspector is cut"
        assert sum("%" in line for line in lines) >= 5  # the top-5 rows, each with both p
        legend = app.query_one("#legend")
        assert "pending draft" in plain(legend) and legend.region.height >= 1
        assert legend.virtual_size.width <= legend.region.width + 2  # wrapped, not cut
        lines = plain(legend).split("\n")
        for key in LEGEND_KEYS:  # broken between entries, never inside one
            assert any(LABELS[key] in line for line in lines), LABELS[key]
        assert max(len(line.rstrip()) for line in lines) <= legend.size.width
        keys = {k for k, b in app.active_bindings.items() if b.binding.show}
        assert {"j", "g", "less_than_sign"} <= keys and not keys & {"1", "2", "3", "n"}


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_snapshot_at_every_size(snap_compare, size):
    async def inspect(pilot):
        await _settle(pilot)
        pilot.app.cursor = next(t.pos for t in pilot.app.state.tokens if t.how == "correction")
        pilot.app._redraw(force=True)
        await pilot.pause(0.1)

    assert snap_compare(replay_app(), terminal_size=size, run_before=inspect)


async def _settle(pilot):
    await pilot.pause(0.5)
    pilot.app._redraw(force=True)
    await pilot.pause(0.1)


# live runs on tiny models ---------------------------------------------------------------------

def live_app(tiny_models, faults=None, max_new=30, strategy="amusd", **sampling):
    from amusd_viz.config import RunConfig
    from amusd_viz.engine.devices import resolve_run
    from amusd_viz.engine.run import prepare
    from amusd_viz.ui.sources import LiveSource

    cfg = resolve_run(RunConfig(
        strategy=strategy, lookahead=3, max_new_tokens=max_new, stall_timeout=60.0,
        draft=str(tiny_models["draft_near"]), target=str(tiny_models["target"]), dtype="float32",
        draft_quant_option="none", prompt="def add(a, b):", faults=faults or {}, **sampling))
    source = LiveSource(prepare(cfg), cfg)
    return AmusdApp(source), source


async def _wait_for(pilot, condition, timeout=90.0):
    waited = 0.0
    while not condition() and waited < timeout:
        await pilot.pause(0.25)
        waited += 0.25
    assert condition(), "timed out"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _assert_all_gone(pids) -> None:
    import time

    deadline = time.monotonic() + 4
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [p for p in pids if _alive(p)]
    assert not survivors, f"workers {survivors} survived quitting"


def _worker_pids(app) -> list[int]:
    return [e.pid for e in app.state.events if e.type == "worker_ready"]


async def test_live_run_rerun_and_quit_leave_no_worker(tiny_models):
    app, source = live_app(tiny_models)
    async with app.run_test(size=SIZE) as pilot:
        await _wait_for(pilot, lambda: app.state.status == "done")
        assert len(app.state.tokens) == 30
        pids = [e.pid for e in app.state.events if e.type == "worker_ready"]
        assert len(pids) == 2
        await pilot.press("1")  # race the same prompt with ar
        await _wait_for(pilot, lambda: app.state.strategy == "ar" and app.state.status == "done")
        assert [t.token_id for t in app.state.tokens] == [t.token_id for t in app.history[-1].tokens]
        await pilot.press("2")
        await _wait_for(pilot, lambda: (app.state.strategy == "sync" and app.state.status == "generating")
                        or (app.state.strategy == "sync" and app.state.status == "done"))
        running = _worker_pids(app)
        await pilot.press("q")
    _assert_all_gone(pids + running)


async def test_live_draft_crash_is_shown_and_the_run_completes(tiny_models):
    app, _ = live_app(tiny_models, faults={"draft": "die_after:4"})
    async with app.run_test(size=SIZE) as pilot:
        await _wait_for(pilot, lambda: app.state.status in ("done", "error"))
        assert app.state.status == "done" and len(app.state.tokens) == 30
        assert app.state.lost == ["draft"]
        assert "draft worker lost" in plain(app.query_one(RunHeader))
        pids = _worker_pids(app)
        assert len(pids) == 2
        await pilot.press("q")
    _assert_all_gone(pids)


async def test_live_target_crash_shows_the_error_without_hanging(tiny_models):
    app, source = live_app(tiny_models, faults={"target": "die_after:3"})
    async with app.run_test(size=SIZE) as pilot:
        await _wait_for(pilot, lambda: app.state.status == "error")
        assert "target worker" in plain(app.query_one(RunHeader))
        pids = _worker_pids(app)
        assert len(pids) == 2
        await pilot.press("q")
    assert source.exit_code == 1
    _assert_all_gone(pids)  # the draft too, though only the target died


async def test_a_sampled_live_run_explains_each_verdict(tiny_models):
    """Temperature 0.8, seed 7, rejection rule: the header shows the settings, the inspector
    shows p, q, min(1, p/q) and the draw for a checked draft token, in words."""
    app, _ = live_app(tiny_models, temperature=0.8, seed=7, acceptance="rejection",
                      strategy="sync")
    async with app.run_test(size=SIZE) as pilot:
        await _wait_for(pilot, lambda: app.state.status == "done")
        assert "T 0.8 rejection seed 7" in plain(app.query_one(RunHeader))
        checked = sorted(app.state.checks)
        assert checked
        app.cursor = checked[0]
        app._redraw(force=True)
        text = plain(app.query_one(Inspector))
        assert "p = " in text and "q = " in text and "min(1, p/q)" in text
        assert "accepted: u = " in text or "rejected: u = " in text
        await pilot.press("t")  # next run's temperature: 0.8 -> 1.0
        assert app.source.cfg.temperature == 1.0
        await pilot.press("a")
        assert app.source.cfg.acceptance_rule == "coupled"
        await pilot.press("q")


def test_the_readme_and_the_help_explain_the_colours_the_app_draws():
    """One legend, one source (ui/palette.py): the README's tables and the help screen are made
    from the styles the widgets draw with, and every mark the timeline can draw is explained."""
    from amusd_viz.ui.app import HELP
    from amusd_viz.ui.palette import PHASES, legend_markdown

    readme = (ASSETS.parent / "README.md").read_text()
    assert legend_markdown() in readme
    for mark in PHASES:
        assert f"| `{mark.glyph}` {mark.label} | {mark.colour_name()} |" in readme
    assert "green =" not in HELP and "blue =" not in HELP  # no colour named by hand
