"""`amusd-viz serve` in a real browser: headless Chromium (Debian's `chromium`, which .ci/run
installs) driven by Playwright with that executable. The terminal is drawn on a canvas, so the
checks look at screenshots (pixels) and at the processes the server starts, not at DOM text."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amusd_viz.serve import alive as _alive
from amusd_viz.serve import cmdline, descendants, session_pids

ASSETS = Path(__file__).resolve().parent.parent / "assets"
REPLAY = ASSETS / "sample-amusd-code.jsonl"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as the environment's notes say: without the background-networking flags Chromium keeps trying
# hosts this closed network refuses
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        message = "no chromium on PATH (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"CI: {message}")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A running `amusd-viz serve` and what it has started."""

    def __init__(self, *app_args: str, max_live: int = 1) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "amusd_viz", "serve", "--port", str(self.port),
             "--max-live", str(max_live), "--", *app_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while not _port_open(self.port):
            assert self.proc.poll() is None, self.proc.stdout.read()
            assert time.monotonic() < deadline, "the server never listened"
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{self.port}/"

    def apps(self) -> list[int]:
        """The app processes (one per open tab)."""
        return [p for p in session_pids(self.proc.pid) if _alive(p)]

    def workers(self) -> list[int]:
        return [p for p in descendants(self.proc.pid) if _alive(p) and b"spawn_main" in cmdline(p)]

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # Ctrl+C
        out, _ = self.proc.communicate(timeout=60)
        return out


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def colours(png: bytes) -> int:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").resize((350, 225))
    return len(set(image.get_flattened_data()))


HELP_FRAME = (1, 120, 212)  # the help dialog's border: Textual's $primary, drawn thick


def help_frame(png: bytes) -> int:
    from PIL import Image

    return sum(1 for px in Image.open(io.BytesIO(png)).convert("RGB").get_flattened_data()
               if px == HELP_FRAME)


def changed_share(a: bytes, b: bytes) -> float:
    from PIL import Image, ImageChops

    one = Image.open(io.BytesIO(a)).convert("RGB")
    two = Image.open(io.BytesIO(b)).convert("RGB")
    diff = ImageChops.difference(one, two).convert("L").point(lambda v: 255 if v > 24 else 0)
    return sum(1 for v in diff.get_flattened_data() if v) / (one.width * one.height)


APP_BACKGROUND = (18, 18, 18)  # the app's screen; textual-serve's own page is blue-grey


def app_share(png: bytes) -> float:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").resize((350, 225))
    return sum(1 for px in image.get_flattened_data() if px == APP_BACKGROUND) / (350 * 225)


def first_frame(page, timeout: float = 120.0) -> tuple[bytes, float]:
    """Wait until the canvas shows the app (its background over most of the page, in many
    colours: not textual-serve's loading page, not a blank canvas); returns the screenshot and
    the seconds from navigation to it. A live run draws once it has found its models and
    tokenizer (imports included: seconds on a busy 2-core machine)."""
    start = time.monotonic()
    while True:
        shot = page.screenshot()
        if app_share(shot) > 0.4 and colours(shot) >= 12:
            return shot, time.monotonic() - start
        assert time.monotonic() - start < timeout, "the app never drew"
        page.wait_for_timeout(100)


def test_a_served_replay_draws_takes_keys_and_ends_with_its_tab(browser, tmp_path):
    served = Served("replay", str(REPLAY))
    try:
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(served.url)
        _, seconds = first_frame(page)
        print(f"\nfirst frame {seconds:.2f} s after navigation")
        assert wait_until(lambda: len(served.apps()) == 1, 10)
        out = os.environ.get("AMUSD_VIZ_SCREENSHOTS")
        if out:  # the README's picture comes from here
            Path(out).mkdir(parents=True, exist_ok=True)
            page.wait_for_timeout(4000)  # a few seconds into the replay
            (Path(out) / "browser-view.png").write_bytes(page.screenshot())
        page.mouse.click(VIEWPORT["width"] // 2, VIEWPORT["height"] // 2)  # focus the terminal
        page.wait_for_timeout(300)
        page.keyboard.press("Space")  # pause the replay: the next two frames differ by the key
        page.wait_for_timeout(800)
        before = page.screenshot()
        assert help_frame(before) < 500
        page.keyboard.press("?")
        # the help dialog's thick blue frame appears (the canvas redraws at its own pace)
        assert wait_until(lambda: help_frame(page.screenshot()) > 10000, 10), \
            f"{help_frame(page.screenshot())} pixels of the help dialog's frame"
        page.keyboard.press("Escape")
        assert wait_until(lambda: help_frame(page.screenshot()) < 500, 10)  # closed again
        assert changed_share(before, page.screenshot()) < 0.05  # the paused replay is back
        apps = served.apps()
        page.close()
        assert wait_until(lambda: not any(_alive(p) for p in apps), 5), "the tab's app survived"
    finally:
        log = served.stop()
    assert served.proc.returncode == 0, log


def frame_box(png: bytes) -> tuple[int, int, int, int] | None:
    """The help dialog's frame: (left, top, right, bottom) of its pixels, or None."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    mask = image.point(lambda v: 0).convert("L")
    mask.putdata([255 if px == HELP_FRAME else 0 for px in image.get_flattened_data()])
    return mask.getbbox()


def test_a_small_browser_window_shows_the_app_and_the_whole_help(browser):
    """At 1280x720 the app fills the page and the help dialog fits inside it, all four sides of
    its frame on the screen (it was 92 columns wide and cut before), so it scrolls, not clips."""
    served = Served("replay", str(REPLAY))
    try:
        small = {"width": 1280, "height": 720}
        page = browser.new_page(viewport=small)
        page.goto(served.url)
        first_frame(page)  # the app's background over most of the page
        page.mouse.click(small["width"] // 2, small["height"] // 2)
        page.wait_for_timeout(300)
        page.keyboard.press("?")
        assert wait_until(lambda: help_frame(page.screenshot()) > 5000, 10)
        left, top, right, bottom = frame_box(page.screenshot())
        assert left > 0 and top > 0 and right < small["width"] and bottom < small["height"]
        edges = page.screenshot()
        from PIL import Image

        image = Image.open(io.BytesIO(edges)).convert("RGB")
        for y in (top, bottom - 1):  # a whole border line at the top and at the bottom
            row = [image.getpixel((x, y)) for x in range(left, right)]
            assert sum(px == HELP_FRAME for px in row) > 0.9 * (right - left), y
        page.close()
    finally:
        log = served.stop()
    assert served.proc.returncode == 0, log


def test_a_live_session_starts_workers_that_end_with_the_tab_and_the_cap_holds(browser,
                                                                             tiny_models):
    served = Served("--draft", str(tiny_models["draft_near"]), "--target",
                    str(tiny_models["target"]), "--dtype", "float32", "--draft-quant", "none",
                    "--max-new-tokens", "8000", "--prompt", "hello", max_live=1)
    try:
        first = browser.new_page(viewport=VIEWPORT)
        first.goto(served.url)
        first_frame(first)
        assert wait_until(lambda: len(served.workers()) == 2, 60), "no workers started"
        workers = served.workers()
        # a second visitor is over the cap: an app that says so, and no more workers
        second = browser.new_page(viewport=VIEWPORT)
        second.goto(served.url)
        first_frame(second)
        assert wait_until(lambda: len(served.apps()) == 2, 10)
        for _ in range(10):  # the busy page started no workers of its own
            assert set(served.workers()) <= set(workers)
            time.sleep(0.2)
        apps = served.apps()
        first.close()
        assert wait_until(lambda: not any(_alive(p) for p in workers), 10), "workers survived"
        second.close()
        assert wait_until(lambda: not any(_alive(p) for p in apps), 20), \
            [cmdline(p)[-80:] for p in apps if _alive(p)]
    finally:
        log = served.stop()
    assert served.proc.returncode == 0, log


def test_ctrl_c_ends_the_server_and_every_session(browser, tiny_models):
    served = Served("--draft", str(tiny_models["draft_near"]), "--target",
                    str(tiny_models["target"]), "--dtype", "float32", "--draft-quant", "none",
                    "--max-new-tokens", "8000", "--prompt", "hello")
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(served.url)
    first_frame(page)
    assert wait_until(lambda: len(served.workers()) == 2, 60)
    everything = served.apps() + served.workers()
    served.stop()
    assert wait_until(lambda: not any(_alive(p) for p in everything), 10), "orphans left"
    page.close()


@pytest.mark.parametrize(("args", "needle"), [
    (["--", "bench"], "cannot be served"),
    (["--host", "no such host!"], "neither an IP address"),
    (["--", "replay", "missing.jsonl"], "no such file"),
    (["--", "--strategy", "turbo"], "invalid choice"),
    (["--", "--headless"], "no screen to serve"),
    (["--port", "0"], "from 1 to 65535"),
    (["replay", "x.jsonl"], "go after `--`"),
])
def test_bad_serve_arguments_are_one_line_and_start_nothing(args, needle):
    out = subprocess.run([sys.executable, "-m", "amusd_viz", "serve", "--port", "8765", *args]
                         if "--port" not in args else
                         [sys.executable, "-m", "amusd_viz", "serve", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_a_busy_port_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "amusd_viz", "serve", "--port", str(port),
                              "--", "replay", str(REPLAY)], capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 2 and "is not free" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
