"""CPU cost of a served replay against the same replay in a terminal (tmux): CPU seconds used
by the app process (and, served, by the server too) over the same wall time. Needs tmux and
Chromium (Playwright drives it). Usage: python scripts/serve-cost.py [LOG] [SECONDS]"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_serve import CHROMIUM, FLAGS, VIEWPORT, Served, descendants, first_frame  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def served(log: str, seconds: float) -> dict:
    from playwright.sync_api import sync_playwright

    server = Served("replay", log)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(server.url)
        _, first = first_frame(page)
        app = server.apps()[0]
        before = cpu_s(app), cpu_s(server.proc.pid)
        time.sleep(seconds)
        after = cpu_s(app), cpu_s(server.proc.pid)
        browser.close()
    server.stop()
    return {"first_frame_s": round(first, 2), "app_cpu_s": round(after[0] - before[0], 2),
            "server_cpu_s": round(after[1] - before[1], 2)}


def terminal(log: str, seconds: float) -> dict:
    session = "serve-cost"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "155", "-y", "50",
                    f"{sys.executable} -m amusd_viz replay {log}"], check=True)
    time.sleep(3)  # started and drawing
    shell = int(subprocess.run(["tmux", "list-panes", "-t", session, "-F", "#{pane_pid}"],
                               capture_output=True, text=True).stdout.split()[0])
    app = next(p for p in [shell, *descendants(shell)]
               if b"amusd_viz" in Path(f"/proc/{p}/cmdline").read_bytes())
    before = cpu_s(app)
    time.sleep(seconds)
    used = cpu_s(app) - before
    subprocess.run(["tmux", "kill-session", "-t", session])
    return {"app_cpu_s": round(used, 2)}


if __name__ == "__main__":
    log = sys.argv[1] if len(sys.argv) > 1 else "assets/sample-amusd-code.jsonl"
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 8.0
    print("terminal:", terminal(log, seconds))
    print("served:  ", served(log, seconds))
