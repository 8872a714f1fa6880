"""Start the TUI for a live run or a replay; make sure every worker is gone when it closes."""

from __future__ import annotations

from pathlib import Path

from amusd_viz.config import RunConfig


def run_live(cfg: RunConfig) -> int:
    from amusd_viz.engine.run import prepare
    from amusd_viz.ui.app import AmusdApp
    from amusd_viz.ui.sources import LiveSource, lower_ui_priority

    # Resolve, check and (first time only) convert the models before the screen switches, so a
    # user mistake is one line on the terminal and the one-time conversion shows its progress.
    prepared = prepare(cfg)
    source = LiveSource(prepared, cfg)  # its launcher thread keeps the normal priority
    lower_ui_priority()
    app = AmusdApp(source, save_dir=Path.cwd())
    try:
        app.run()
    finally:
        source.stop()
    return app.return_code or source.exit_code


def run_replay(log, speed: float, name: str) -> int:
    from amusd_viz.ui.app import AmusdApp
    from amusd_viz.ui.sources import ReplaySource

    app = AmusdApp(ReplaySource(log.events, speed, name), warnings=tuple(log.warnings))
    app.run()
    return app.return_code or 0
