"""The shared-device and GPU paths, tested on a CPU: capability queries and free memory are
mocked; the same logic runs on a real GPU in tests/test_cuda.py (scripts/gpu-check.sh)."""

from __future__ import annotations

import os

import pytest
import torch

from amusd_viz.bench import Result, compare_with_ar, devices_for, plan_runs
from amusd_viz.config import BenchConfig, RunConfig
from amusd_viz.engine import devices, mps
from amusd_viz.errors import UserError


@pytest.fixture
def old_gpu(monkeypatch):
    """A pre-Ampere card: bf16 only emulated."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))


@pytest.fixture
def new_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


def test_auto_dtype_is_bf16_only_where_the_card_has_it(old_gpu):
    assert devices.resolve_dtype("auto", "cpu") == "bfloat16"
    assert devices.resolve_dtype("auto", "cpu:1") == "bfloat16"
    assert devices.resolve_dtype("auto", "cuda:0") == "float32"  # bf16 would be emulated
    assert devices.resolve_dtype("float16", "cuda:0") == "float16"  # asked for: kept
    problem = devices.gpu_dtype_problem("bfloat16", "cuda:0")
    assert "7.5" in problem and "emulated" in problem and "--dtype float32" in problem
    assert devices.gpu_dtype_problem("float32", "cuda:0") is None


def test_auto_dtype_on_a_modern_card(new_gpu):
    assert devices.resolve_dtype("auto", "cuda:0") == "bfloat16"
    assert devices.gpu_dtype_problem("bfloat16", "cuda:1") is None


def test_resolve_run_keeps_a_dtype_given_without_an_option():
    cfg = devices.resolve_run(RunConfig(strategy="ar", dtype="float32"))
    assert cfg.dtype == "float32"
    cfg = devices.resolve_run(RunConfig(strategy="ar", dtype_option="auto"))
    assert cfg.dtype == "bfloat16"  # a CPU


def test_the_kv_cache_is_static_on_a_gpu_unless_asked():
    assert devices.resolve_kv_cache("auto", "cuda:0") == "static"
    assert devices.resolve_kv_cache("auto", "cpu:0") == "dynamic"
    assert devices.resolve_kv_cache("dynamic", "cuda:1") == "dynamic"
    assert devices.resolve_kv_cache("static", "cpu") == "static"


def test_cuda_graphs_run_wherever_a_model_is_on_a_gpu_over_the_static_cache():
    assert devices.resolve_cuda_graphs("auto", "static", ("cuda:0", "cuda:0"))
    assert devices.resolve_cuda_graphs("auto", "static", ("cpu:0", "cuda:1"))  # the draft's GPU
    assert not devices.resolve_cuda_graphs("auto", "static", ("cpu:0", "cpu:1"))
    assert not devices.resolve_cuda_graphs("auto", "dynamic", ("cuda:0", None))
    assert not devices.resolve_cuda_graphs("off", "static", ("cuda:0", None))
    with pytest.raises(UserError, match="needs a model on a GPU"):
        devices.resolve_cuda_graphs("on", "static", ("cpu", None))
    with pytest.raises(UserError, match="--kv-cache static"):
        devices.resolve_cuda_graphs("on", "dynamic", ("cuda:0", None))
    assert not devices.resolve_run(RunConfig(strategy="amusd")).cuda_graphs  # this CPU


@pytest.fixture
def mps_daemon(tmp_path, monkeypatch):
    """A stand-in for NVIDIA's MPS control tool on PATH and its control pipe: `answer` is the
    exit status it gives."""
    tool, pipes = tmp_path / "bin" / "nvidia-cuda-mps-control", tmp_path / "pipes"
    tool.parent.mkdir()
    pipes.mkdir()
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipes))

    def answer(status: int, running: bool = True):
        tool.write_text(f"#!/bin/sh\ncat >/dev/null\necho 'refused' >&2\nexit {status}\n")
        tool.chmod(0o755)
        if running:
            (pipes / "control").touch()

    return answer


def test_gpu_share_mps_needs_amusd_on_one_gpu_and_a_running_daemon(mps_daemon, monkeypatch):
    assert mps.resolve_share("baton", "amusd", "cuda:0", "cuda:0") is None
    for bad in ("mps", "mps:0", "mps:100", "mps:x", "half"):
        with pytest.raises(UserError, match="use baton, or mps:N"):
            mps.parse_share(bad)
    for strategy, target, draft in (("sync", "cuda:0", "cuda:0"), ("amusd", "cuda:0", "cuda:1"),
                                    ("amusd", "cpu:0", "cpu:0")):
        with pytest.raises(UserError, match="amusd's two workers"):
            mps.resolve_share("mps:30", strategy, target, draft)
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", "/nonexistent")  # no driver tools at all
    with pytest.raises(UserError, match=r"not installed.*silently take turns.*--gpu-share baton"):
        mps.resolve_share("mps:30", "amusd", "cuda:0", "cuda:0")
    monkeypatch.setenv("PATH", path)
    mps_daemon(0, running=False)
    with pytest.raises(UserError, match=r"no MPS daemon is running.*nvidia-cuda-mps-control -d"):
        mps.resolve_share("mps:30", "amusd", "cuda:0", "cuda:0")
    mps_daemon(1)
    with pytest.raises(UserError, match=r"did not answer .exit 1: refused"):
        mps.resolve_share("mps:30", "amusd", "cuda:0", "cuda:0")
    mps_daemon(0)
    assert mps.resolve_share("mps:30", "amusd", "cuda:0", "cuda:0") == 30
    assert (mps.worker_percent("draft", 30), mps.worker_percent("target", 30)) == (30, 70)
    assert mps.label("cuda:0", 30) == "cuda:0 [mps 30%]" and mps.label("cuda:0", None) == "cuda:0"


def test_a_bad_gpu_share_is_one_line_before_anything_loads(capsys):
    from amusd_viz.cli import main

    assert main(["--gpu-share", "mps:150", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--gpu-share 'mps:150'" in err


def test_worker_ready_names_the_graphs_kept_and_those_dropped():
    from amusd_viz.events import WorkerReady

    ready = dict(t=1.0, role="target", device="cuda:0", pid=1, load_s=3.0)
    assert WorkerReady(**ready).graph_note == ""
    kept = WorkerReady(**ready, graphs=[1, 2, 4, 8, 16, 32], graph_s=0.84)
    assert kept.graph_note == "CUDA graphs 1–32 (0.8 s)"
    some = WorkerReady(**ready, graphs=[1, 2], graph_s=0.5,
                       graphs_dropped={"4": "row 0: token 7 where eager picks 9"})
    assert some.graph_note.endswith("eager for 4 (row 0: token 7 where eager picks 9)")
    assert WorkerReady(**ready, graphs=[], graph_s=0.1).graph_note.startswith("CUDA graphs none")


def test_weights_load_straight_onto_a_gpu():
    assert devices_kwargs("cuda:1") == {"dtype": torch.bfloat16, "device_map": "cuda:1"}
    assert devices_kwargs("cpu") == {"dtype": torch.bfloat16}


def devices_kwargs(device):
    from amusd_viz.engine.loading import load_kwargs

    return load_kwargs("bfloat16", device)


def test_model_bytes_scale_with_the_dtype(tiny_models):
    on_disk = sum(f.stat().st_size for f in tiny_models["target"].glob("*.safetensors"))
    # the tiny models are stored in float32
    assert devices.model_bytes(str(tiny_models["target"]), "float32") == on_disk
    assert devices.model_bytes(str(tiny_models["target"]), "bfloat16") == on_disk // 2


def test_two_models_that_do_not_fit_one_gpu_stop_before_loading(tiny_models, monkeypatch):
    target, draft = str(tiny_models["target"]), str(tiny_models["draft_far"])
    need = int((devices.model_bytes(target, "float32") + devices.model_bytes(draft, "float32"))
               * devices.MEMORY_HEADROOM)
    free = {"cuda:0": need - 1, "cuda:1": need}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[str(d)], 80 * 2 ** 30))
    with pytest.raises(UserError, match=r"cuda:0 has .* GiB free .*--draft-device cuda:1"):
        devices.check_gpu_memory([(target, "cuda:0"), (draft, "cuda:0")], "float32")
    devices.check_gpu_memory([(target, "cuda:1"), (draft, "cuda:1")], "float32")  # fits
    devices.check_gpu_memory([(target, "cuda:0"), (draft, "cpu")], "bfloat16")  # half each

    def no_torch_for_cpus(d):
        raise AssertionError("CPU placements must not query CUDA")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_torch_for_cpus)
    devices.check_gpu_memory([(target, "cpu:0"), (draft, "cpu:1")], "float32")


def test_the_engine_checks_memory_before_starting_workers(tiny_models, monkeypatch):
    from amusd_viz.engine.session import Engine, EngineConfig
    from amusd_viz.events import EventList

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (1024, 2 ** 30))
    engine = Engine(EngineConfig("amusd", str(tiny_models["target"]),
                                 str(tiny_models["draft_far"]), "cuda:0", "cuda:0", "float32"),
                    EventList())
    with pytest.raises(UserError, match="GiB free"):
        engine.start()
    assert engine.workers == {}  # nothing was started


def test_bench_uses_the_devices_it_is_given_and_runs_each_setup_once(capsys):
    assert devices_for("two", 0, [0, 1]) == ("cpu:0", "cpu:1")
    assert devices_for("two", 0, [0, 1], "cpu:1", "cpu:0") == ("cpu:1", "cpu:0")
    assert devices_for("all", 2, [0, 1], "cuda:1") == ("cuda:1", "cuda:1")
    assert devices_for("two", 2, [0, 1]) == ("cuda:0", "cuda:1")
    everything = ("ar", "ar-1dev", "sync", "sync-1dev", "sync-2dev", "amusd", "amusd-1dev")
    one_gpu = plan_runs(BenchConfig(run=RunConfig(), strategies=everything), 1, [0, 1])
    assert [r.label for r in one_gpu.runs] == ["ar", "sync", "amusd"]
    err = capsys.readouterr().err
    assert "ar-1dev runs exactly as ar here" in err and "sync-2dev runs exactly as sync" in err
    two_gpus = plan_runs(BenchConfig(run=RunConfig(), strategies=everything), 2, [0, 1])
    assert [r.label for r in two_gpus.runs] == ["ar", "sync", "sync-2dev", "amusd", "amusd-1dev"]
    cpu = plan_runs(BenchConfig(run=RunConfig(), strategies=everything), 0, [0, 1])
    assert [r.label for r in cpu.runs] == list(everything)


def test_float32_on_cuda_allows_a_near_tie_but_not_on_a_cpu():
    top = [[{"id": 1, "logit": 20.0}, {"id": 2, "logit": 20.0 - 1e-4}]]
    rows = [Result("ar", "p", "code", 0, 1, 0.1, 100.0, [1], tops=top),
            Result("sync", "p", "code", 0, 1, 0.1, 100.0, [2])]
    assert compare_with_ar(rows, "float32", device="cuda:0")[0]["verdict"] == "near-tie"
    assert compare_with_ar(rows, "float32", device="cpu")[0]["verdict"] == "differs"


def test_the_bench_flags_runs_that_lost_their_draft():
    import io

    from rich.console import Console

    from amusd_viz.bench import summarize
    from amusd_viz.bench_report import print_report

    rows = [Result("ar", "p", "code", 0, 1, 0.1, 100.0, [1]),
            Result("amusd", "p", "code", 0, 1, 0.1, 90.0, [1], draft_lost=True)]
    s = summarize(rows, ["ar", "amusd"])
    assert s["overall"]["amusd"]["draft_lost_runs"] == 1
    out = io.StringIO()
    print_report({"summary": s["overall"], "by_kind": s["by_kind"], "lossless": [],
                  "settings": {"dtype": "bfloat16"}}, Console(file=out, width=140))
    assert "amusd: the draft worker died in 1 of 1 runs" in out.getvalue()


# the runner: batched tops, non-finite logits, warm-up shapes ---------------------------------


@pytest.fixture(scope="module")
def runner(tiny_models):
    from amusd_viz.engine.loading import load_model

    return load_model(str(tiny_models["target"]), "float32", "cpu", pack=False)


def test_batched_tops_equal_one_row_at_a_time(runner):
    runner.begin()
    logits, *_ = runner.forward([5, 6, 7, 8, 9, 10], 4)
    batched = runner.read.tops  # what the pass's one host copy read
    assert runner.read.argmax == logits.argmax(-1).tolist()
    for row, top in zip(logits, batched, strict=True):
        probs = torch.softmax(row, -1)
        p, idx = torch.topk(probs, runner.top_k)
        assert [c["id"] for c in top] == idx.tolist()
        assert [c["p"] for c in top] == [round(x, 4) for x in p.tolist()]
        assert [c["logit"] for c in top] == [round(x, 5) for x in row[idx].tolist()]


def test_non_finite_logits_fail_the_pass_with_a_clear_error(runner, monkeypatch):
    from amusd_viz.engine.runner import NonFiniteLogits

    real = runner.model.forward

    def overflowing(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logits[..., 3] = float("nan")
        return out

    monkeypatch.setattr(runner.model, "forward", overflowing)
    runner.begin()
    with pytest.raises(NonFiniteLogits, match="--dtype bfloat16 or --dtype float32"):
        runner.forward([5, 6, 7], 1)
    # the pass filled the cache: the runner says so, or its next passes would attend to
    # keys it does not know it holds (a tree pass's mask then no longer fits)
    assert runner.cache.get_seq_length() == len(runner.ids) == 3

    def one_bad_logit(*args, **kwargs):  # one logit of the first of several rows
        out = real(*args, **kwargs)
        out.logits[0, 0, 3] = float("inf")
        return out

    monkeypatch.setattr(runner.model, "forward", one_bad_logit)
    with pytest.raises(NonFiniteLogits):
        runner.forward([5, 6, 7, 8, 9], 3)


@pytest.mark.parametrize("side", ["verify", "draft"])
def test_a_pass_reads_the_host_once(runner, monkeypatch, side):
    """A greedy pass's finite check, argmax and top candidates come to the host in one copy
    (Runner.rows_to_host): on a GPU each read is a synchronisation (tests/test_cuda.py counts
    those). Here: the conversions of tensors to Python values, one (the packed copy's tolist)
    whatever the number of drafts, or of a draft pass's rows (its step and a sibling's)."""
    from amusd_viz.engine.passes import Drafter, Verifier, sampler_for
    from amusd_viz.engine.request import Request

    req = Request([5, 6, 7], 20, 8, frozenset(), 0)
    runner.begin()
    verifier = Verifier(req, runner, "cpu", lambda e: None)
    drafter = Drafter(req, runner, sampler_for(req, runner), "cpu", lambda e: None)
    verifier.first_token()
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _name=name, _real=real, **k:
                            (reads.append(_name), _real(self, *a, **k))[1])
    if side == "verify":
        assert verifier.check([9] * 8) < 8
    else:
        steps = drafter.steps([5, 6, 7], sibling=11)
        assert steps and steps[0].beside is not None and steps[0].top
    monkeypatch.undo()
    assert reads == ["tolist"], reads


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_warm_up_runs_every_shape_a_run_uses(runner, monkeypatch, device):
    """On a GPU every pass size up to passes.TREE_TOKENS and a tree pass (each loads kernels of
    its own the first time); on a CPU the prefill, then only the passes that time the model
    (one token and nine). The passes run on this CPU, the runner only says it is on `device`."""
    from amusd_viz.engine.loading import warm_up
    from amusd_viz.engine.passes import TREE_TOKENS

    calls = []
    forward = runner.forward

    def spy(seq, n_logits=1, paths=()):
        before = len(runner.ids)
        monkeypatch.setattr(runner, "device", "cpu")
        out = forward(seq, n_logits, paths=paths)
        monkeypatch.setattr(runner, "device", device)
        calls.append((len(seq) - min(before, len(seq) - n_logits), n_logits, len(paths)))
        return out

    monkeypatch.setattr(runner, "forward", spy)
    monkeypatch.setattr(runner, "device", device)
    warm_up(runner)
    fed = [n for n, _, _ in calls]
    logits = {n for _, n, paths in calls if not paths}
    assert fed[0] >= 16 and 1 in fed  # a prefill and a one-token decode
    if device == "cpu":
        assert logits == {1, 9} and not any(paths for _, _, paths in calls)
    else:
        assert set(range(1, TREE_TOKENS + 1)) <= logits
        assert any(paths for _, _, paths in calls)  # a tree pass, bets beside the drafts
    assert runner.cost.one_s > 0  # the passes were timed
    assert runner.ids == []  # and the cache is left empty


def test_sync_takes_a_device_per_model_only_where_asked_and_they_do_not_overlap():
    """`--strategy sync` keeps the draft beside the target unless --draft-device is given; then
    each model needs a core (or a GPU) of its own (sync-2dev, the paper's baseline)."""
    def resolved(**options):
        cfg = devices.resolve_run(RunConfig(strategy="sync", **options))
        return cfg.target_device, cfg.draft_device

    assert resolved() == ("cpu", "cpu")
    assert resolved(target_device_option="cpu:0") == ("cpu:0", "cpu:0")
    assert resolved(target_device_option="cpu:0", draft_device_option="cpu:1") == ("cpu:0", "cpu:1")
    assert resolved(draft="ngram", target_device_option="cpu:0",
                    draft_device_option="cpu:1") == ("cpu:0", "cpu:0")  # a lookup needs no core
    with pytest.raises(UserError, match="--target-device cpu:0 --draft-device cpu:1"):
        resolved(draft_device_option="cpu:1")  # the target on all cores would share core 1
    with pytest.raises(UserError, match="overlap or mix kinds"):
        devices.check_device_pair("cuda:0", "cpu:1")


def test_on_core_moves_the_calling_thread_only_to_that_core():
    import os
    import threading

    before = os.sched_getaffinity(0)
    seen = {}

    def work():
        with devices.on_core(min(before)):
            seen["inside"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen["inside"] == {min(before)}
    assert os.sched_getaffinity(0) == before  # the test's own thread kept its cores
