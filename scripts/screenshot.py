"""Render the TUI on a recorded real run to an SVG (the README's screenshot).

    python scripts/screenshot.py assets/sample-amusd-prose.jsonl assets/screenshot.svg [CURSOR]

CURSOR: the token the inspector shows (default 10, the prose sample's first correction).
"""

import asyncio
import sys
from pathlib import Path

from amusd_viz.eventlog import read_log
from amusd_viz.ui.app import AmusdApp
from amusd_viz.ui.sources import ReplaySource


async def main(log: Path, out: Path, cursor: int) -> None:
    # x100: the header shows a speed a user could pick, and the run is over in a fraction of a second
    app = AmusdApp(ReplaySource(read_log(log).events, 100, log.name))
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause(1.0)
        app.cursor = cursor
        app._redraw(force=True)
        await pilot.pause(0.2)
        app.save_screenshot(filename=out.name, path=str(out.parent))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]),
                     int(sys.argv[3]) if len(sys.argv) > 3 else 10))
