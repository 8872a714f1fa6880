"""The benchmark's report: rich tables on the terminal, the JSON file, and the tokens-against-time
figure (matplotlib, an optional extra). No torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from amusd_viz.errors import UserError

NEAR_TIES_SHOWN = 5  # the report lists this many near-ties; the JSON has them all


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _speedup(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def model_table(summary: dict) -> Table:
    """Where the time goes: median pass times, and what each strategy would reach with them and
    its acceptance if it wasted nothing (amusd_viz/bound.py)."""
    table = Table(title="pass times, and ms per token with no waste (amusd_viz/bound.py)",
                  title_justify="left", box=None, pad_edge=False)
    for header in ("strategy", "target pass ms", "draft step ms", "no waste", "reached"):
        table.add_column(header, justify="left" if header == "strategy" else "right")
    for name, row in summary.items():
        best, measured = row.get("best_ms_per_token"), row["median_ms_per_token"]
        table.add_row(name, _ms(row.get("target_pass_ms")), _ms(row.get("draft_step_ms")),
                      _ms(best), _pct(best / measured if best and measured else None))
    return table


def summary_table(summary: dict, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    two = "sync-2dev" in summary  # the paper's baseline ran: a paired column against it
    for header, justify in (("strategy", "left"), ("ms/token", "right"), ("min-max", "right"),
                            ("vs ar", "right"), ("vs sync", "right"), ("paired", "right"),
                            *((("vs 2dev", "right"),) if two else ()), ("acc/pass", "right"),
                            ("accept", "right"), ("per check", "right"), ("Σmin(p,q)", "right"),
                            ("drafts/pass", "right"), ("solo", "right"), ("cache hit", "right"),
                            ("busy", "left")):
        table.add_column(header, justify=justify)
    for name, row in summary.items():
        busy = " ".join(f"{d.split('@')[0][0]}{100 * v:.0f}%" for d, v in row["busy"].items())
        acc = row["mean_accepted_per_pass"]
        table.add_row(name, f"{row['median_ms_per_token']:.1f}",
                      f"{row['min_ms_per_token']:.0f}-{row['max_ms_per_token']:.0f}",
                      _speedup(row["speedup_vs_ar"]), _speedup(row["speedup_vs_sync"]),
                      _speedup(row.get("paired_vs_sync")),
                      *((_speedup(row.get("paired_vs_sync-2dev")),) if two else ()),
                      "-" if acc is None else f"{acc:.2f}", _pct(row["acceptance_rate"]),
                      _pct(row.get("acceptance_per_check")), _pct(row.get("expected_acceptance")),
                      "-" if row.get("drafts_per_verify") is None
                      else f"{row['drafts_per_verify']:.1f}",
                      _pct(row.get("solo_share")), _pct(row.get("cache_hit_rate")),
                      busy or "-")
    return table


def story(summary: dict) -> list[str]:
    """amusd against the two synchronous baselines, in words: sync-2dev (the paper's comparison:
    the same devices, taking turns) and sync (every pass on all of one machine's cores)."""
    amusd = summary.get("amusd")
    if not amusd:
        return []
    lines = ["", "amusd against synchronous speculative decoding (paired, per prompt and repeat):"]
    for ref, what in (("sync-2dev", "the paper's comparison: each model on its own device, "
                                    "taking turns"),
                      ("sync", "both models on all cores, taking turns")):
        ratio = amusd.get(f"paired_vs_{ref}")
        if ref in summary and ratio is not None:
            lines.append(f"  {ratio:.2f}x {ref} ({what})")
    best, measured = amusd.get("best_ms_per_token"), amusd["median_ms_per_token"]
    if best and measured:
        lines.append(f"  amusd reached {best / measured:.0%} of its no-waste model "
                     f"({best:.1f} ms/token with its own pass times)")
    return lines if len(lines) > 2 else []


def terminal_chart(summary: dict) -> str:
    import plotext as plt

    names = list(summary)
    plt.clear_figure()
    plt.simple_bar(names, [summary[n]["median_ms_per_token"] for n in names], width=70,
                   title="median ms per token (lower is better)")
    return plt.build()


def print_report(report: dict, console: Console | None = None) -> list[dict]:
    """Print the tables (by kind only where there is more than one kind), the lossless verdicts
    and a bar chart; returns the verdicts that DIFFER (a bug)."""
    # piped into a file, rich would fold the table to 80 columns
    console = console or Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    console.print(summary_table(report["summary"], "all prompts"))
    console.print("paired: sync's time per token over this strategy's on the same prompt and "
                  "repeat (geometric mean); steadier than medians on a noisy machine"
                  + ("; vs 2dev: the same, against sync-2dev" if "sync-2dev" in report["summary"]
                     else ""), highlight=False)
    console.print()
    console.print(model_table(report["summary"]))
    for line in story(report["summary"]):
        console.print(line, highlight=False)
    if len(report["by_kind"]) > 1:
        for kind, block in report["by_kind"].items():
            console.print()
            console.print(summary_table(block, kind))
    for name, row in report["summary"].items():
        if row.get("draft_lost_runs"):
            console.print(f"\n[bold red]{name}: the draft worker died in {row['draft_lost_runs']} of "
                          f"{row['runs']} runs[/] (out of memory?): the target finished those "
                          "alone, so they are not timings of this strategy.")
    verdicts = report["lossless"]
    bad = [v for v in verdicts if v["verdict"] == "differs"]
    near = [v for v in verdicts if v["verdict"] == "near-tie"]
    same = [v for v in verdicts if v["verdict"] == "identical"]
    parted = [v for v in verdicts if v["verdict"] == "parted"]
    settings = report["settings"]
    dtype, rule = settings["dtype"], settings.get("acceptance", "greedy")
    if rule == "rejection":
        console.print("\nlossless: the rejection rule promises the target's distribution, not "
                      "ar's text; tests/test_sampling.py checks that distribution", highlight=False)
    console.print(f"\nlossless vs ar ({rule}): {len(same)} identical, {len(near)} parted at a "
                  f"numeric near-tie ({dtype}), {len(parted)} parted in a sampled {dtype} run, "
                  f"{len(bad)} DIFFER", highlight=False)
    for v in near[:NEAR_TIES_SHOWN]:
        console.print(f"  near-tie: {v['strategy']} on {v['prompt']} at token "
                      f"{v['first_difference']} (among ar's top 5; logit gap to ar's choice "
                      f"{v['top2_logit_gap']} <= {v['tolerance']})",
                      highlight=False)
    for v in bad:
        print(f"  DIFFERS (a bug): {v['strategy']} on {v['prompt']} at token "
              f"{v['first_difference']} (not a near-tie: logit gap {v['top2_logit_gap']}, "
              f"tolerance {v['tolerance']})", file=sys.stderr)
    if report["summary"]:
        console.print("\n" + terminal_chart(report["summary"]), highlight=False, markup=False)
    return bad


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'amusd-viz[plot]' (or pip install "
                        "matplotlib), or leave out --plot.") from None


def write_plot(path: Path, curves: dict[str, list[float]], title: str) -> None:
    """Cumulative tokens against time, one line per strategy: the paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for name, curve in curves.items():
        ax.plot(curve, range(1, len(curve) + 1), label=name, linewidth=1.8)
    ax.set_xlabel("seconds since the prompt went in")
    ax.set_ylabel("tokens committed")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(report: dict, json_out: Path | None, plot: Path | None,
                  curves: dict[str, list[float]], first_prompt: str) -> None:
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {json_out}", file=sys.stderr)
    if plot and curves:
        write_plot(plot, curves, f"tokens against time, prompt {first_prompt}")
        print(f"wrote {plot}", file=sys.stderr)
