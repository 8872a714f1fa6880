"""A model worker: one OS process on one device. Loads its model(s) once, then serves
generation requests, sending events and control messages through its own pipe.

Nothing heavy is imported at module level: the process pins itself to its device first, so torch
starts with the right thread count.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import time
import traceback
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent dies


@dataclass(frozen=True)
class WorkerSpec:
    role: str  # "target" or "draft" (the sync worker is a "target" that also holds the draft)
    strategy: str  # ar | sync | amusd
    device: str
    dtype: str
    target_src: str | None
    draft_src: str | None
    t0_ns: int
    # tests only: "die_after:N" exits after N forward passes; "slow:S", "dear" (worker.py)
    fault: str = ""
    draft_quant: str = "none"  # "int8": dynamic int8 linear layers for the draft (CPU only)
    preamble: tuple[int, ...] = ()  # the tokens every prompt starts with: fed at load time
    tokenizer_src: str | None = None  # the n-gram drafter's worker: the target's tokenizer
    borrow_core: int | None = None  # amusd's target: the draft's CPU core it may borrow (lending.py)
    draft_device: str | None = None  # sync on two devices: the draft's own (devices.check_device_pair)
    kv_cache: str = "dynamic"  # "static": preallocated KV lines (engine/static_runner.py)
    cuda_graphs: bool = False  # with the static cache, on a GPU: engine/graphs.py
    mps_percent: int | None = None  # under MPS: this worker's percent of the GPU (engine/mps.py)


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the coordinator dies, so no orphan survives it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # pragma: no cover - not Linux
        pass


def worker_main(spec: WorkerSpec, requests, events, shared=None, schedule=None) -> None:
    """`events` is this worker's own pipe to the coordinator; amusd's workers also get the
    shared state and the schedule (engine/shared.py, engine/schedule.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator owns Ctrl+C
    _die_with_parent()
    try:
        from amusd_viz.engine.devices import enter_device, enter_two_devices, parse_device
        from amusd_viz.engine.messages import Done, Ready
        from amusd_viz.engine.mps import enter_share, label

        enter_share(spec.mps_percent)  # before this process's first CUDA call
        device = parse_device(spec.device)
        draft_device = parse_device(spec.draft_device) if spec.draft_device else device
        if draft_device != device:
            enter_two_devices(device, draft_device)
        else:
            enter_device(device, borrow=spec.borrow_core)
        from transformers.utils import logging as hf_logging

        # Workers share the user's terminal: transformers' loading bars would draw over the
        # TUI. Failures still reach the coordinator through the pipe.
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        target, draft = _load_models(spec, (device, draft_device), schedule, events)
        _slow_down(spec, target if spec.role == "target" else draft)
        events.send(Ready(spec.role))
        emit = _fault_injector(spec, events.send)
        labels = (label(str(device), spec.mps_percent), label(str(draft_device), spec.mps_percent))
        while (msg := requests.get()) is not None:
            result = _serve(spec, msg.request, (target, draft), labels, (shared, schedule), emit)
            events.send(Done(spec.role, msg.run_id, result))
    except Exception as exc:
        from amusd_viz.engine.messages import Failed

        events.send(Failed(spec.role, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1) from None


def _load_models(spec: WorkerSpec, devices, schedule, events):
    """Load this worker's model(s) on their devices (target's, draft's), warm them up, and
    report each as ready."""
    from amusd_viz.config import parse_ngram
    from amusd_viz.engine.loading import load_model

    device, draft_device = devices
    start = time.perf_counter_ns()
    target = draft = None
    # transformers' own generate is the baseline users would otherwise run: stock layers, the
    # whole prompt fed every time (a pre-filled cache also derails its assisted generation in
    # transformers 5.24: it repeats tokens)
    stock = spec.strategy in ("hf-generate", "hf-assisted")
    preamble = () if stock else spec.preamble
    cache: dict = {} if stock else {"kv_cache": spec.kv_cache, "cuda_graphs": spec.cuda_graphs}
    if spec.target_src:
        target = load_model(spec.target_src, spec.dtype, device.torch_device, pack=not stock,
                       preamble=preamble, **cache)
    if spec.draft_src and (n := parse_ngram(spec.draft_src)):
        from amusd_viz.engine.ngram import load_ngram

        draft = load_ngram(n, spec.target_src or spec.tokenizer_src or "", device.torch_device,
                           target.tokenizer if target else None)
    elif spec.draft_src:
        draft = load_model(spec.draft_src, spec.dtype, draft_device.torch_device,
                      target.tokenizer if target else None, spec.draft_quant,
                      pack=not stock, preamble=preamble, **cache)
    _assign_turns((target, draft), devices, schedule)
    _make_dear(spec, (target, draft))
    _report_ready(spec, (target, draft), devices, start, events)
    return target, draft


def _report_ready(spec: WorkerSpec, runners, devices, start: int, events) -> None:
    """One worker_ready per model: load time, device, pass cost and CUDA graphs."""
    from amusd_viz.engine.devices import device_info
    from amusd_viz.engine.mps import label
    from amusd_viz.events import WorkerReady

    now = time.perf_counter_ns()
    for role, runner, on in zip(("target", "draft"), runners, devices, strict=True):
        if runner is not None:
            cost = runner.cost if runner.cost.one_s > 0 else None
            graphs = getattr(runner, "graph_report", None)
            events.send(WorkerReady(t=(now - spec.t0_ns) / 1e9, role=role,
                                    device=label(str(on), spec.mps_percent),
                                    pid=os.getpid(), load_s=(now - start) / 1e9,
                                    device_info=device_info(on),
                                    pass_s=cost.one_s if cost else None,
                                    extra_token=cost.extra if cost else None,
                                    **(graphs.as_fields() if graphs else {})))


def _assign_turns(models, devices, schedule) -> None:
    """What each model's passes wait for or move to: the baton on a shared device, or (sync on
    two CPU cores in one process) the model's own core."""
    from amusd_viz.engine.devices import on_core

    for runner in models:
        if runner is not None and schedule is not None and not runner.phase_name:
            runner.turn = schedule.device_turn  # a shared device; a lookup needs no turn
    (target, draft), (device, draft_device) = models, devices
    if target and draft and draft_device != device and draft_device.kind == "cpu":
        target.turn = functools.partial(on_core, device.index or 0)
        draft.turn = functools.partial(on_core, draft_device.index or 0)


def _serve(spec: WorkerSpec, req, models, devices: tuple[str, str], link, emit):
    """One generation request, by this worker's strategy and role (`models`: target, draft;
    `devices`: theirs; `link`: amusd's shared state and schedule)."""
    from amusd_viz.engine import hf, loops

    (target, draft), device, (shared, schedule) = models, devices[0], link
    match spec.strategy, spec.role:
        case "ar", _:
            return loops.ar_loop(req, target, device, emit)
        case ("hf-generate" | "hf-assisted"), _:
            return hf.hf_loop(req, target, draft, device, emit)
        case "sync", _:
            return loops.sync_loop(req, target, draft, devices, emit)
        case "amusd", "target":
            return loops.amusd_target_loop(req, target, device, shared, schedule, emit)
        case "amusd", "draft":
            return loops.amusd_draft_loop(req, draft, device, shared, schedule, emit)
    raise ValueError(f"no loop for strategy {spec.strategy!r} as {spec.role}")


def _slow_down(spec: WorkerSpec, runner) -> None:
    """Tests: "slow:S" adds S seconds to each forward pass of this worker's model, so that a
    tiny draft gets ahead of a tiny target as a real one does (both otherwise take ~1 ms)."""
    if runner is None or not spec.fault.startswith("slow:"):
        return
    delay = float(spec.fault.split(":", 1)[1])

    base: type = type(runner)

    class Slow(base):  # a class, not a patched method: forks stay slow, on their own cache
        def forward(self, *args, **kwargs):
            time.sleep(delay)
            return super().forward(*args, **kwargs)

    runner.__class__ = Slow


def _make_dear(spec: WorkerSpec, runners) -> None:
    """Tests: "dear" gives this worker's models the pass cost of an AVX2-only CPU, where each
    extra token in a pass costs a whole pass (estimate.PassCost), whatever this host measured."""
    if spec.fault != "dear":
        return
    from amusd_viz.engine.estimate import PassCost

    for runner in runners:
        if runner is not None and runner.cost.one_s > 0:
            runner.cost = PassCost(runner.cost.one_s, runner.cost.one_s)


def _fault_injector(spec: WorkerSpec, put):
    """Tests inject a worker death after N forward passes; in normal runs this is `put` itself."""
    if not spec.fault.startswith("die_after:"):
        return put
    from amusd_viz.events import Forward

    limit = int(spec.fault.split(":", 1)[1])
    count = 0

    def put_and_maybe_die(event):
        nonlocal count
        put(event)
        if isinstance(event, Forward) and event.role == spec.role:
            count += 1
            if count >= limit:
                os._exit(9)

    return put_and_maybe_die
