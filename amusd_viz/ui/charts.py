"""The four charts, drawn with plotext from RunState (and earlier runs on the same prompt)."""

from __future__ import annotations

from amusd_viz.ui.palette import GOOD, OKABE_ITO, STRATEGY_COLOURS, rgb
from amusd_viz.ui.state import RunState


def cumulative(plt, runs: list[tuple[str, list[float], list[int]]]) -> None:
    """The paper's figure: tokens committed against time, one line per strategy."""
    plt.title("tokens vs time (s)")
    for label, xs, ys in runs:
        if xs:
            colour = STRATEGY_COLOURS.get(label.split()[0], OKABE_ITO["reddish purple"])
            plt.plot(xs, ys, label=label, color=rgb(colour), marker="braille")
    plt.xlabel("s")


def throughput(plt, state: RunState, bin_s: float = 0.5) -> None:
    plt.title("tokens/s over time")
    xs, _ = state.commit_curve()
    if not xs:
        return
    n_bins = max(1, int(max(xs) / bin_s) + 1)
    counts = [0] * n_bins
    for x in xs:
        counts[min(n_bins - 1, max(0, int(x / bin_s)))] += 1
    plt.plot([(i + 1) * bin_s for i in range(n_bins)], [c / bin_s for c in counts],
             color=rgb(OKABE_ITO["sky blue"]), marker="braille")


def accepted_histogram(plt, state: RunState) -> None:
    plt.title("accepted per verify pass")
    if not state.accepted_per_pass:
        return
    top = max(state.accepted_per_pass)
    counts = [state.accepted_per_pass.count(k) for k in range(top + 1)]
    plt.bar([str(k) for k in range(top + 1)], counts, color=rgb(GOOD))


def acceptance_by_position(plt, rates: list[float]) -> None:
    plt.title("acceptance by draft position")
    if rates:
        plt.bar([str(i + 1) for i in range(len(rates))], [100 * r for r in rates], color=rgb(GOOD))
        plt.ylim(0, 100)
