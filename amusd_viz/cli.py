"""The `amusd-viz` command line (docs/architecture.md, "Command line").

`amusd-viz [options]` opens the TUI and generates (or, with --headless, prints the run summary as
JSON); `bench`, `replay`, `export-trace`, `stats` and `models` are subcommands. Every mistake a
user can make exits 2 with one line naming the problem and the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import signal
import sys
import textwrap
from pathlib import Path

from amusd_viz import __version__
from amusd_viz.config import (
    ACCEPTANCE_RULES,
    DEFAULT_BENCH_MAX_NEW,
    DEFAULT_LOOKAHEAD,
    DEFAULT_MAX_NEW,
    DEFAULT_PROMPT,
    DEFAULT_STALL_TIMEOUT,
    DTYPES,
    KV_CACHE_CHOICES,
    MAX_SEED,
    QUANT_CHOICES,
    STRATEGIES,
    BenchConfig,
    RunConfig,
    parse_ngram,
)
from amusd_viz.engine.mps import parse_share
from amusd_viz.errors import RunFailed, UserError

COMMANDS = ("bench", "replay", "export-trace", "stats", "models", "serve")
BENCH_STRATEGIES = "ar,ar-1dev,sync,sync-2dev,amusd,hf-assisted"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line and exit 2, with a pointer to --help; and no
    abbreviations (`--headles` would otherwise start a model run as `--headless`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # exits 2, never returns
        self.exit(2, f"{self.prog}: error: {message}. See `{self.prog} --help`.\n")


def _number(kind: type, ok, rule: str):
    """An argparse type: parse `kind` (int or float), then check `ok`; a bad value is one line
    naming the rule."""
    noun = "a whole number" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = noun  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "at least 1")
non_negative_int = _number(int, lambda v: v >= 0, "0 or more")
# torch's CPU generator keeps 32 bits of a seed: larger seeds would repeat smaller ones' text
seed_value = _number(int, lambda v: 0 <= v <= MAX_SEED, f"between 0 and {MAX_SEED} (2^32 - 1)")
positive_float = _number(float, lambda v: v > 0, "greater than 0")
non_negative_float = _number(float, lambda v: v >= 0, "0 or more")
probability = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")


def int_list(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",") if part.strip()]


def add_model_options(p: argparse.ArgumentParser) -> None:
    from amusd_viz.models.registry import DEFAULT_DRAFT, DEFAULT_TARGET

    g = p.add_argument_group("models and devices")
    g.add_argument("--draft", default=DEFAULT_DRAFT, metavar="NAME",
                   help=f"draft model: a name from `amusd-viz models`, a hub id, a local "
                        "directory, or ngram / ngram:N (prompt lookup, no model: copies what "
                        "followed the last N tokens earlier in the prompt or text; N=3) "
                        f"(default: {DEFAULT_DRAFT})")
    g.add_argument("--target", default=DEFAULT_TARGET, metavar="NAME",
                   help=f"target model, same forms (default: {DEFAULT_TARGET})")
    g.add_argument("--draft-device", metavar="D",
                   help="device of the draft: cpu:N (one core), cpu (all cores) or cuda:N "
                        "(default: cuda:1 with two GPUs, cuda:0 with one, else cpu:1)")
    g.add_argument("--target-device", metavar="D",
                   help="device of the target (default: cuda:0 with a GPU; else cpu:0 for amusd, "
                        "cpu (all cores) for sync and ar)")
    g.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="weights and compute dtype; float32 on a CPU is the exact mode (default: "
                        "auto: bfloat16 on a CPU and on GPUs with native bf16, float32 on older "
                        "GPUs)")


def add_generation_options(p: argparse.ArgumentParser, bench: bool = False) -> None:
    g = p.add_argument_group("generation")
    if not bench:
        src = g.add_mutually_exclusive_group()
        src.add_argument("--prompt", metavar="TEXT",
                         help="the user message (sent through the target's chat template; "
                              "default: a short coding request)")
        src.add_argument("--prompt-file", metavar="F", type=Path,
                         help="read the user message from a text file")
        g.add_argument("--strategy", choices=STRATEGIES, default="amusd",
                       help="amusd: asynchronous on two devices; sync: classic speculative "
                            "decoding on one device; ar: the target alone (default: amusd)")
        g.add_argument("--lookahead", type=positive_int, default=DEFAULT_LOOKAHEAD, metavar="K",
                       help=f"draft tokens verified per target pass at most (default: "
                            f"{DEFAULT_LOOKAHEAD})")
    max_new = DEFAULT_BENCH_MAX_NEW if bench else DEFAULT_MAX_NEW
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new, metavar="N",
                   help=f"stop after N generated tokens, or at end of sequence (default: "
                        f"{max_new})")


def add_tuning_options(p: argparse.ArgumentParser) -> None:
    """The engine's A/B switches, below the everyday options: each speed policy can be
    switched off to see what it buys (engine/plan.py resolves them into the run's plan)."""
    g = p.add_argument_group("engine tuning (defaults are the fastest measured; "
                             "docs/benchmarks.md)")
    on_off = ("on", "off")
    g.add_argument("--adaptive", choices=on_off, default="on",
                   help="sync and amusd: draft only as far as the draft's own confidence makes "
                        "a token worth its step (the lookahead stays the most); amusd's draft "
                        "rests when no step is worth it, and on one shared device ends its "
                        "turn as sync would. Where a pass's extra tokens are dear (a CPU "
                        "without matrix units, timed at load), drafts step aside and the "
                        "target decodes alone; off speculates anyway (default: on)")
    g.add_argument("--spec-cache", choices=on_off, default="on",
                   help="amusd: while the target verifies, also draft on branches that bet on "
                        "its likeliest corrections, so that a hit hands it drafts at once, and "
                        "let the target check those bets in the pass that decides them "
                        "(default: on)")
    g.add_argument("--draft-lookup", choices=on_off, default="on",
                   help="sync and amusd: where the text repeats an earlier stretch of it, guess "
                        "that the draft goes on the same way and let the draft check up to 4 "
                        "guesses in the pass that drafts its next token, so one draft pass can "
                        "draft several tokens (the draft still picks every token; default: on)")
    g.add_argument("--lend-core", choices=on_off, default="on",
                   help="amusd on two CPU cores: when the draft has nothing worth drafting, it "
                        "lends its core and the target runs its next pass on both cores "
                        "(needs --adaptive on; default: on)")
    g.add_argument("--draft-quant", choices=QUANT_CHOICES, default="auto",
                   help="int8: dynamic int8 linear layers for the draft only (CPU; the target "
                        "and so the output are untouched); auto: int8 on CPU, none on GPU "
                        "(default: auto)")
    g.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default="auto",
                   help="static: each model's keys and values in preallocated lines, written at "
                        "a position pointer that a rollback moves back (the fixed addresses "
                        "CUDA graphs need); dynamic: transformers' growing cache; auto: static "
                        "on a GPU, dynamic on a CPU. The output is the same either way "
                        "(default: auto)")
    g.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="on a GPU with the static KV cache: record each pass size (1, 2, 4, 8, "
                        "16, 32 tokens) as a CUDA graph at load and replay it, one launch a "
                        "pass instead of a kernel launch per layer op; each graph is checked "
                        "against the eager pass and dropped for it where they disagree "
                        "(default: auto: on wherever a model runs on a GPU)")
    g.add_argument("--gpu-share", default="baton", metavar="baton|mps:N",
                   help="amusd with both models on one GPU: baton, the workers take turns "
                        "(sync's schedule); mps:N, both compute at once under NVIDIA MPS, the "
                        "draft capped at N%% of the GPU's SMs and the target at the rest (needs "
                        "a running MPS daemon: nvidia-cuda-mps-control -d; refused without "
                        "one) (default: baton)")
    g.add_argument("--stall-timeout", type=positive_float, default=DEFAULT_STALL_TIMEOUT,
                   metavar="S", help="fail the run when the target makes no progress for S "
                                     f"seconds (default: {DEFAULT_STALL_TIMEOUT:g})")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (docs/protocol.md, \"Sampling\")")
    g.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                   help="0 decodes greedily (the default); above 0, tokens are sampled and the "
                        "output is distributed exactly like the target's own sampling")
    g.add_argument("--top-p", type=probability, default=1.0, metavar="P",
                   help="keep the smallest set of tokens whose probability reaches P "
                        "(default: 1, off)")
    g.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                   help="keep the K likeliest tokens (default: 0, off)")
    g.add_argument("--seed", type=seed_value, metavar="S",
                   help="the sampling seed (default: a fresh random one, recorded in the log "
                        "and the summary so the run can be repeated)")
    g.add_argument("--acceptance", choices=ACCEPTANCE_RULES, metavar="RULE",
                   help="with --temperature > 0: coupled (the default: the same seed gives the "
                        "same text in ar, sync and amusd) or rejection (the standard "
                        "speculative sampling rule)")


def build_run_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="amusd-viz",
        description="Watch asynchronous multi-device speculative decoding (AMUSD) work: a small "
                    "draft model proposes tokens on one device while a large target model "
                    "verifies them on another, both at once.",
        epilog="commands:\n"
               "  amusd-viz bench --prompts F.jsonl   every strategy side by side\n"
               "  amusd-viz replay FILE               play a recorded event log in the TUI\n"
               "  amusd-viz export-trace FILE -o OUT  write a Perfetto / chrome://tracing trace\n"
               "  amusd-viz stats FILE                statistics of an event log\n"
               "  amusd-viz models                    the known models and where they come from\n"
               "  amusd-viz serve [-- ARGS]           the app in a web browser (one per tab)\n"
               "Run `amusd-viz COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"amusd-viz {__version__}")
    add_model_options(p)
    add_generation_options(p)
    add_sampling_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--headless", action="store_true",
                   help="no TUI: generate and print the run summary as JSON on stdout")
    g.add_argument("--events", metavar="FILE", type=Path,
                   help="record every event to FILE (JSONL, flushed as it goes)")
    g.add_argument("--summary-json", metavar="FILE", type=Path,
                   help="write the run summary (JSON) to FILE when the run ends")
    add_tuning_options(p)
    return p


def _models_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="amusd-viz models",
                description="List the known models: default role, where each comes from now, "
                            "whether it is available offline, size and local path.")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    return p


def _stats_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="amusd-viz stats", description="Print the statistics of an event log.")
    p.add_argument("file", type=Path, help="an event log written with --events")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _export_trace_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="amusd-viz export-trace",
                description="Write a Chrome trace-event JSON file (opens in Perfetto or "
                            "chrome://tracing) with one lane per device.")
    p.add_argument("file", type=Path, help="an event log written with --events")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                   help="where to write the trace (JSON)")
    return p


def _replay_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="amusd-viz replay",
                description="Play a recorded event log in the TUI (no models, no torch).")
    p.add_argument("file", type=Path, help="an event log written with --events")
    p.add_argument("--speed", type=positive_float, default=1.0, metavar="X",
                   help="playback speed factor (default: 1.0)")
    return p


def _bench_parser() -> argparse.ArgumentParser:
    from amusd_viz.bench import DESCRIPTIONS

    width = max(map(len, DESCRIPTIONS)) + 2
    p = _Parser(prog="amusd-viz bench",
                description="Run every strategy on the same prompts, models and dtype, and "
                            "compare their speed, acceptance and losslessness.",
                epilog="strategies (--strategies):\n" + "\n".join(
                    textwrap.fill(what, 79, initial_indent=f"  {name:<{width}}",
                                  subsequent_indent=" " * (width + 2))
                    for name, what in DESCRIPTIONS.items()),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    add_generation_options(p, bench=True)
    add_sampling_options(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--prompts", type=Path, metavar="FILE.jsonl",
                   help='prompts, one {"id": ..., "prompt": ...} a line (default: the bundled '
                        "prompt set)")
    g.add_argument("--strategies", default=BENCH_STRATEGIES, metavar="LIST",
                   help=f"comma-separated strategies, listed below (default: "
                        f"{BENCH_STRATEGIES})")
    g.add_argument("--lookahead", type=int_list, default=[DEFAULT_LOOKAHEAD], metavar="K[,K…]",
                   help=f"lookahead for sync and amusd; a list sweeps it (default: "
                        f"{DEFAULT_LOOKAHEAD})")
    g.add_argument("--no-preamble-cache", action="store_true",
                   help="feed every prompt whole, as transformers' generate does; by default ar, "
                        "sync and amusd start past the chat template's fixed preamble, fed once "
                        "while the models load")
    g.add_argument("--repeats", type=positive_int, default=1, metavar="N",
                   help="timed runs per prompt and strategy; the median is reported (default: 1)")
    g.add_argument("--limit", type=positive_int, metavar="N", help="use only the first N prompts")
    g.add_argument("--kinds", metavar="LIST",
                   help="only prompts of these kinds (comma-separated: chat,code,edit,math,"
                        "prose in the bundled set)")
    g.add_argument("--json", type=Path, metavar="OUT", help="write the full results as JSON")
    g.add_argument("--plot", type=Path, metavar="OUT.svg",
                   help="draw cumulative tokens against time for the first prompt (SVG; needs "
                        "matplotlib: pip install 'amusd-viz[plot]')")
    add_tuning_options(p)
    return p


def _serve_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="amusd-viz serve",
                description="Serve the app to web browsers (textual-serve): every tab runs its "
                            "own app. After `--`, what a terminal run takes: a live run's options "
                            "(none: the default pair) or `replay FILE`. Example: amusd-viz serve "
                            "-- replay assets/sample-amusd-code.jsonl")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; any other "
                        "lets whoever reaches it run prompts here)")
    p.add_argument("--port", type=_number(int, lambda v: 1 <= v <= 65535, "from 1 to 65535"),
                   default=8000, help="TCP port (default: 8000)")
    p.add_argument("--max-live", type=positive_int, default=1, metavar="N",
                   help="live runs at once (each loads the models); more visitors get a page "
                        "saying so (default: 1); replays are not counted")
    return p


_COMMAND_PARSERS = {"models": _models_parser, "stats": _stats_parser,
                    "export-trace": _export_trace_parser, "replay": _replay_parser,
                    "bench": _bench_parser, "serve": _serve_parser}


def build_command_parser(command: str) -> argparse.ArgumentParser:
    return _COMMAND_PARSERS[command]()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _terminate_as_interrupt()
    try:
        if argv and argv[0] == "serve":
            return _serve(argv[1:])
        if argv and argv[0] in COMMANDS:
            command = argv[0]
            args = build_command_parser(command).parse_args(argv[1:])
            return _dispatch(command, args)
        if argv and not argv[0].startswith("-"):
            _unknown_command(argv[0])
        args = build_run_parser().parse_args(argv)
        return _run(args)
    except UserError as exc:
        print(f"amusd-viz: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RunFailed as exc:
        print(f"amusd-viz: run failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("amusd-viz: interrupted; every worker was stopped.", file=sys.stderr)
        return 130


def _unknown_command(word: str) -> None:
    """A run takes options only: a bare word is a mistyped command."""
    import difflib

    close = difflib.get_close_matches(word, COMMANDS, n=1)
    hint = f"did you mean `amusd-viz {close[0]}`?" if close else f"commands: {', '.join(COMMANDS)}"
    raise UserError(f"unknown command {word!r}: {hint} (`amusd-viz --help` lists the options "
                    "of a run)")


def _terminate_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl+C, so `finally` blocks stop the workers and close the logs."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # ValueError: not the main thread (tests)
        signal.signal(signal.SIGTERM, handler)


def _serve(argv: list[str]) -> int:
    from amusd_viz.serve import AppParsers, ServeConfig, serve_command, split_app_args

    own, app_args = split_app_args(argv)
    parser = build_command_parser("serve")
    _, unknown = parser.parse_known_args(own)
    if unknown and "--" not in argv:  # `serve replay FILE`: the app's arguments go after `--`
        raise UserError(f"amusd-viz serve does not take {' '.join(unknown)!r}: the app's own "
                        "arguments go after `--`, e.g. `amusd-viz serve -- replay FILE` or "
                        "`amusd-viz serve -- --prompt TEXT`.")
    args = parser.parse_args(own)
    parsers = AppParsers(COMMANDS, build_run_parser, _replay_parser)
    return serve_command(ServeConfig(args.host, args.port, args.max_live, tuple(app_args)),
                         parsers)


def _dispatch(command: str, args) -> int:
    from amusd_viz import commands

    if command == "bench":
        from amusd_viz.bench import bench_command

        return bench_command(build_bench_config(args))
    handler = {"models": commands.models_command, "stats": commands.stats_command,
               "export-trace": commands.export_trace_command,
               "replay": commands.replay_command}[command]
    return handler(args)


def read_prompt(args) -> str:
    if args.prompt_file is not None:
        path: Path = args.prompt_file
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"prompt file {path} does not exist. Check the path, or pass "
                            "--prompt TEXT.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read prompt file {path}: {exc}") from None
        if not text.strip():
            raise UserError(f"prompt file {path} is empty. Write the prompt into it, or pass "
                            "--prompt TEXT.")
        return text.strip()
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty. Give the text of the prompt.")
        return args.prompt
    return DEFAULT_PROMPT


def _check_writable(path: Path | None, option: str) -> None:
    if path is not None and not path.parent.resolve().is_dir():
        raise UserError(f"{option} {path}: the folder {path.parent} does not exist. Create it or "
                        "choose another path.")


def _sampling_settings(args) -> dict:
    if args.acceptance is not None and args.temperature == 0:
        raise UserError(f"--acceptance {args.acceptance} needs --temperature above 0 (greedy "
                        "decoding has no acceptance rule). Add --temperature T or drop "
                        "--acceptance.")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "seed": seed, "acceptance": args.acceptance}


def _model_settings(args) -> dict:
    """The options that run and bench share, as RunConfig fields."""
    parse_ngram(args.draft)  # a bad ngram:N is one clear line, before anything loads
    parse_share(args.gpu_share)  # so is a bad --gpu-share
    return {**_sampling_settings(args), "draft": args.draft, "target": args.target,
            "dtype_option": args.dtype,
            "max_new_tokens": args.max_new_tokens, "stall_timeout": args.stall_timeout,
            "target_device_option": args.target_device, "draft_device_option": args.draft_device,
            "draft_quant_option": args.draft_quant, "kv_cache_option": args.kv_cache,
            "cuda_graphs_option": args.cuda_graphs, "gpu_share_option": args.gpu_share,
            "adaptive": args.adaptive == "on",
            "spec_cache": args.spec_cache == "on", "draft_lookup": args.draft_lookup == "on",
            "lend_core": args.lend_core == "on"}


def build_run_config(args) -> RunConfig:
    """The run the options describe, devices resolved and checked on this machine."""
    from amusd_viz.engine.devices import resolve_run

    _check_writable(args.events, "--events")
    _check_writable(args.summary_json, "--summary-json")
    cfg = RunConfig(strategy=args.strategy, prompt=read_prompt(args), lookahead=args.lookahead,
                    events=args.events, summary_json=args.summary_json, **_model_settings(args))
    return resolve_run(cfg)


def build_bench_config(args) -> BenchConfig:
    from amusd_viz.engine.devices import parse_device

    settings = _model_settings(args)
    for key, option in (("target_device_option", "--target-device"),
                        ("draft_device_option", "--draft-device")):
        if settings[key]:  # checked and spelled one way (cuda -> cuda:0) before anything loads
            settings[key] = str(parse_device(settings[key], option))
    from amusd_viz.engine.devices import cuda_count, resolve_dtype

    target = settings["target_device_option"] or ("cuda:0" if cuda_count() else "cpu")
    run = RunConfig(preamble_cache=not args.no_preamble_cache,
                    lookahead=args.lookahead[0], dtype=resolve_dtype(args.dtype, target),
                    **settings)
    return BenchConfig(
        run=run, prompts=args.prompts,
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        lookaheads=tuple(args.lookahead), repeats=args.repeats, limit=args.limit,
        kinds=tuple(k.strip() for k in (args.kinds or "").split(",") if k.strip()),
        json_out=args.json, plot=args.plot)


def _run(args) -> int:
    cfg = build_run_config(args)
    if args.headless:
        return run_headless(cfg)
    from amusd_viz.ui.launch import run_live

    return run_live(cfg)


def run_headless(cfg: RunConfig) -> int:
    from amusd_viz.engine.run import execute, prepare
    from amusd_viz.eventlog import JsonlRecorder, make_header
    from amusd_viz.events import FanOut

    prepared = prepare(cfg)
    recorder = JsonlRecorder(cfg.events, make_header(cfg.log_config())) if cfg.events else None
    try:
        summary = execute(prepared, cfg, FanOut(*[recorder] if recorder else []))
    finally:
        if recorder:
            recorder.close()
    text = summary.to_json()
    if cfg.summary_json:
        cfg.summary_json.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0
