"""`amusd-viz serve`: the same app in a browser, through textual-serve.

Each browser tab gets an app process of its own (textual-serve starts the command below per
connection, with Textual's web driver); closing the tab sends the app "quit", and the app stops
its workers as it does in a terminal. Live runs load models (several GB each), so at most
`--max-live` of them run at once: each takes a slot, a lock file held while its process lives
(released by the kernel when it dies, however it dies); a visitor over the cap gets a page that
says so (`amusd_viz.served`). Replays take no slot.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from amusd_viz.errors import UserError

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class ServeConfig:
    host: str
    port: int
    max_live: int
    app_args: tuple[str, ...]  # what a terminal run takes: run options, or `replay FILE`

    @property
    def live(self) -> bool:
        return not self.app_args or self.app_args[0] != "replay"


@dataclass(frozen=True)
class AppParsers:
    """What the served app accepts, handed in by the CLI (which imports this module)."""

    commands: tuple[str, ...]
    run: Callable[[], argparse.ArgumentParser]
    replay: Callable[[], argparse.ArgumentParser]


def split_app_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """serve's own options, and the app's (everything after the first `--`)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def check_app_args(app_args: list[str], parsers: AppParsers) -> None:
    """The served command must be a run or a replay, and parse: checked now, so the server
    never starts half-way and a visitor never meets a usage error."""
    if app_args and app_args[0] in parsers.commands and app_args[0] != "replay":
        raise UserError(f"`{app_args[0]}` cannot be served: after `--` give a live run's options "
                        "(or nothing, for the default pair) or `replay FILE`.")
    if app_args and app_args[0] == "replay":
        args = _parse(parsers.replay(), app_args[1:], "amusd-viz serve -- replay")
        if not args.file.is_file():
            raise UserError(f"replay {args.file}: no such file. Pass a log written with --events.")
        return
    args = _parse(parsers.run(), app_args, "amusd-viz serve --")
    if args.headless:
        raise UserError("--headless has no screen to serve; leave it out after `--`.")


def _parse(parser, args: list[str], prog: str):
    """Parse, a bad argument being the parser's one line (named as typed: `serve -- ...`)."""
    parser.prog = prog
    return parser.parse_args(args)


def check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        raise UserError(f"--host {host!r} is neither an IP address nor a name this machine can "
                        "resolve. Use 127.0.0.1 (this machine only) or an address of this "
                        "machine.") from None


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"port {port} on {host} is not free ({exc.strerror}). Pick another "
                            "with --port, or stop what is using it.") from None


def served_command(cfg: ServeConfig, slots: Path) -> str:
    """The command textual-serve runs for each tab."""
    parts = [sys.executable, "-m", "amusd_viz.served", "--slots", str(slots),
             "--max-live", str(cfg.max_live if cfg.live else 0), "--", *cfg.app_args]
    return shlex.join(parts)


def serve_command(cfg: ServeConfig, parsers: AppParsers) -> int:
    check_host(cfg.host)
    check_app_args(list(cfg.app_args), parsers)
    check_port_free(cfg.host, cfg.port)
    try:
        from textual_serve.server import Server
    except ImportError:
        raise UserError("serve needs textual-serve, one of amusd-viz's dependencies: "
                        "pip install textual-serve.") from None
    if cfg.host not in LOCAL_HOSTS:
        print(f"amusd-viz serve: warning: listening on {cfg.host}: anyone who can reach this "
              "address can run prompts on this machine.", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="amusd-viz-serve-") as slots:
        command = served_command(cfg, Path(slots))
        what = "a live run" if cfg.live else " ".join(cfg.app_args)
        print(f"amusd-viz serve: {what} on http://{_url_host(cfg.host)}:{cfg.port} "
              f"(live sessions at once: {cfg.max_live}); Ctrl+C stops the server and every "
              "session.", file=sys.stderr)
        os.environ["AMUSD_VIZ_SERVED"] = "1"
        _sessions_ending(Server)(command, host=cfg.host, port=cfg.port,
                                 title="amusd-viz").serve()
    return 0


SESSION_GRACE_S = 5.0  # on Ctrl+C, each tab's app gets this long to stop its workers


def _sessions_ending(server: type) -> type:
    class SessionsEndingServer(server):
        """Ctrl+C / SIGTERM end every session before the server: a tab's app is sent SIGTERM
        (it stops its workers as on Ctrl+C), and killed if it is still there after a grace
        period (its workers then die with it). textual-serve alone would wait for each app
        to quit on its own, for ever if it does not."""

        def request_exit(self) -> None:
            end_sessions(os.getpid())
            super().request_exit()

    return SessionsEndingServer


def session_pids(server_pid: int) -> list[int]:
    """The app processes (one per tab) under this server."""
    return [pid for pid in descendants(server_pid)
            if cmdline(pid).split(b"\0")[1:3] == [b"-m", b"amusd_viz.served"]]


def end_sessions(server_pid: int) -> None:
    pids = session_pids(server_pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + SESSION_GRACE_S
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def cmdline(pid: int) -> bytes:
    """A process's argv as /proc has it (NUL-separated); empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """Running (a zombie is gone for every purpose here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(root: int) -> list[int]:
    """Every process under `root` (children, grandchildren, ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [c for c, p in parents.items() if p == parent]
        found += children
        frontier += children
    return found


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
