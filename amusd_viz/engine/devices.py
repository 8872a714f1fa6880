"""Devices: `cpu:N` is one core (pinned, one torch thread), `cpu` all cores, `cuda:N` a GPU.

Parsing and validation import no torch (so the CLI can check options cheaply); CUDA checks import
torch only when a cuda device is named.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from amusd_viz.config import RunConfig, draft_runs_with_target
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


def enter_device(device: Device) -> None:
    """Pin this process for `device`. Call before importing torch in a worker process."""
    if device.kind == "cpu" and device.index is not None:
        os.sched_setaffinity(0, {device.index})
        threads = 1
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


def resolve_run(cfg: RunConfig) -> RunConfig:
    """Fill in the devices and the draft's quantization for `cfg.strategy` on this machine,
    from what the user asked for (checked: a missing core or GPU is a UserError)."""
    # a lookup drafter needs no core of its own: the target keeps them all
    default_target, default_draft = default_devices("sync" if cfg.ngram_n else cfg.strategy)
    target = str(parse_device(cfg.target_device_option or default_target, "--target-device"))
    draft = None
    if cfg.uses_draft:
        draft = str(parse_device(cfg.draft_device_option or default_draft, "--draft-device"))
    runs_on = target if draft_runs_with_target(cfg.strategy) or draft is None else draft
    quant = "none" if cfg.ngram_n else resolve_draft_quant(cfg.draft_quant_option, runs_on)
    return cfg.model_copy(update={"target_device": target, "draft_device": draft,
                                  "draft_quant": quant})
