"""`stats` and `export-trace` import neither torch nor textual, `replay` no torch: each runs in a
subprocess where importing the forbidden package fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLE = ASSETS / "sample-amusd-code.jsonl"

BLOCK = """
import sys
class Block:
    def __init__(self, names): self.names = names
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in self.names:
            raise ImportError(name + ' is blocked in this test')
sys.meta_path.insert(0, Block(NAMES))
"""


def run_blocked(names, code, timeout=120):
    script = BLOCK.replace("NAMES", repr(set(names))) + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout)


def test_stats_and_export_without_torch_or_textual(tmp_path):
    out = tmp_path / "t.json"
    code = f"""
from amusd_viz.cli import main
assert main(['stats', {str(SAMPLE)!r}]) == 0
assert main(['export-trace', {str(SAMPLE)!r}, '-o', {str(out)!r}]) == 0
assert 'torch' not in sys.modules and 'textual' not in sys.modules
print('OK')
"""
    result = run_blocked({"torch", "textual", "transformers"}, code)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and out.is_file()


def test_replay_without_torch():
    code = f"""
import asyncio
from amusd_viz.eventlog import read_log
from amusd_viz.ui.app import AmusdApp
from amusd_viz.ui.sources import ReplaySource

async def main():
    app = AmusdApp(ReplaySource(read_log({str(SAMPLE)!r}).events, 1e9))
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause(0.3)
        assert len(app.state.tokens) == 64, len(app.state.tokens)
        await pilot.press('q')

asyncio.run(main())
assert 'torch' not in sys.modules
print('OK')
"""
    result = run_blocked({"torch", "transformers"}, code)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_models_command_without_torch():
    result = run_blocked({"torch", "textual"}, "from amusd_viz.cli import main\n"
                         "assert main(['models', '--json']) == 0\nprint('OK')")
    assert result.returncode == 0, result.stderr
