"""One browser tab's app, as `amusd-viz serve` has textual-serve start it: take a live-run slot
(or show that none is free), then run the app exactly as the terminal command would."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import signal
import sys
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1


def _end_with_the_server() -> None:
    """SIGTERM when the server dies: the app then stops its workers as on Ctrl+C."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def take_slot(slots: Path, max_live: int) -> IO | None:
    """A free live-run slot: a lock file held (open) for this process's life; the kernel
    releases it when the process ends, however it ends. None when all are taken."""
    for i in range(max_live):
        handle = open(slots / f"live-{i}.lock", "w")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            handle.close()
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="amusd_viz.served")
    parser.add_argument("--slots", type=Path, required=True)
    parser.add_argument("--max-live", type=int, default=1, help="0: not a live run (a replay)")
    opts = parser.parse_args(argv[:split])
    app_args = argv[split + 1:]
    _end_with_the_server()
    slot = take_slot(opts.slots, opts.max_live) if opts.max_live > 0 else None
    if opts.max_live > 0 and slot is None:
        from amusd_viz.ui.busy import BusyApp

        BusyApp(opts.max_live).run()
        return 0
    from amusd_viz.cli import main as cli_main

    return cli_main(app_args)


if __name__ == "__main__":
    sys.exit(main())
