"""Start the TUI for a live run or a replay; make sure every worker is gone when it closes."""

from __future__ import annotations

from pathlib import Path


def run_live(args, prompt: str, target_device: str, draft_device: str | None) -> int:
    from amusd_viz.cli import resolve_devices
    from amusd_viz.engine.run import prepare
    from amusd_viz.ui.app import AmusdApp
    from amusd_viz.ui.sources import LiveSource

    # Resolve, check and (first time only) convert the models before the screen switches, so a
    # user mistake is one line on the terminal and the one-time conversion shows its progress.
    prepared = prepare(args.strategy, args.draft, args.target, target_device, draft_device,
                       args.dtype)
    source = LiveSource(prepared, args, prompt, lambda strategy: resolve_devices(args, strategy))
    app = AmusdApp(source, save_dir=Path.cwd())
    try:
        app.run()
    finally:
        source.stop()
    return app.return_code or source.exit_code


def run_replay(log, speed: float, name: str) -> int:
    from amusd_viz.ui.app import AmusdApp
    from amusd_viz.ui.sources import ReplaySource

    app = AmusdApp(ReplaySource(log.events, speed, name))
    app.run()
    return app.return_code or 0
