"""The CUDA path, on tiny float32 models (scripts/gpu-check.sh runs these on a GPU machine; they
skip where torch sees no GPU). float32 on CUDA is not bit-exact between one- and k-token passes
(cuBLAS picks kernels per shape), so a divergence is allowed only at a real near-tie
(amusd_viz/lossless.py): the diverging token is ar's runner-up within a few float32 ulps."""

from __future__ import annotations

import warnings

import pytest
import torch

from amusd_viz.bench import Result, compare_with_ar
from amusd_viz.engine.session import Engine, EngineConfig
from amusd_viz.events import EventList

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(GPUS == 0, reason="no CUDA GPU (torch sees none)")]
PROMPTS = ([5, 6, 7], [40, 41, 42, 43, 44], list(range(10, 40)))
MAX_NEW = 40


def generate(tiny_models, strategy, target_device="cuda:0", draft_device="cuda:0",
             draft="draft_near", kv_cache="static", cuda_graphs=True, gpu_share=None):
    """`--kv-cache auto` is static on a GPU, with CUDA graphs: the default here too."""
    sink = EventList()
    cfg = EngineConfig(strategy=strategy, target_src=str(tiny_models["target"]),
                       draft_src=None if strategy in ("ar", "hf-generate")
                       else str(tiny_models[draft]),
                       target_device=target_device, draft_device=draft_device, dtype="float32",
                       kv_cache=kv_cache, cuda_graphs=cuda_graphs and kv_cache == "static",
                       gpu_share=gpu_share)
    out = []
    with Engine(cfg, sink) as engine:
        engine.start()
        engine.wait_ready()
        for prompt in PROMPTS:
            sink.events = []
            gen = engine.generate(prompt, MAX_NEW, 4, frozenset())
            out.append((gen, list(sink.events)))
    return out


def as_results(name, runs):
    results = []
    for i, (gen, events) in enumerate(runs):
        commits = [e for e in events if e.type == "token_committed"]
        tops = [[{"id": c.id, "logit": c.logit} for c in e.top[:2]] for e in commits]
        results.append(Result(name, str(i), "cuda", 0, len(gen.token_ids), gen.wall_s, 0.0,
                              gen.token_ids, tops=tops if name == "ar" else []))
    return results


def assert_lossless(tiny_models, runs_by_strategy, device):
    verdicts = compare_with_ar([r for name, runs in runs_by_strategy.items()
                                for r in as_results(name, runs)], "float32", device=device)
    assert verdicts and all(v["verdict"] in ("identical", "near-tie") for v in verdicts), verdicts


def check_spans(events):
    """Forward spans are stamped after synchronisation: positive, never overlapping per device."""
    spans: dict[str, list] = {}
    for e in events:
        if e.type == "forward":
            assert e.dur > 0
            spans.setdefault(e.device, []).append((e.t, e.t + e.dur))
    for intervals in spans.values():
        intervals.sort()
        for (_, end), (start, _) in zip(intervals, intervals[1:]):
            assert start >= end - 1e-6


def test_every_strategy_on_one_gpu_is_the_targets_own_decoding(tiny_models):
    from amusd_viz.engine.graphs import GRAPH_BUCKETS

    runs = {s: generate(tiny_models, s) for s in ("ar", "sync", "amusd", "hf-generate")}
    assert_lossless(tiny_models, runs, "cuda:0")
    for strategy in ("ar", "sync", "amusd"):  # every bucket captured and kept at load
        ready = [e for _, events in runs[strategy][:1] for e in events if e.type == "worker_ready"]
        assert all(e.graphs == list(GRAPH_BUCKETS) and not e.graphs_dropped for e in ready)
    for gen, events in runs["amusd"]:
        check_spans(events)
        verifies = [e for e in events if e.type == "verify_result"][1:]
        # one GPU: the workers take turns, and each turn's drafts are verified
        assert sum(len(e.proposed) for e in verifies) / len(verifies) > 1


def test_the_dynamic_cache_on_a_gpu_is_also_the_targets_own_decoding(tiny_models):
    runs = {"ar": generate(tiny_models, "ar", kv_cache="dynamic"),
            **{s: generate(tiny_models, s, kv_cache="dynamic") for s in ("sync", "amusd")},
            "amusd-static": generate(tiny_models, "amusd", cuda_graphs=False)}
    assert_lossless(tiny_models, runs, "cuda:0")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_graphs_replay_what_the_eager_pass_computes(tiny_models, attn):
    """Every bucket is captured and kept (float32), and passes through the graphs (padded,
    tree-masked, a prefill chunked through the largest) give the logits of the same padded
    passes run eagerly; a crop then a re-feed gives a fresh pass's."""
    from transformers import AutoModelForCausalLM

    from amusd_viz.engine.graphs import GRAPH_BUCKETS, GraphRunner
    from amusd_viz.engine.static_runner import StaticRunner

    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], dtype=torch.float32,
                                                 attn_implementation=attn).to("cuda:0").eval()
    graphed = GraphRunner(model, "cuda:0")
    report = graphed.capture()
    assert report.kept == list(GRAPH_BUCKETS) and not report.dropped, report
    eager = StaticRunner(model, "cuda:0", buckets=GRAPH_BUCKETS)
    seq = list(range(3, 80))
    cases = [(seq, 1, ()), ([*seq, 5], 1, ()), ([*seq, 5, 6, 7, 8], 4, ((len(seq) + 1, [9, 10]),)),
             ([*seq[:40], 11, 12], 2, ()), ([*seq[:40], 11, 12, 13], 1, ((41, [14]),))]
    for line, n, paths in cases:
        before = graphed.replays
        got, *_ = graphed.forward(line, n, paths=paths)
        want, *_ = eager.forward(line, n, paths=paths)
        assert graphed.replays > before  # the graphs ran, not the eager fallback
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert int(graphed.cache.get_seq_length()) == len(line) == len(graphed.ids)


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
def test_amusd_on_two_gpus(tiny_models):
    runs = {"ar": generate(tiny_models, "ar"),
            "amusd": generate(tiny_models, "amusd", "cuda:0", "cuda:1")}
    assert_lossless(tiny_models, runs, "cuda:0")
    for _, events in runs["amusd"]:
        check_spans(events)
        assert {e.device for e in events if e.type == "forward"} == {"cuda:0", "cuda:1"}


def test_amusd_under_mps_computes_at_once_and_is_the_targets_own_decoding(tiny_models):
    """scripts/gpu-check.sh starts an MPS daemon for this one (skipped without it): both
    workers on cuda:0, each capped at its share, their passes overlapping in time."""
    from amusd_viz.engine.mps import daemon_problem

    if problem := daemon_problem():
        pytest.skip(f"MPS: {problem}")
    runs = {"ar": generate(tiny_models, "ar"), "amusd": generate(tiny_models, "amusd",
                                                                 gpu_share=30)}
    assert_lossless(tiny_models, runs, "cuda:0")
    overlapping = 0
    for _, events in runs["amusd"]:
        check_spans(events)  # per lane: each worker's own passes never overlap
        lanes = {e.role: e.device for e in events if e.type == "forward"}
        assert lanes == {"target": "cuda:0 [mps 70%]", "draft": "cuda:0 [mps 30%]"}
        spans = {role: [(e.t, e.t + e.dur) for e in events if e.type == "forward" and
                        e.role == role] for role in lanes}
        overlapping += sum(1 for a, b in spans["target"] for c, d in spans["draft"]
                           if a < d and c < b)
    assert overlapping > 0  # the two computed at once, not in turns


def test_a_verify_pass_synchronises_a_few_times_not_per_row(tiny_models):
    """argmax, the top-k of every row and the finite check: one packed host copy
    (Runner.rows_to_host), whatever the number of drafts (before: a copy each, and earlier
    1 + 2(k+1) per pass); the pass's end is also synchronised, to stamp it."""
    from amusd_viz.engine.loading import load_model
    from amusd_viz.engine.passes import Verifier
    from amusd_viz.engine.request import Request

    target = load_model(str(tiny_models["target"]), "float32", "cuda:0", pack=False)
    req = Request([5, 6, 7], 20, 8, frozenset(), 0)
    target.begin()
    verifier = Verifier(req, target, "cuda:0", lambda e: None)
    target.forward(verifier.c.seq, 1)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            verifier.check([9] * 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 2, [str(w.message) for w in syncs]
