"""What sampling adds to a pass: the sampler's own work (processing p and q, the noise, the
verdict) next to the forward passes it follows, on the default pair, one core each (as amusd
runs them on a CPU).

    python scripts/sampling-cost.py [--temperature 0.7] [--lookahead 8] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from amusd_viz.config import RunConfig, SamplingParams
from amusd_viz.engine.loading import load_model
from amusd_viz.engine.run import prepare
from amusd_viz.engine.sampling import Sampler


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--lookahead", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    prepared = prepare(RunConfig())
    target = load_model(prepared.target_src, "bfloat16", "cpu")
    draft = load_model(prepared.draft_src or "", "bfloat16", "cpu", target.tokenizer, "int8")
    ids = prepared.encode("Write a Python function that merges two sorted lists.")
    k = args.lookahead
    target.begin()
    target.forward(ids, 1)
    draft.begin()
    draft.forward(ids, 1)
    drafts = list(range(1000, 1000 + k))
    verify_s = timed(lambda: target.forward(ids + drafts, k + 1), args.repeats)
    step_s = timed(lambda: draft.forward(ids + drafts[:1], 1), args.repeats)
    logits, *_ = target.forward(ids + drafts, k + 1)
    draft_row, *_ = draft.forward(ids + drafts[:1], 1)
    vocab = max(target.vocab, draft.vocab)
    for rule in ("coupled", "rejection"):
        params = SamplingParams(args.temperature, args.top_p, 0, 7, rule)
        q_rows = [Sampler(params, vocab).propose(draft_row[0], i)[2] for i in range(k)]

        def verdict(params=params, q_rows=q_rows):
            # a fresh sampler: the noise of k + 1 new positions is drawn, as in a real pass
            Sampler(params, vocab).verdict(logits, drafts, 0, q_rows)

        def propose(params=params):
            Sampler(params, vocab).propose(draft_row[0], 0)

        v, d = timed(verdict, args.repeats), timed(propose, args.repeats)
        print(f"{rule:9} T={args.temperature:g}: verdict {1000 * v:6.1f} ms on a "
              f"{1000 * verify_s:.0f} ms verify pass of {k + 1} tokens ({100 * v / verify_s:.1f}%); "
              f"propose {1000 * d:5.1f} ms on a {1000 * step_s:.0f} ms draft step "
              f"({100 * d / step_s:.1f}%)")


if __name__ == "__main__":
    main()
