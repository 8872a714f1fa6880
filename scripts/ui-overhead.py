"""How much watching costs: the same run headless and in the TUI (in a real terminal, tmux),
alternated, and the ratio of their wall times (prompt in to last token out, from the summary).

    python scripts/ui-overhead.py [--rounds 5] [--strategy sync] [--max-new-tokens 48]

`sync` by default: its decisions do not depend on timing, so the ratio shows the UI's cost and
not amusd's run-to-run spread. Needs tmux.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a Python function that merges two sorted lists into one sorted list."
SIZE = ("160", "48")


def run_args(strategy: str, max_new: int, summary: Path) -> list[str]:
    return [sys.executable, "-m", "amusd_viz", "--strategy", strategy, "--prompt", PROMPT,
            "--max-new-tokens", str(max_new), "--summary-json", str(summary)]


def headless(strategy: str, max_new: int, folder: Path) -> float:
    summary = folder / "headless.json"
    subprocess.run([*run_args(strategy, max_new, summary), "--headless"], check=True,
                   capture_output=True, timeout=900)
    return json.loads(summary.read_text())["wall_s"]


def cpu_seconds(stat_path: str) -> float:
    """utime + stime of a process or thread, from /proc (clock ticks of 1/100 s)."""
    try:
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_tmux(strategy: str, max_new: int, folder: Path) -> tuple[float, float, float]:
    """(wall_s of the run, CPU seconds of the app's drawing thread, of the tmux server)."""
    summary = folder / "tui.json"
    summary.unlink(missing_ok=True)
    sock = str(folder / "tmux.sock")
    command = " ".join(f"'{a}'" for a in run_args(strategy, max_new, summary))
    subprocess.run(["tmux", "-S", sock, "new-session", "-d", "-s", "ui", "-x", SIZE[0],
                    "-y", SIZE[1], command], check=True)
    try:
        deadline = time.monotonic() + 900
        while not (summary.exists() and summary.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(0.5)
        pane = subprocess.run(["tmux", "-S", sock, "display", "-p", "-t", "ui", "#{pane_pid} #{pid}"],
                              capture_output=True, text=True).stdout.split()
        app_cpu = cpu_seconds(f"/proc/{pane[0]}/task/{pane[0]}/stat") if pane else 0.0
        tmux_cpu = cpu_seconds(f"/proc/{pane[1]}/stat") if len(pane) > 1 else 0.0
        subprocess.run(["tmux", "-S", sock, "send-keys", "-t", "ui", "q"], check=False)
        time.sleep(2)
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], check=False, capture_output=True)
    return json.loads(summary.read_text())["wall_s"], app_cpu, tmux_cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--strategy", default="sync")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(args.rounds):
            a = headless(args.strategy, args.max_new_tokens, folder)
            b, app_cpu, tmux_cpu = in_tmux(args.strategy, args.max_new_tokens, folder)
            ratios.append(b / a)
            print(f"round {i + 1}: headless {a:.2f} s, TUI {b:.2f} s, ratio {b / a:.3f}; "
                  f"CPU over the whole session (loading included): drawing thread "
                  f"{app_cpu:.2f} s, tmux {tmux_cpu:.2f} s", flush=True)
    print(f"median TUI/headless ratio over {args.rounds} rounds: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
