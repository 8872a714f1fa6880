"""The TUI's widgets. Each reads a RunState and redraws only when its `version` moved."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Static
from textual_plotext import PlotextPlot

from amusd_viz.bound import dear_tokens, shared_compute
from amusd_viz.ui.palette import GOOD, PHASE_STYLE, STYLES, legend
from amusd_viz.ui.state import RunState

LANE_LABEL_WIDTH = 16  # "target cpu:0    " before each lane's bar
TICK_EVERY_CELLS = 16  # one time label on the axis every this many cells
MIN_TIMELINE_CELLS = 10
MIN_SECONDS_PER_CELL, MAX_SECONDS_PER_CELL = 0.002, 5.0  # zoom limits
FOLLOW_AT = 0.95  # while following, "now" sits this far across the window
INSPECTOR_TOP_K = 5  # candidates shown per model (the events carry the top-5)
BAR_CELLS = 6  # width of a probability bar in the inspector
LOOKUP = PHASE_STYLE["lookup"][1]
STATUS_STYLE = {"loading": "yellow", "generating": "bold green", "done": "bold blue",
                "error": "bold red", "paused": "bold yellow", "replay": "bold green"}


def visible_text(s: str) -> str:
    return s.replace("\n", "↵\n").replace("\t", "→   ")


class RunHeader(Static):
    """Models, devices, dtype, strategy, lookahead and the run's state."""

    def show(self, state: RunState, extra: str = "") -> None:
        """What matters most comes first, the models last: a narrow terminal cuts the end."""
        status = extra or state.status
        t = Text()
        t.append(" amusd-viz ", "bold reverse")
        t.append(f" ● {status}", STATUS_STYLE.get(status.split()[0], "bold"))
        if state.tokens or state.status == "generating":
            t.append(f"  {len(state.tokens)}/{state.max_new_tokens} tokens")
            if not extra:  # a replay's status carries its own clock
                t.append(f" · {state.elapsed():.1f} s")
        t.append(f"  {state.strategy or '-'}", "bold")
        if state.strategy != "ar":
            t.append(f" k={state.lookahead}")
        if state.temperature:
            t.append(f"  {state.sampling_label}", "bold yellow")
        for role in state.lost:
            t.append(f"  ⚠ {role} worker lost (the target went on alone)", "bold red")
        if state.message:
            t.append(f"  {state.message}", "italic")
        if state.draft:
            t.append(f"  draft {state.draft} @ {state.draft_device}", "grey70")
        t.append(f"  target {state.target or '-'} @ {state.target_device or '-'}", "grey70")
        t.append(f"  {state.dtype}", "grey70")
        self.update(t)


class Timeline(Widget):
    """One lane per device: forward passes as spans over time, rollbacks as ✕ marks.

    Only spans inside the visible window are drawn (bisect per lane), so the cost of a redraw
    follows the width of the window, never the length of the run.
    """

    DEFAULT_CSS = "Timeline { height: 7; }"
    seconds_per_cell: reactive[float] = reactive(0.05)
    follow: reactive[bool] = reactive(True)
    offset_s: reactive[float] = reactive(0.0)  # window start when not following

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.state = RunState()
        self._shown: tuple[int, int] = (-1, -1)

    def show(self, state: RunState) -> None:
        """Redraw only when the run moved on (zoom and scroll refresh through their reactives):
        an unchanged frame costs nothing."""
        key = (id(state), state.version)
        if key != self._shown:
            self._shown = key
            self.state = state
            self.refresh()

    def window(self) -> tuple[float, float]:
        width = max(MIN_TIMELINE_CELLS, self.size.width - LANE_LABEL_WIDTH)
        span = width * self.seconds_per_cell
        if self.follow:
            start = max(0.0, self.state.now - span * FOLLOW_AT)
        else:
            start = self.offset_s
        return start, start + span

    def zoom(self, factor: float) -> None:
        start, end = self.window()
        self.seconds_per_cell = min(MAX_SECONDS_PER_CELL,
                                    max(MIN_SECONDS_PER_CELL, self.seconds_per_cell * factor))
        if not self.follow:
            middle = (start + end) / 2
            self.offset_s = max(0.0, middle - (end - start) * factor / 2)

    def scroll_by(self, fraction: float) -> None:
        start, end = self.window()
        self.follow = False
        self.offset_s = max(0.0, start + (end - start) * fraction)

    def render(self):
        width = max(MIN_TIMELINE_CELLS, self.size.width - LANE_LABEL_WIDTH)
        t0, t1 = self.window()
        cell = (t1 - t0) / width
        rows: list[Text] = []
        for role, lane in self.state.lanes.items():
            row = Text(f"{role:<6} {lane.device:<8}", "bold" if role == "target" else "")
            row.append("▕")
            cells: list[tuple[str, str]] = [(" ", "")] * width
            for span in lane.visible(t0, t1):
                a = max(0, int((span.start - t0) / cell))
                b = min(width, max(a + 1, int((span.end - t0) / cell)))
                char, style = PHASE_STYLE.get(span.phase, ("█", "white"))
                label = f"{span.n_tokens}" if span.phase in ("verify", "prefill") else ""
                for i in range(a, b):
                    cells[i] = (char, style)
                if label and b - a > len(label) + 1:  # label the pass with its token count
                    for k, ch in enumerate(label):
                        cells[a + 1 + k] = (ch, f"bold reverse {style}")
                if b - a >= 2 and char == "█":  # a thin gap marks where one pass ends
                    cells[b - 1] = ("▌", style)
            for ch, style in cells:
                row.append(ch, style)
            rows.append(row)
            if role == "draft":
                marks: list[str] = [" "] * width
                for t, _pos, _n in self.state.rollbacks:
                    if t0 <= t <= t1:
                        marks[min(width - 1, int((t - t0) / cell))] = "✕"
                rows.append(Text(" rollback       ▕" + "".join(marks), PHASE_STYLE["rollback"][1]))
        axis = Text(" " * LANE_LABEL_WIDTH + "▕")
        ticks = max(1, width // TICK_EVERY_CELLS)
        zero = self.state.started_at or 0.0  # one clock: seconds since the prompt went in
        for k in range(ticks):
            label = f"{t0 + k * TICK_EVERY_CELLS * cell - zero:.2f}s"
            axis.append(label.ljust(TICK_EVERY_CELLS)[:TICK_EVERY_CELLS], "grey50")
        rows.append(axis)
        mode = "following" if self.follow else "paused view"
        rows.append(Text(f" {mode} · {1000 * cell:.0f} ms/cell · +/- zoom · {{ }} scroll · "
                         "f follow", "grey50"))
        return Group(*rows)


class Legend(Static):
    """The token colours above the text, broken between entries to fit the pane's width."""

    def on_mount(self) -> None:
        self.update(legend())

    def on_resize(self) -> None:
        self.update(legend(self.size.width))  # the number of lines follows the width


class TokenStream(Static):
    """The generated text, each token styled by how it became final; the inspector's cursor is
    reverse-video; pending drafts trail dim after the committed text."""

    def show(self, state: RunState, cursor: int | None) -> None:
        text = Text()
        for tok in state.tokens:
            if tok.pos in state.rejected and tok.how in ("correction", "resampled"):
                text.append(visible_text(state.rejected[tok.pos][1]), STYLES["rejected"])
            style = STYLES.get(tok.how, "")
            if tok.how == "accepted" and tok.pos in state.cached:
                style = STYLES["cached"]
            if cursor == tok.pos:
                style += " reverse"
            text.append(visible_text(tok.text), style)
        pending = state.pending()
        if pending:
            text.append(visible_text("".join(pending)), STYLES["pending"])
        if not state.tokens and not pending:
            text.append("waiting for the first token…" if state.status != "error"
                        else state.message, "grey50 italic")
        self.update(text)


class StatsPanel(Static):
    def show(self, state: RunState, s, ar_ms: float | None, live: bool = True) -> None:
        """The run's statistics (`ar_ms`: an ar run's on this prompt, where one ran; the token
        count is the header's, drawn from the same state)."""
        table = Table.grid(padding=(0, 1))
        table.add_column(style="grey50", no_wrap=True)  # values wrap, labels never
        table.add_column(justify="right")

        def pct(x):
            return "-" if x is None else f"{100 * x:.0f}%"

        ms = s.ms_per_token
        if ms is None and state.tokens and state.elapsed():
            ms = 1000 * state.elapsed() / len(state.tokens)
        table.add_row("ms / token", "-" if ms is None else f"{ms:.0f}")
        if ar_ms and ms:
            table.add_row("speedup vs ar", f"{ar_ms / ms:.2f}×")
        elif live and state.strategy != "ar":
            table.add_row("speedup vs ar", Text("press 1 to run ar", "grey50"))
        aside = dear_tokens(state.strategy, s.extra_token)
        if aside:  # an AVX2-only CPU: no draft pays for its place in a pass (the help says more)
            table.add_row("drafts step aside", Text(aside, "italic"))
        table.add_row("accepted / pass", "-" if s.mean_accepted_per_pass is None
                      else f"{s.mean_accepted_per_pass:.2f}")
        table.add_row("acceptance", pct(s.acceptance_rate))
        if s.expected_acceptance is not None:
            table.add_row("per checked token", pct(s.acceptance_per_check))
            table.add_row("expected Σmin(p,q)", pct(s.expected_acceptance))
        if s.target_passes:
            table.add_row("solo target passes", f"{s.solo_passes}/{s.target_passes}")
        if s.cache_hit_rate is not None:
            table.add_row("cache hits", f"{s.cache_hits}/{s.cache_hits + s.cache_misses}")
        if s.tree_hits:  # verdicts that went on along a bet in their own pass
            table.add_row("tree hits", f"{s.tree_hits} (+{s.tree_tokens} tokens)")
        table.add_row("rollbacks", f"{s.rollbacks}")
        table.add_row("wasted drafts", f"{s.wasted_draft_tokens}")
        if s.best_ms_per_token is not None:  # amusd_viz/bound.py: these pass times, no waste
            table.add_row("no-waste model", f"{s.best_ms_per_token:.0f} ms/tok")
            table.add_row("reached", pct(s.best_ms_per_token / ms) if ms else "-")
        capped_by = shared_compute(state.strategy, state.target_device, state.draft_device)
        if capped_by and not aside:  # why amusd cannot get far ahead of sync here (the help says more)
            table.add_row("capped by", Text(capped_by, "italic"))
        for device, share in s.busy.items():
            table.add_row(f"busy {device}", pct(share))
        table.add_row("both busy", pct(s.overlap))
        if state.lost:
            table.add_row("lost", ", ".join(state.lost), style="red")
        self.update(table)


class Inspector(Static):
    """The draft's and the target's top candidates at the cursor, side by side, and the verdict."""

    def show(self, state: RunState, cursor: int | None) -> None:
        empty = cursor is None or cursor >= len(state.tokens)
        self.set_class(empty, "-empty")  # a hint needs two lines, not a verdict's height (app.tcss)
        if cursor is None or cursor >= len(state.tokens):
            self.update(Text("←/→ move the cursor over the tokens to inspect one", "grey50"))
            return
        tok = state.tokens[cursor]
        head = Text()
        head.append(f"position {tok.pos}  ", "bold")
        head.append(repr(tok.text), STYLES.get(tok.how, ""))
        head.append(f"  {tok.how}\n")
        if tok.how in ("correction", "resampled") and tok.pos in state.rejected:
            head.append(f"draft proposed {state.rejected[tok.pos][1]!r}: rejected",
                        STYLES["rejected"].split()[0])
            if tok.how == "resampled":
                head.append("; this token was drawn from the residual max(0, p − q)", STYLES["resampled"])
        elif tok.how == "accepted":
            head.append("draft and target agreed", STYLES["accepted"])
        elif tok.how == "bonus":
            head.append("all drafts accepted; the target added this one", STYLES["bonus"])
        else:
            head.append("the target decoded this without a draft to check")
        proposal = state.judged.get(tok.pos) or state.proposals.get(tok.pos)
        draft_top = list(proposal.top) if proposal is not None else []
        table = Table.grid(padding=(0, 2))
        table.add_column()
        table.add_column()
        table.add_row(Text("draft top-5", "bold"), Text("target top-5", "bold"))
        # two columns of bars need 2 × BAR_LINE + 2 cells inside the borders, else no bars
        cells = BAR_CELLS if self.content_size.width >= 2 * BAR_LINE + 2 else 0
        for i in range(INSPECTOR_TOP_K):
            table.add_row(_bar(draft_top[i], cells) if i < len(draft_top) else
                          Text("(no proposal)" if i == 0 else "", "grey50"),
                          _bar(tok.top[i], cells) if i < len(tok.top) else Text(""))
        reasons = [r for r in (lookup_source(state, proposal), cache_source(state, tok),
                               why(state, tok)) if r is not None]
        # the two top-5 lists before the reasons: where the pane is short, the prose is cut, not them
        self.update(Group(head, table, *reasons))


def lookup_source(state: RunState, proposal) -> Text | None:
    """The n-gram drafter: where in the prompt or the text the proposed token was copied from;
    a model draft: whether a lookup guess let the draft choose it in an earlier token's pass."""
    if proposal is not None and proposal.guessed:
        return Text("\nlookup guess: the text had gone on this way before, so the draft's pass "
                    "for the token before also fed this one; the draft chose it there (one "
                    "pass, two drafts)", LOOKUP)
    if proposal is None or proposal.ngram_from is None:
        return None
    at, n = proposal.ngram_from, proposal.ngram_n
    line = Text(f"\nn-gram lookup: after an earlier occurrence of the last {n} token(s), ", LOOKUP)
    if at < state.prompt_tokens:
        line.append(f"copied from the prompt (token {at} of {state.prompt_tokens})", LOOKUP)
        return line
    pos = at - state.prompt_tokens
    before = "".join(t.text for t in state.tokens[max(0, pos - 6):pos])
    line.append(f"copied from the text at position {pos}: …{before}", LOOKUP)
    line.append(f"[{proposal.text}]", f"bold {LOOKUP}")
    return line


def cache_source(state: RunState, tok) -> Text | None:
    """amusd's speculation cache: the branch this accepted draft came from."""
    bet = state.cached.get(tok.pos) if tok.how == "accepted" else None
    if bet is None:
        return None
    root, text = bet
    then = ("the target checked this draft in the same pass (a tree pass: no second pass)"
            if tok.pos in state.tree_taken
            else "this draft was ready at once (no solo pass while the draft rolled back)")
    return Text(f"\nfrom the speculation cache: drafted ahead on a branch that bet the target "
                f"would reject the draft at position {root} and pick {text!r}; it did, and "
                f"{then}", STYLES["cached"].split()[0])


def why(state: RunState, tok) -> Text | None:
    """Sampling: the verdict in numbers and words (p, q, min(1, p/q), the draw)."""
    check = state.checks.get(tok.pos)
    if check is None:
        return None
    p, q, a, u = check["p"], check["q"], check["accept_prob"], check["u"]
    drafted = state.rejected.get(tok.pos, (tok.token_id, tok.text))[1]
    line = Text(f"\ndraft token {drafted!r}: p = {p:.3f}, q = {q:.3f}, min(1, p/q) = {a:.3f}")
    if check["overlap"] is not None:
        line.append(f", Σmin(p,q) = {check['overlap']:.3f}", "grey50")
    rejected = tok.pos in state.rejected and tok.how != "accepted"
    if u is not None:
        verdict = (f"rejected: u = {u:.2f} ≥ p/q = {a:.2f}" if rejected
                   else f"accepted: u = {u:.2f} < p/q = {a:.2f}")
    else:
        verdict = ("rejected: the target's seeded sample differs" if rejected
                   else "accepted: draft and target drew the same token with the same noise")
    line.append(f"\n{verdict}", STYLES["rejected"].split()[0] if rejected else GOOD)
    return line


BAR_LINE = 12 + BAR_CELLS + 6  # a candidate with its bar: text, bar, percentage


def _bar(candidate, width: int = BAR_CELLS) -> Text:
    """A candidate and its probability; `width` 0: no bar (a narrow inspector)."""
    text, p = candidate.text, candidate.p
    filled = round(p * width)
    line = Text(f"{text!r:<12.12}" if width else f"{text!r:<10.10}")
    line.append("█" * filled + "·" * (width - filled), GOOD)
    line.append(f"{p:6.1%}")
    return line


class Chart(PlotextPlot):
    """A plotext chart redrawn from a callback, at most when its data changed."""

    def __init__(self, draw, **kw) -> None:
        super().__init__(**kw)
        self._draw = draw

    def redraw(self, *args) -> None:
        self.plt.clear_data()
        self.plt.clear_figure()
        self._draw(self.plt, *args)
        self.refresh()
