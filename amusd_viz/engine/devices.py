"""Devices: `cpu:N` is one core (pinned, one torch thread), `cpu` all cores, `cuda:N` a GPU.

Parsing and validation import no torch (so the CLI can check options cheaply); CUDA checks import
torch only when a cuda device is named.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

from amusd_viz.config import RunConfig, draft_runs_with_target
from amusd_viz.engine.mps import resolve_share
from amusd_viz.errors import UserError

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    index: int | None  # None: all cores / the current GPU

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def torch_device(self) -> str:
        return "cpu" if self.kind == "cpu" else str(self)


def usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def cuda_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_device(text: str, option: str = "--device") -> Device:
    match = _DEVICE.match(text.strip().lower())
    if not match:
        raise UserError(f"{option} {text!r} is not a device. Use cpu, cpu:N (one core) or cuda:N.")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda" and index is None:
        index = "0"  # `cuda` and `cuda:0` are the same device: one spelling everywhere
    device = Device(kind, int(index) if index is not None else None)
    if kind == "cpu" and device.index is not None and device.index not in usable_cores():
        raise UserError(f"{option} {text}: this machine has no core {device.index} "
                        f"(usable cores: {', '.join(map(str, usable_cores()))}). Pick one of those.")
    if kind == "cuda":
        count = cuda_count()
        if count == 0:
            raise UserError(f"{option} {text}: no CUDA GPU is available here (torch sees none). "
                            "Use cpu:N, or install a CUDA build of torch on a GPU machine.")
        if (device.index or 0) >= count:
            raise UserError(f"{option} {text}: there are only {count} GPU(s) (cuda:0..cuda:{count - 1}).")
    return device


def _shape(text: str) -> Device:
    """An already-checked device name as a Device (no availability checks)."""
    kind, _, index = text.partition(":")
    return Device(kind, int(index) if index else None)


def default_devices(strategy: str, gpu_count: int | None = None) -> tuple[str, str]:
    """(target, draft) defaults: two GPUs → cuda:0/cuda:1; one → both cuda:0; none → the
    async strategy pins cpu:0/cpu:1, the one-process strategies use every core."""
    gpus = cuda_count() if gpu_count is None else gpu_count
    if gpus >= 2:
        return ("cuda:0", "cuda:1") if strategy == "amusd" else ("cuda:0", "cuda:0")
    if gpus == 1:
        return "cuda:0", "cuda:0"
    cores = usable_cores()
    if strategy == "amusd":
        return (f"cpu:{cores[0]}", f"cpu:{cores[1] if len(cores) > 1 else cores[0]}")
    return "cpu", "cpu"


def enter_device(device: Device, borrow: int | None = None) -> None:
    """Pin this process for `device` (and, for amusd's target, the draft's core `borrow` it may
    borrow: engine/lending.py). Call before importing torch in a worker process."""
    if device.kind == "cpu" and device.index is not None:
        cores = {device.index} if borrow is None else {device.index, borrow}
        os.sched_setaffinity(0, cores)
        threads = len(cores)
    elif device.kind == "cpu":
        threads = len(usable_cores())
    else:
        threads = 1
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    if device.kind == "cuda":
        torch.cuda.set_device(device.index or 0)
    if device.kind == "cpu" and device.index is not None and borrow is not None:
        from amusd_viz.engine.lending import pin_to_own_core

        pin_to_own_core(device.index)


def resolve_draft_quant(choice: str, draft_device: str) -> str:
    """int8 draft layers run on CPU only: `auto` picks int8 where the draft really runs on a
    CPU (for sync, that is the target's device), none on a GPU."""
    on_gpu = draft_device.startswith("cuda")
    if choice == "auto":
        return "none" if on_gpu else "int8"
    if choice == "int8" and on_gpu:
        raise UserError(f"--draft-quant int8 runs on CPU devices only, and the draft runs on "
                        f"{draft_device}; use --draft-quant none (or auto) on a GPU.")
    return choice


def resolve_kv_cache(choice: str, target_device: str) -> str:
    """auto: the static cache on a GPU (fixed addresses, the ground CUDA graphs stand on),
    the dynamic one on a CPU (no attention over a line's empty slots)."""
    if choice == "auto":
        return "static" if target_device.startswith("cuda") else "dynamic"
    return choice


def resolve_cuda_graphs(choice: str, kv_cache: str, devices: tuple[str | None, ...]) -> bool:
    """auto: graphs wherever a model runs on a GPU over the static cache. on: the same, and a
    clear error where they cannot be (no GPU, or the dynamic cache)."""
    on_gpu = any(d and d.startswith("cuda") for d in devices)
    if choice == "on" and not on_gpu:
        raise UserError("--cuda-graphs on needs a model on a GPU (--target-device or "
                        "--draft-device cuda:N); drop it, or use --cuda-graphs auto.")
    if choice == "on" and kv_cache != "static":
        raise UserError("CUDA graphs replay passes over the static KV cache; use --kv-cache "
                        "static (or auto) with --cuda-graphs on.")
    return choice != "off" and on_gpu and kv_cache == "static"


def resolve_run(cfg: RunConfig) -> RunConfig:
    """Fill in the devices and the draft's quantization for `cfg.strategy` on this machine,
    from what the user asked for (checked: a missing core or GPU is a UserError)."""
    # a lookup drafter needs no core of its own: the target keeps them all
    default_target, default_draft = default_devices("sync" if cfg.ngram_n else cfg.strategy)
    target = str(parse_device(cfg.target_device_option or default_target, "--target-device"))
    draft = None
    if cfg.uses_draft:
        draft = str(parse_device(cfg.draft_device_option or default_draft, "--draft-device"))
    if draft_runs_with_target(cfg.strategy) and (cfg.ngram_n or not cfg.draft_device_option):
        draft = target  # one process, one device, unless sync is given a device per model
    if cfg.strategy == "sync" and draft != target:
        check_device_pair(target, draft)
    quant = "none" if cfg.ngram_n else resolve_draft_quant(cfg.draft_quant_option, draft or target)
    return cfg.model_copy(update={"target_device": target, "draft_device": draft,
                                  "draft_quant": quant,
                                  "kv_cache": (kv := resolve_kv_cache(cfg.kv_cache_option, target)),
                                  "cuda_graphs": resolve_cuda_graphs(cfg.cuda_graphs_option, kv,
                                                                     (target, draft)),
                                  "gpu_share": resolve_share(cfg.gpu_share_option, cfg.strategy,
                                                             target, draft),
                                  "dtype": resolve_dtype(cfg.dtype_option, target)
                                  if cfg.dtype_option else cfg.dtype})


def check_device_pair(target: str, draft: str | None) -> None:
    """`sync` on two devices in one process (the paper's baseline): one core each or one GPU
    each, never overlapping (a core's passes would also run on the other's)."""
    t, d = _shape(target), _shape(draft or target)
    if t.kind == d.kind and t.index is not None and d.index is not None and t != d:
        return
    raise UserError(
        f"sync on two devices needs one core or one GPU per model, and --target-device {t} "
        f"with --draft-device {d} overlap or mix kinds. Use e.g. --target-device cpu:0 "
        "--draft-device cpu:1 (or cuda:0 and cuda:1), or drop --draft-device to run both "
        "models on the target's device.")


@contextlib.contextmanager
def on_core(core: int):
    """A forward pass of `sync` on two CPU cores: this thread (torch runs one) moves to the
    model's own core first, so each model computes on its core only, as on its own device."""
    os.sched_setaffinity(0, {core})  # pid 0: the calling thread
    yield


def enter_two_devices(target: Device, draft: Device) -> None:
    """`sync` with the models on two devices, in one process (check_device_pair): on a CPU the
    process may run on both cores with one torch thread (the models' `turn` hooks move it,
    on_core); on GPUs the target's is the current one."""
    if target.kind == "cpu":
        os.sched_setaffinity(0, {target.index or 0, draft.index or 0})
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)
    if target.kind == "cuda":
        torch.cuda.set_device(target.index or 0)


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MEMORY_HEADROOM = 1.25  # the KV cache, activations and the CUDA context on top of the weights


def model_bytes(src: str, dtype: str) -> int:
    """The weights' size in `dtype`, from the safetensors files and the dtype they hold."""
    import json
    from pathlib import Path

    folder = Path(src)
    files = list(folder.glob("*.safetensors"))
    if not files:
        return 0
    config = folder / "config.json"
    stored = "bfloat16"
    if config.is_file():
        data = json.loads(config.read_text())
        stored = str(data.get("dtype") or data.get("torch_dtype") or stored)
    on_disk = sum(f.stat().st_size for f in files)
    return on_disk * DTYPE_BYTES[dtype] // DTYPE_BYTES.get(stored, 2)


def check_gpu_memory(placements: list[tuple[str, str]], dtype: str) -> None:
    """(model source, device) pairs: every GPU must have room for what goes on it, or the run
    stops here with a clear message instead of an out-of-memory error in a worker."""
    need: dict[str, int] = {}
    for src, device in placements:
        if device.startswith("cuda"):
            need[device] = need.get(device, 0) + int(model_bytes(src, dtype) * MEMORY_HEADROOM)
    if not need:
        return
    import torch

    gib = 2 ** 30
    for device, wanted in need.items():
        free, total = torch.cuda.mem_get_info(torch.device(device))
        if wanted > free:
            raise UserError(
                f"{device} has {free / gib:.1f} GiB free of {total / gib:.1f} GiB, and the "
                f"models placed on it need about {wanted / gib:.1f} GiB in {dtype}. Put the draft "
                "on another GPU (--draft-device cuda:1), free the GPU, or pick smaller models.")


def gpu_dtype_problem(dtype: str, device: str) -> str | None:
    """Why `dtype` is a poor choice on this GPU, or None: bf16 without native support is
    emulated (slow); float16 overflows in Qwen2-family models (NaN logits)."""
    if not device.startswith("cuda"):
        return None
    import torch

    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return (f"{device} has no native bfloat16 (compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}): it is emulated "
                "and slow there; --dtype float32 is exact and usually faster on such a card")
    return None


def resolve_dtype(choice: str, target_device: str) -> str:
    """`auto`: bfloat16 on a CPU and on GPUs with native bf16 (Ampere and later), float32 on
    older GPUs (float16 overflows in Qwen2 models). An explicit choice is kept."""
    if choice != "auto":
        return choice
    if target_device.startswith("cuda") and gpu_dtype_problem("bfloat16", target_device):
        return "float32"
    return "bfloat16"


def device_info(device: Device) -> dict:
    """What a worker reports of its device in worker_ready: threads on a CPU; name, compute
    capability, memory and torch's CUDA version on a GPU."""
    import torch

    if device.kind != "cuda":
        return {"torch_threads": torch.get_num_threads()}
    index = device.index or 0
    props = torch.cuda.get_device_properties(index)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "cuda": torch.version.cuda,
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False)}
