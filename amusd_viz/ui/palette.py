"""Every colour and glyph of the screen, defined once: the token styles, the timeline's marks and
the charts' colours, and from them the legend line, the help's explanations and the README's table
(tests/test_tui.py checks the README against `legend_markdown`).

Colours are Okabe and Ito's colour-blind-safe set; each token kind also has a second cue (weight,
underline, overline, strike, italics), so no two kinds differ by colour alone. No textual import.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text

OKABE_ITO = {
    "orange": "#E69F00", "sky blue": "#56B4E9", "bluish green": "#009E73", "yellow": "#F0E442",
    "blue": "#0072B2", "vermillion": "#D55E00", "reddish purple": "#CC79A7", "grey": "#999999",
}
GOOD = OKABE_ITO["bluish green"]  # acceptance: the colour of an accepted draft everywhere


@dataclass(frozen=True)
class Mark:
    key: str
    style: str  # rich style
    label: str  # the legend's words
    means: str  # the help's explanation
    glyph: str = ""  # timeline marks only

    def colour_name(self) -> str:
        return next((name for name, hex_ in OKABE_ITO.items() if hex_ in self.style), "default")


def _c(name: str) -> str:
    return OKABE_ITO[name]


# How each token became final.
TOKENS = (
    Mark("accepted", _c("bluish green"), "accepted draft", "a draft token the target accepted"),
    Mark("cached", f"{_c('sky blue')} overline", "from the cache",
         "an accepted draft the speculation cache had ready after a rejection (amusd)"),
    Mark("correction", f"bold {_c('vermillion')} underline", "correction",
         "the target's own token where it rejected the draft's"),
    Mark("resampled", f"bold {_c('vermillion')} underline", "resampled",
         "under the rejection rule: drawn from the residual max(0, p − q) after a rejection"),
    Mark("rejected", f"{_c('reddish purple')} strike", "rejected draft",
         "the draft token the target turned down, shown just before its correction"),
    Mark("bonus", f"bold {_c('orange')}", "bonus",
         "the target's extra token after it accepted every draft of a pass"),
    Mark("decoded", "italic", "target's own", "decoded by the target alone, no draft checked"),
    Mark("pending", f"dim italic {_c('grey')}", "pending draft", "drafted, not verified yet"),
)
STYLES = {m.key: m.style for m in TOKENS}
LABELS = {m.key: m.label for m in TOKENS}
LEGEND_KEYS = ("accepted", "cached", "correction", "rejected", "bonus", "decoded", "pending")

# What the timeline draws: one mark per kind of forward pass, and the rollback row's.
PHASES = (
    Mark("load", _c("grey"), "loading", "the worker loading its model", "·"),
    Mark("prefill", _c("yellow"), "prefill",
         "the prompt fed in (number = tokens fed; the chat template's fixed head is cached "
         "when the models load)", "▓"),
    Mark("draft", _c("blue"), "draft step", "one draft pass", "█"),
    Mark("verify", _c("bluish green"), "verify pass",
         "the target checking drafts (number = tokens in the pass)", "█"),
    Mark("decode", _c("sky blue"), "decode", "the target alone, one token", "█"),
    Mark("branch", _c("orange"), "branch step",
         "a draft step on a bet for the speculation cache (amusd)", "▒"),
    Mark("lookup", _c("reddish purple"), "lookup",
         "the n-gram drafter's instant step (--draft ngram)", "│"),
    Mark("lent", _c("bluish green"), "lent core",
         "the resting draft's core running the target's pass (amusd on two CPU cores)", "░"),
    Mark("rollback", _c("vermillion"), "rollback", "the draft dropping rejected drafts", "✕"),
)
PHASE_STYLE = {m.key: (m.glyph, m.style) for m in PHASES}
STRATEGY_COLOURS = {"amusd": _c("bluish green"), "sync": _c("blue"), "ar": _c("vermillion")}


def rgb(hex_colour: str) -> tuple[int, int, int]:
    """A palette colour as plotext takes it."""
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def legend(width: int = 0) -> Text:
    """The line above the generated text; wider than `width` (when given), it breaks between
    entries, never inside one ("pending" and "draft" on two lines read as two entries)."""
    text = Text("legend: ")
    start = line = len(text)
    for key in LEGEND_KEYS:
        if width and line > start and line + len(LABELS[key]) > width:
            text.append("\n")
            line = 0
        text.append(LABELS[key], STYLES[key])
        text.append("  ")
        line += len(LABELS[key]) + 2
    return text


def _cue(m: Mark) -> str:
    extra = [w for w in m.style.split() if not w.startswith("#")]
    return " ".join([m.colour_name(), *extra]) if m.colour_name() != "default" else " ".join(extra)


def help_markdown() -> str:
    """The help screen's colour sections."""
    phases = "\n".join(f"| `{m.glyph}` {m.label} | {m.colour_name()} | {m.means} |"
                       for m in PHASES)
    return ("**Token colours**\n\n" + legend_markdown() +
            "\n**Timeline** (one lane per device; seconds since the prompt went in, loading "
            "before 0)\n\n| mark | colour | means |\n|---|---|---|\n" + phases + "\n")


def legend_markdown() -> str:
    """The README's table of token colours (checked against this by a test)."""
    rows = "\n".join(f"| {m.label} | {_cue(m)} | {m.means} |" for m in TOKENS)
    return "| token | looks | means |\n|---|---|---|\n" + rows + "\n"
