"""The measuring half of scripts/gpu-check.sh: on each CUDA device, forward times per shape
(cold and warm), then ar, sync and amusd through the real engine, with load time, host RSS and
GPU memory per worker. Writes gpu-report.json and gpu-report.md into --out.

The default pair cannot travel to a GPU machine without network (1.6 GB), so the models are
random-weight Qwen2 models with the default pair's shapes (0.5B draft, 1.5B target, full
vocabulary): timings are real, the text is noise, and a random draft is almost never accepted
(the worst case for speculation). Pass --target/--draft to use real checkpoints where present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SHAPES = {  # the default pair's shapes (Qwen2.5-Coder 0.5B / 1.5B)
    "draft-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2),
    "target-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2),
}
VOCAB = 151936
MISSION_SHAPES = {  # `--draft tinyllama --target llama-7b`: TinyLlama-1.1B and Llama-2-7B
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
}
# The agreeing pair: the target's layers past DRAFT_LAYERS add AGREE_SCALE of their random output
# to the residual stream, and the draft is the target's first DRAFT_LAYERS layers (a layer-skip
# draft), so the draft's greedy token is the target's ~80% of the time (measured on CPU in
# float32: scale 0.03 agreed on 90% of 40 positions, 0.05 on 62%; in bf16 `sync` accepted 71% of
# its drafts at 0.04).
DRAFT_LAYERS, AGREE_SCALE = 4, 0.03
PASS_TOKENS = (1, 2, 4, 9, 16)  # decode, verify passes of lookahead 1, 3, 8, 15


def make_shaped_model(path: Path, shape: dict, seed: int) -> Path:
    from tiny import make_tokenizer
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=32768, tie_word_embeddings=True,
                         bos_token_id=2, eos_token_id=1, pad_token_id=0, **shape)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0, bos_token_id=2)
    model.save_pretrained(path)
    make_tokenizer(VOCAB).save_pretrained(path)
    return path


def make_agreeing_pair(path: Path) -> tuple[str, str]:
    """A target of the default target's shape whose late layers barely move its output, and a
    draft of its first layers: random weights, but drafts the target mostly accepts, so the
    timings include what speculation wins, not only what it costs."""
    from tiny import make_tokenizer
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    target, draft = path / "target", path / "draft"
    if (target / "config.json").is_file() and (draft / "config.json").is_file():
        return str(target), str(draft)
    common = dict(vocab_size=VOCAB, max_position_embeddings=32768, tie_word_embeddings=True,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(3)
    shape = SHAPES["target-1.5b"]
    big = AutoModelForCausalLM.from_config(Qwen2Config(**common, **shape), dtype=torch.bfloat16)
    small = AutoModelForCausalLM.from_config(
        Qwen2Config(**common, **{**shape, "num_hidden_layers": DRAFT_LAYERS}), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, weight in big.state_dict().items():
            if ("o_proj" in name or "down_proj" in name) and int(name.split(".")[2]) >= DRAFT_LAYERS:
                weight.mul_(AGREE_SCALE)
        small.load_state_dict({k: v for k, v in big.state_dict().items() if k in small.state_dict()})
    for model, where in ((big, target), (small, draft)):
        model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0, bos_token_id=2)
        model.save_pretrained(where)
        make_tokenizer(VOCAB).save_pretrained(where)
    return str(target), str(draft)


def forward_times(src, device: str, dtype: str) -> dict:
    """Milliseconds per forward pass of each size, eager and graphed: the first (cold) and the
    median of 10, and the weights' GB/s at the warm time (against the card's bandwidth).
    `src`: a checkpoint's path, or a model already on `device`."""
    from transformers import AutoModelForCausalLM

    from amusd_viz.engine.graphs import GraphRunner
    from amusd_viz.engine.runner import Runner

    model = src if isinstance(src, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(
        src, dtype=getattr(torch, dtype), device_map=device).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    graphed = GraphRunner(model, device)
    report = graphed.capture()
    out: dict = {"capture_s": round(report.seconds, 2), "graphs": report.kept,
                 "dropped": {str(k): v for k, v in report.dropped.items()},
                 "weights_gb": round(weights / 1e9, 3)}
    for name, runner in (("eager", Runner(model, device)), ("graphed", graphed)):
        for n in PASS_TOKENS:
            times = out[f"{n} tokens {name}"] = _pass_times(runner, n)
            times["gb_s"] = round(weights / 1e6 / times["warm_ms"], 1)
    del model, graphed
    torch.cuda.empty_cache()
    return out


def mission_shapes(device: str, dtype: str) -> dict:
    """The mission's pair (TinyLlama-1.1B draft, Llama-2-7B target), random weights built on the
    card from their configs (no download): forward times per pass size, eager and graphed."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = {}
    for name, shape in MISSION_SHAPES.items():
        torch.manual_seed(4)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32000, **shape),
                                                     dtype=getattr(torch, dtype)).eval()
        out[name] = forward_times(model, device, dtype)
        print(f"forward {name}: {out[name]}", flush=True)
        del model
        torch.cuda.empty_cache()
    return out


def _pass_times(runner, n: int) -> dict:
    """The first (cold) and the median of 10 more passes of n tokens after a 192-token prompt."""
    prompt = list(range(3, 99)) * 2
    times = []
    for _ in range(11):
        runner.reset()
        runner.forward(prompt, 1)
        start = time.perf_counter()
        runner.forward(prompt + list(range(5, 5 + n)), n)
        times.append(1000 * (time.perf_counter() - start))
    return {"cold_ms": round(times[0], 3), "warm_ms": round(statistics.median(times[1:]), 3)}


def engine_run(strategy: str, target: str, draft: str, devices: tuple[str, str], dtype: str,
               max_new: int, adaptive: bool = True, kv_cache: str = "graphs",
               gpu_share: int | None = None) -> dict:
    """kv_cache: "graphs" (static lines and CUDA graphs: the GPU default), "static", "dynamic";
    gpu_share: amusd's draft's percent of one GPU under MPS (engine/mps.py)."""
    import psutil

    from amusd_viz import stats
    from amusd_viz.engine.session import Engine, EngineConfig
    from amusd_viz.events import EventList

    sink = EventList()
    cfg = EngineConfig(strategy=strategy, target_src=target,
                       draft_src=None if strategy == "ar" else draft,
                       target_device=devices[0], draft_device=devices[1], dtype=dtype,
                       adaptive=adaptive, kv_cache="dynamic" if kv_cache == "dynamic" else "static",
                       cuda_graphs=kv_cache == "graphs", gpu_share=gpu_share)
    with Engine(cfg, sink) as engine:
        start = time.perf_counter()
        engine.start()
        engine.wait_ready()
        load_s = time.perf_counter() - start
        graphs = {e.role: e.graph_note for e in sink.events if e.type == "worker_ready"}
        rss = {role: round(psutil.Process(pid).memory_info().rss / 2 ** 30, 2)
               for role, pid in engine.pids().items()}
        gpu = {f"cuda:{i}": round(torch.cuda.mem_get_info(i)[1] / 2 ** 30
                                  - torch.cuda.mem_get_info(i)[0] / 2 ** 30, 2)
               for i in range(torch.cuda.device_count())}
        prompt = list(range(3, 60))
        engine.generate(prompt, 16, 8, frozenset())  # untimed warm-up, as the bench does
        rows = []
        for i in range(3):
            sink.events = []
            gen = engine.generate(prompt[i:], max_new, 8, frozenset())
            s = stats.compute([*sink.events])
            verifies = [e for e in sink.events if e.type == "verify_result"]
            rows.append({"ms_per_token": 1000 * gen.wall_s / max(1, len(gen.token_ids)),
                         "tokens": list(gen.token_ids),
                         "tokens_per_pass": (round(sum(len(e.committed) for e in verifies)
                                                   / len(verifies), 3) if verifies else None),
                         "acceptance": (round(sum(e.accepted for e in verifies)
                                              / max(1, sum(len(e.proposed) for e in verifies)), 3)
                                        if verifies else None),
                         "drafts_per_verify": _drafts_per_verify(sink.events),
                         "pass_ms": _pass_ms(sink.events),
                         "overlap": s.overlap, "busy": s.busy})
    share = f" mps:{gpu_share}" if gpu_share else ""
    return {"strategy": strategy + share + ("" if adaptive else " (fixed 8)"),
            "devices": list(devices),
            "kv_cache": kv_cache, "graphs": graphs,
            "load_s": round(load_s, 2),
            "host_rss_gib": rss, "gpu_used_gib": gpu,
            "median_ms_per_token": round(statistics.median(r["ms_per_token"] for r in rows), 3),
            "ms_per_token_runs": [round(r["ms_per_token"], 3) for r in rows],
            "tokens_per_pass": rows[-1]["tokens_per_pass"], "acceptance": rows[-1]["acceptance"],
            "tokens": rows[-1]["tokens"],
            "drafts_per_verify": rows[-1]["drafts_per_verify"], "overlap": rows[-1]["overlap"],
            "pass_ms": rows[-1]["pass_ms"],
            "busy": rows[-1]["busy"]}


def _pass_ms(events) -> dict:
    """Each role's median forward pass (ms): under MPS against the baton's, the slowdown that
    sharing the card costs each model."""
    by_role: dict[str, list[float]] = {}
    for e in events:
        if e.type == "forward" and e.phase != "prefill":
            by_role.setdefault(e.role, []).append(1000 * e.dur)
    return {role: round(statistics.median(ms), 3) for role, ms in by_role.items()}


def _drafts_per_verify(events) -> float | None:
    verifies = [e for e in events if e.type == "verify_result"]
    return round(sum(len(e.proposed) for e in verifies) / len(verifies), 3) if verifies else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    parser.add_argument("--models", type=Path, default=Path("/tmp/amusd-gpu-models"))
    parser.add_argument("--target"), parser.add_argument("--draft")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--section", choices=("main", "mps", "mission"), default="main",
                        help="main: forward times and every strategy's runs; mps: amusd on one "
                             "GPU under an MPS daemon the caller started; mission: forward "
                             "times of the mission's shapes. Each adds to gpu-report.json.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    if not gpus:
        print("gpu_report: no CUDA GPU here; nothing to measure.", file=sys.stderr)
        return 1
    path = args.out / "gpu-report.json"
    report: dict = json.loads(path.read_text()) if path.is_file() else {}
    report.update({"gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
                   "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": args.dtype})
    report.setdefault("forward", {})
    report.setdefault("runs", [])
    if args.section == "mission":
        report["forward"].update(mission_shapes("cuda:0", args.dtype))
        path.write_text(json.dumps(report, indent=2))
    else:
        run_section(args, report, path, gpus)
    write_markdown(report, args.out / "gpu-report.md")
    return 0


def run_section(args, report: dict, path: Path, gpus: int) -> None:
    """The forward times and every strategy's runs (main), or amusd under MPS (mps)."""
    from amusd_viz.engine.mps import daemon_problem

    target = args.target or str(make_shaped_model(args.models / "target", SHAPES["target-1.5b"], 1))
    draft = args.draft or str(make_shaped_model(args.models / "draft", SHAPES["draft-0.5b"], 2))
    agreeing = None if args.target else make_agreeing_pair(args.models / "agreeing")
    one_gpu = ("cuda:0", "cuda:0")
    if args.section == "mps":
        if problem := daemon_problem():
            report["mps"] = f"not run: {problem}"
            print(f"gpu_report: MPS {report['mps']}", flush=True)
            path.write_text(json.dumps(report, indent=2))
            return
        runs = [("random", target, draft, "amusd", one_gpu, True, "graphs", share)
                for share in MPS_SHARES]
        if agreeing:
            runs += [("agreeing", *agreeing, "amusd", one_gpu, adaptive, "graphs", share)
                     for share in MPS_SHARES for adaptive in (True, False)]
    else:
        for name, src in (("target", target), ("draft", draft)):
            report["forward"][name] = forward_times(src, "cuda:0", args.dtype)
            print(f"forward {name}: {report['forward'][name]}", flush=True)
        runs = main_runs(target, draft, agreeing, gpus)
    for pair, target_src, draft_src, strategy, devices, adaptive, kv_cache, share in runs:
        row = {"pair": pair, **engine_run(strategy, target_src, draft_src, devices, args.dtype,
                                          args.max_new_tokens, adaptive, kv_cache, share)}
        report["runs"].append(row)
        path.write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)


MPS_SHARES = (30,)  # the draft's percent of the SMs; the target gets the rest


def main_runs(target: str, draft: str, agreeing: tuple[str, str] | None, gpus: int) -> list:
    """ar, sync and amusd (the baton) on one GPU, amusd on two where there are; static lines
    with CUDA graphs (the GPU's default), ar also without graphs and on the dynamic cache; the
    agreeing pair also at a fixed lookahead (a random draft's flat distributions stop the
    adaptive one early)."""
    setups = [("ar", ("cuda:0", "cuda:0")), ("sync", ("cuda:0", "cuda:0")),
              ("amusd", ("cuda:0", "cuda:0"))]
    if gpus > 1:
        setups.append(("amusd", ("cuda:0", "cuda:1")))
    runs = [("random", target, draft, strategy, devices, True, "graphs", None)
            for strategy, devices in setups]
    runs += [("random", target, draft, "ar", ("cuda:0", "cuda:0"), True, kv, None)
             for kv in ("static", "dynamic")]
    if agreeing:
        runs += [("agreeing", *agreeing, strategy, devices, adaptive, "graphs", None)
                 for strategy, devices in setups for adaptive in (True, False)
                 if adaptive or strategy != "ar"]
    return runs


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# GPU check: {', '.join(report['gpus'])}, torch {report['torch']}, CUDA "
             f"{report['cuda']}, {report['dtype']}", "",
             "| model | pass | cold ms | warm ms | weights GB/s |", "|---|---|---|---|---|"]
    for name, shapes in report["forward"].items():
        lines += [f"| {name} | {k} | {v['cold_ms']} | {v['warm_ms']} | {v.get('gb_s', '')} |"
                  for k, v in shapes.items() if isinstance(v, dict) and "cold_ms" in v]
        lines.append(f"| {name} | graphs {shapes['graphs']}, dropped {shapes['dropped']} | "
                     f"capture {shapes['capture_s']} s | | {shapes.get('weights_gb', '')} GB |")
    if "mps" in report:
        lines += ["", f"MPS: {report['mps']}"]
    lines += ["", "| pair | strategy | devices | KV cache | ms/token | tokens/pass | acceptance "
              "| drafts/verify | both busy | pass ms | load s | RSS GiB | GPU GiB used |",
              "|---" * 13 + "|"]
    lines += [f"| {r['pair']} | {r['strategy']} | {'/'.join(r['devices'])} | {r['kv_cache']} | "
              f"{r['median_ms_per_token']} | {r['tokens_per_pass']} | {r['acceptance']} | "
              f"{r['drafts_per_verify']} | {r['overlap']} | {r.get('pass_ms')} | {r['load_s']} | "
              f"{r['host_rss_gib']} | {r['gpu_used_gib']} |" for r in report["runs"]]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
