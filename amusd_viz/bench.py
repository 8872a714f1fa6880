"""`amusd-viz bench`: every strategy on the same prompts, models, dtype and machine, in one run.

Each strategy gets one engine (its worker processes load once, warm up on an untimed run, then
serve every prompt); engines run one after another so they never compete for cores or memory.
Timings are prompt-in to last-token-out, medians over prompts (and repeats); every strategy's
tokens are compared with `ar`'s.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from amusd_viz import stats as run_stats
from amusd_viz.errors import UserError
from amusd_viz.events import EventList

# name -> (engine strategy, target device kind, uses the draft)
KNOWN = {
    "ar": ("ar", "all", False),
    "ar-1dev": ("ar", "one", False),
    "sync": ("sync", "all", True),
    "sync-1dev": ("sync", "one", True),
    "amusd": ("amusd", "two", True),
    "hf-generate": ("hf-generate", "all", False),
    "hf-assisted": ("hf-assisted", "all", True),
}
DESCRIPTIONS = {
    "ar": "target alone, all cores / its GPU (the strongest plain baseline)",
    "ar-1dev": "target alone on one device (the paper's baseline)",
    "sync": "speculative decoding, models taking turns on all cores / one GPU",
    "sync-1dev": "speculative decoding on one device (on CPU: one core)",
    "amusd": "asynchronous: draft and target on two devices at once",
    "hf-generate": "plain transformers generate(), all cores",
    "hf-assisted": "transformers assisted generation with the same draft",
}


@dataclass
class Prompt:
    id: str
    prompt: str
    kind: str = "other"


def default_prompts_path() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "assets" / "prompts.jsonl", here.parent / "assets" / "prompts.jsonl"):
        if candidate.is_file():
            return candidate
    raise UserError("the bundled prompt set is missing; pass --prompts FILE.jsonl")


def load_prompts(path: Path) -> list[Prompt]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist. Pass a JSONL file with one "
                        '{"id": ..., "prompt": ...} a line.') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: not valid JSON ({exc.msg}). Each line must be "
                            '{"id": ..., "prompt": ...}.') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise UserError(f'{path}:{n}: needs a non-empty "prompt" string (and an "id").')
        prompts.append(Prompt(str(obj.get("id", n)), obj["prompt"], str(obj.get("kind", "other"))))
    if not prompts:
        raise UserError(f"{path} holds no prompts.")
    return prompts


@dataclass
class Result:
    strategy: str
    prompt_id: str
    kind: str
    repeat: int
    new_tokens: int
    wall_s: float
    ms_per_token: float
    token_ids: list[int]
    mean_accepted_per_pass: float | None = None
    acceptance_rate: float | None = None
    busy: dict = field(default_factory=dict)
    overlap: float | None = None
    curve: list[float] = field(default_factory=list)  # seconds at each committed token
    tops: list = field(default_factory=list)  # target top-2 per position (ar only)


def devices_for(kind: str, gpus: int, cores: list[int]) -> tuple[str, str]:
    if gpus:
        return ("cuda:0", "cuda:1" if gpus > 1 and kind == "two" else "cuda:0")
    if kind == "all":
        return "cpu", "cpu"
    if kind == "one":
        return f"cpu:{cores[0]}", f"cpu:{cores[0]}"
    return f"cpu:{cores[0]}", f"cpu:{cores[1] if len(cores) > 1 else cores[0]}"


def median(xs):
    return statistics.median(xs) if xs else None


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_with_ar(results: list[Result], dtype: str) -> list[dict]:
    """identical / near-tie (the target's own top-2 were within bf16 rounding at the first
    difference) / differs (a bug)."""
    ar = {(r.prompt_id, r.repeat): r for r in results if r.strategy == "ar"}
    verdicts = []
    for r in results:
        ref = ar.get((r.prompt_id, r.repeat)) or ar.get((r.prompt_id, 0))
        if r.strategy == "ar" or ref is None:
            continue
        pos = _first_difference(r.token_ids, ref.token_ids)
        if pos is None:
            verdict, gap = "identical", None
        else:
            top = ref.tops[pos] if pos < len(ref.tops) else []
            gap = math.log(top[0] / top[1]) if len(top) >= 2 and top[1] > 0 else None
            near = dtype != "float32" and gap is not None and gap < 0.5
            verdict = "near-tie" if near else "differs"
        verdicts.append({"strategy": r.strategy, "prompt": r.prompt_id, "repeat": r.repeat,
                         "verdict": verdict, "first_difference": pos,
                         "top2_logit_gap": None if gap is None else round(gap, 4)})
    return verdicts


def summarize(results: list[Result], names: list[str]) -> dict:
    def block(rows: list[Result]) -> dict:
        out = {}
        for name in names:
            mine = [r for r in rows if r.strategy == name]
            if not mine:
                continue
            ms = [r.ms_per_token for r in mine]
            acc = [r.mean_accepted_per_pass for r in mine if r.mean_accepted_per_pass is not None]
            rate = [r.acceptance_rate for r in mine if r.acceptance_rate is not None]
            busy: dict[str, list[float]] = {}
            for r in mine:
                for dev, share in r.busy.items():
                    busy.setdefault(dev, []).append(share)
            overlap = [r.overlap for r in mine if r.overlap is not None]
            out[name] = {
                "runs": len(mine),
                "median_ms_per_token": round(median(ms), 2),
                "min_ms_per_token": round(min(ms), 2),
                "max_ms_per_token": round(max(ms), 2),
                "mean_accepted_per_pass": round(statistics.mean(acc), 3) if acc else None,
                "acceptance_rate": round(statistics.mean(rate), 3) if rate else None,
                "busy": {d: round(median(v), 3) for d, v in busy.items()},
                "both_busy": round(median(overlap), 3) if overlap else None,
            }
        for ref in ("ar", "sync"):
            base = out.get(ref, {}).get("median_ms_per_token")
            for row in out.values():
                row[f"speedup_vs_{ref}"] = round(base / row["median_ms_per_token"], 3) if base else None
        return out

    kinds = sorted({r.kind for r in results})
    return {"overall": block(results), "by_kind": {k: block([r for r in results if r.kind == k])
                                                   for k in kinds}}


def format_table(summary: dict) -> str:
    headers = ["strategy", "ms/token", "min-max", "vs ar", "vs sync", "acc/pass", "accept",
               "busy"]
    rows = []
    for name, row in summary.items():
        busy = " ".join(f"{d.split('@')[0][0]}{100 * v:.0f}%" for d, v in row["busy"].items())
        rows.append([name, f"{row['median_ms_per_token']:.1f}",
                     f"{row['min_ms_per_token']:.0f}-{row['max_ms_per_token']:.0f}",
                     "-" if row["speedup_vs_ar"] is None else f"{row['speedup_vs_ar']:.2f}x",
                     "-" if row["speedup_vs_sync"] is None else f"{row['speedup_vs_sync']:.2f}x",
                     "-" if row["mean_accepted_per_pass"] is None else f"{row['mean_accepted_per_pass']:.2f}",
                     "-" if row["acceptance_rate"] is None else f"{100 * row['acceptance_rate']:.0f}%",
                     busy or "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip()
                     for line in [headers, *rows])


def terminal_chart(summary: dict) -> str:
    import plotext as plt

    names = list(summary)
    plt.clear_figure()
    plt.simple_bar(names, [summary[n]["median_ms_per_token"] for n in names], width=70,
                   title="median ms per token (lower is better)")
    return plt.build()


def write_svg(path: Path, curves: dict[str, list[float]], title: str) -> None:
    """Cumulative tokens against time, one polyline per strategy: the paper's figure."""
    width, height, pad = 720, 420, 50
    t_max = max((c[-1] for c in curves.values() if c), default=1.0) or 1.0
    n_max = max((len(c) for c in curves.values()), default=1) or 1
    palette = ["#d62728", "#ff7f0e", "#1f77b4", "#9467bd", "#2ca02c", "#8c564b", "#e377c2"]

    def xy(t, n):
        return (pad + (width - 2 * pad) * t / t_max, height - pad - (height - 2 * pad) * n / n_max)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">seconds since the prompt went in</text>',
             f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">tokens committed</text>']
    for k in range(6):
        t = t_max * k / 5
        x, _ = xy(t, 0)
        parts.append(f'<text x="{x:.0f}" y="{height - pad + 16}" text-anchor="middle">{t:.1f}</text>')
        n = n_max * k / 5
        _, y = xy(0, n)
        parts.append(f'<text x="{pad - 6}" y="{y + 4:.0f}" text-anchor="end">{n:.0f}</text>')
    for i, (name, curve) in enumerate(curves.items()):
        color = palette[i % len(palette)]
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in
                          (xy(t, n + 1) for n, t in enumerate(curve)))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
        parts.append(f'<text x="{width - pad - 140}" y="{pad + 16 * i}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts), encoding="utf-8")


def _result(name: str, prompt: Prompt, repeat: int, gen, events) -> Result:
    s = _window_stats(events, gen)
    commits = [e for e in events if e.type == "token_committed"]
    n = max(1, len(gen.token_ids))
    return Result(
        strategy=name, prompt_id=prompt.id, kind=prompt.kind, repeat=repeat,
        new_tokens=len(gen.token_ids), wall_s=gen.wall_s, ms_per_token=1000 * gen.wall_s / n,
        token_ids=gen.token_ids, mean_accepted_per_pass=s.mean_accepted_per_pass,
        acceptance_rate=s.acceptance_rate, busy=s.busy, overlap=s.overlap,
        curve=[e.t - gen.start_t for e in commits],
        tops=[[c.p for c in e.top[:2]] for e in commits] if name == "ar" else [])


def _window_stats(events, gen) -> run_stats.RunStats:
    """Statistics over the generation window only (the engine's events carry no run_finished)."""
    from amusd_viz.events import RunFinished

    closing = RunFinished(t=gen.end_t, new_tokens=len(gen.token_ids), wall_s=gen.wall_s,
                          started_at=gen.start_t)
    return run_stats.compute([*events, closing])


def bench_command(args) -> int:
    from tqdm.auto import tqdm

    from amusd_viz.engine.devices import cuda_count, usable_cores
    from amusd_viz.engine.run import prepare
    from amusd_viz.engine.session import Engine, RunCancelled

    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise UserError(f"unknown strategy {unknown[0]!r} in --strategies. Known: {', '.join(KNOWN)}.")
    if "ar" not in names:
        names.insert(0, "ar")  # the reference for speedups and losslessness
    prompts = load_prompts(args.prompts or default_prompts_path())
    if args.kinds:
        wanted = {k.strip() for k in args.kinds.split(",")}
        prompts = [p for p in prompts if p.kind in wanted]
    if args.limit:
        prompts = prompts[: args.limit]
    if not prompts:
        raise UserError("no prompts left after --kinds/--limit.")
    lookaheads = args.lookahead
    runs: list[tuple[str, str, int]] = []  # (label, known name, lookahead)
    for name in names:
        if KNOWN[name][2] and len(lookaheads) > 1:
            runs += [(f"{name}@{k}", name, k) for k in lookaheads]
        else:
            runs.append((name, name, lookaheads[0]))
    gpus, cores = cuda_count(), usable_cores()
    prepared = prepare("amusd", args.draft, args.target, *devices_for("two", gpus, cores),
                       args.dtype)
    encoded = []
    for p in prompts:
        ids = prepared.encode(p.prompt)
        prepared.check_length(ids, args.max_new_tokens)
        encoded.append(ids)
    quant = resolve_draft_quant(args.draft_quant, gpus)
    print(f"amusd-viz bench: {len(prompts)} prompts × {len(runs)} strategies × {args.repeats} "
          f"repeat(s), {args.max_new_tokens} new tokens, {args.dtype}, draft {prepared.draft} "
          f"(quant: {quant}), target {prepared.target}", file=sys.stderr)
    results: list[Result] = []
    total = len(prompts) * len(runs) * args.repeats
    bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr)
    interrupted = False
    engine = None
    try:
        # Rounds in A-B-B-A order: every repeat restarts each strategy's engine, and the reversed
        # order of odd rounds cancels a linear drift of the machine's speed (this VM's plain
        # decoding speed wandered by ±15% between back-to-back runs).
        for repeat in range(args.repeats):
            for label, name, lookahead in (runs if repeat % 2 == 0 else runs[::-1]):
                strategy, kind, _ = KNOWN[name]
                target_device, draft_device = devices_for(kind, gpus, cores)
                sink = EventList()
                cfg = prepared.engine_config(strategy, draft_quant=quant,
                                             stall_timeout=args.stall_timeout,
                                             wait_steps=args.wait_steps)
                if args.no_preamble_cache:
                    cfg.preamble = ()
                cfg.target_device, cfg.draft_device = target_device, draft_device
                bar.set_postfix_str(f"{label}: loading")
                engine = Engine(cfg, sink)
                engine.start()
                engine.wait_ready()
                bar.set_postfix_str(f"{label}: warm-up")
                engine.generate(encoded[0], min(16, args.max_new_tokens), lookahead,
                                prepared.eos_ids)
                for prompt, ids in zip(prompts, encoded):
                    bar.set_postfix_str(f"{label}: {prompt.id}")
                    sink.events = []
                    gen = engine.generate(ids, args.max_new_tokens, lookahead, prepared.eos_ids)
                    results.append(_result(label, prompt, repeat, gen, sink.events))
                    bar.update()
                engine.close()
                engine = None
    except (KeyboardInterrupt, RunCancelled):
        interrupted = True
        print("\namusd-viz bench: interrupted; results so far:", file=sys.stderr)
    finally:
        bar.close()
        if engine is not None:
            engine.close()
    labels = [label for label, _, _ in runs]
    report = build_report(results, labels, prompts, args, prepared, quant, interrupted)
    print(format_table(report["summary"]))
    for kind, block in report["by_kind"].items():
        print(f"\n{kind}:")
        print(format_table(block))
    bad = [v for v in report["lossless"] if v["verdict"] == "differs"]
    near = [v for v in report["lossless"] if v["verdict"] == "near-tie"]
    same = [v for v in report["lossless"] if v["verdict"] == "identical"]
    print(f"\nlossless vs ar: {len(same)} identical, {len(near)} parted at a numeric near-tie "
          f"({args.dtype}), {len(bad)} DIFFER")
    for v in near[:5]:
        print(f"  near-tie: {v['strategy']} on {v['prompt']} at token {v['first_difference']} "
              f"(target's top-2 logit gap {v['top2_logit_gap']})")
    for v in bad:
        print(f"  DIFFERS (a bug): {v['strategy']} on {v['prompt']} at token "
              f"{v['first_difference']} (top-2 logit gap {v['top2_logit_gap']})", file=sys.stderr)
    if report["summary"]:
        print("\n" + terminal_chart(report["summary"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot and results:
        first = prompts[0].id
        curves = {r.strategy: r.curve for r in results if r.prompt_id == first and r.repeat == 0}
        write_svg(args.plot, curves, f"tokens against time, prompt {first}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 130 if interrupted else (1 if bad else 0)


def resolve_draft_quant(choice: str, gpus: int) -> str:
    if choice == "auto":
        return "none" if gpus else "int8"
    if choice == "int8" and gpus:
        raise UserError("--draft-quant int8 runs on CPU devices only; use none on a GPU.")
    return choice


def build_report(results, labels, prompts, args, prepared, quant, interrupted) -> dict:
    from amusd_viz.eventlog import machine_info, package_versions

    overall = summarize(results, labels)
    return {
        "summary": overall["overall"],
        "by_kind": overall["by_kind"],
        "lossless": compare_with_ar(results, args.dtype),
        "settings": {"draft": prepared.draft, "target": prepared.target, "dtype": args.dtype,
                     "max_new_tokens": args.max_new_tokens, "lookahead": args.lookahead,
                     "repeats": args.repeats, "prompts": len(prompts), "draft_quant": quant,
                     "preamble_cache": not args.no_preamble_cache,
                     "strategies": {label: DESCRIPTIONS[label.split("@")[0]] for label in labels},
                     "interrupted": interrupted},
        "machine": machine_info(),
        "packages": package_versions(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": [{k: v for k, v in r.__dict__.items() if k not in ("tops",)} for r in results],
    }
