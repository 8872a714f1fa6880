"""What a browser visitor sees when every live-run slot of `amusd-viz serve` is taken."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.containers import Center, Middle
from textual.widgets import Static


class BusyApp(App):
    CSS = "Static { width: 72; padding: 1 2; border: round $warning; }"
    BINDINGS = [("q", "quit", "quit")]

    def __init__(self, max_live: int) -> None:
        super().__init__()
        self.max_live = max_live

    def compose(self) -> ComposeResult:
        with Middle(), Center():
            yield Static(
                f"[b]amusd-viz: all {self.max_live} live session(s) are in use.[/b]\n\n"
                "Each live session loads a draft and a target model, so this server runs at "
                f"most {self.max_live} at once. Close another tab, or try again in a minute; "
                "the server's owner can raise the cap with --max-live.\n\nq closes this page's "
                "session.")
