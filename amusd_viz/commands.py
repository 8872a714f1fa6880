"""The small subcommands: models, stats, export-trace, replay. None of them imports torch."""

from __future__ import annotations

import json
import sys

from amusd_viz.errors import UserError


def _read(path):
    """Read an event log (exit 2 on a bad one), printing its warnings (a torn tail, ...)."""
    from amusd_viz.eventlog import read_log

    log = read_log(path)
    for warning in log.warnings:
        print(f"amusd-viz: warning: {warning}", file=sys.stderr)
    return log


def models_command(args) -> int:
    from amusd_viz.models.registry import cache_dir, list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = ["name", "role", "params", "source", "available", "size", "path / hub id"]
    table = [[r["name"], r["default_role"] or "-", r["params"], r["source"],
              "yes" if r["available"] else "no",
              f"{r['size_mb']} MB" if r["size_mb"] else "-", r["path"] or r["hub_id"]]
             for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *table, strict=False)]
    for line in [headers, *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=False)).rstrip())
    print(f"\nconverted models live in {cache_dir()} (set AMUSD_VIZ_CACHE to move it). "
          "Any hub id (org/name) or local directory also works as --draft/--target.")
    return 0


def stats_command(args) -> int:
    from amusd_viz.stats import compute, format_stats

    log = _read(args.file)
    s = compute(log.events)
    print(json.dumps(s.to_dict(), indent=2) if args.json else format_stats(s))
    return 0


def export_trace_command(args) -> int:
    from amusd_viz.trace import to_trace

    log = _read(args.file)
    trace = to_trace(log.events)
    try:
        args.output.write_text(json.dumps(trace), encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {args.output}: {exc.strerror}. Choose another -o path.") from None
    lanes = sum(1 for e in trace["traceEvents"] if e.get("name") == "thread_name")
    print(f"wrote {args.output}: {len(trace['traceEvents'])} trace events, {lanes} device lanes. "
          "Open it at ui.perfetto.dev or chrome://tracing.")
    return 0


def replay_command(args) -> int:
    log = _read(args.file)
    from amusd_viz.ui.launch import run_replay

    return run_replay(log, args.speed, str(args.file))
