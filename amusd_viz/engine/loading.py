"""A model loaded onto its device, wrapped in the runner that feeds it (dynamic KV cache, static
lines, or CUDA graphs over them), warmed up on the shapes a run uses, and its passes timed."""

from __future__ import annotations

import time

WARM_UP_TOKENS = 16  # warm-up prompt length: enough to build the kernels a run will use


def load_model(src: str, dtype_name: str, device: str, tokenizer=None, quant: str = "none",
          pack: bool = True, preamble: tuple[int, ...] = (), kv_cache: str = "dynamic",
          cuda_graphs: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quant == "int8":
        # Only ever the draft: it changes which tokens are proposed, never which are committed.
        # On a CPU core, int8 matrix-vector products move a quarter of float32's bytes.
        import warnings

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                           dtype=torch.qint8)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, **load_kwargs(dtype_name, device))
    model.to(device).eval()  # already there on a GPU
    if pack and quant == "none" and device == "cpu":
        from amusd_viz.engine.kernels import pack_linears

        pack_linears(model)  # same outputs, 1.5-1.75x faster bf16 passes on a CPU core
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(src)
    runner = _make_runner(model, device, tokenizer, kv_cache, cuda_graphs)
    warm_up(runner)
    runner.set_preamble(list(preamble))
    return runner


def _make_runner(model, device: str, tokenizer, kv_cache: str, cuda_graphs: bool):
    """The dynamic cache, the static one, or (on a GPU, static) CUDA graphs per pass size,
    captured and checked now, before the warm-up times the passes a run makes."""
    from amusd_viz.engine.runner import Runner
    from amusd_viz.engine.static_runner import StaticRunner

    if kv_cache != "static":
        return Runner(model, device, tokenizer)
    if not (cuda_graphs and device.startswith("cuda")):
        return StaticRunner(model, device, tokenizer)
    from amusd_viz.engine.graphs import GraphRunner

    runner = GraphRunner(model, device, tokenizer)
    runner.graph_report = runner.capture()
    return runner


def load_kwargs(dtype_name: str, device: str) -> dict:
    """from_pretrained's arguments: on a GPU the weights load straight onto it (accelerate's
    device_map), not through host memory on one CPU thread first."""
    import torch

    kwargs: dict = {"dtype": getattr(torch, dtype_name)}
    if device.startswith("cuda"):
        kwargs["device_map"] = device
    return kwargs


def warm_up(runner) -> None:
    """The first passes page the weights in and pick the kernels: that is loading work, and
    left in it would land in the first run's timings. On a GPU each new pass size loads kernels
    of its own the first time (0.4-1.2 s each on an H100: docs/benchmarks.md, "GPU check"), so
    there every size up to passes.TREE_TOKENS (each pass's top-k read with it) and a tree pass run
    before the passes are timed. On a CPU only the first pass is dear (the prefill: 2.2 s
    against 0.23 for the next, the bf16 draft here); each later size ran at its own speed the
    first time (1, 4, 9 tokens and a tree pass, bf16 and float32, within 3%), so the timing
    passes are the rest of the warm-up: 6 s less to load the float32 target on this host."""
    from amusd_viz.engine.passes import TREE_TOKENS

    warm = list(range(WARM_UP_TOKENS))
    runner.reset()
    runner.forward(warm, 1)  # prefill
    if str(runner.device).startswith("cuda"):
        for n_logits in range(1, TREE_TOKENS + 1):
            warm = [*warm, len(warm)]
            runner.forward(warm, n_logits)  # its top-k read included (Runner.read)
        runner.forward(warm, 3, paths=[(len(warm) - 2, [5, 6])])  # a tree pass
    runner.cost = pass_cost(runner, warm)
    runner.reset()


def pass_cost(runner, seq: list[int], wide: int = 9):
    """Time a one-token pass and a `wide`-token one over `seq`, warm (the best of three where
    a pass is quick, as a tiny model's is: one sample there is mostly the host's noise)."""
    from amusd_viz.engine.estimate import PassCost

    def best(n_logits: int) -> float:
        times: list[float] = []
        while len(times) < 3 and (not times or times[0] < 0.05):
            start = time.perf_counter()
            runner.forward(seq, n_logits)
            times.append(time.perf_counter() - start)
        return min(times)

    one = best(1)
    return PassCost(one, max(0.0, best(wide) - one) / (wide - 1))
