"""Two workers on one GPU at once, through NVIDIA's Multi-Process Service (`--gpu-share mps:N`).

Without MPS, two processes on one GPU time-slice: their kernels never run together, so amusd on
one GPU takes turns (schedule.Baton, sync's schedule). Under an MPS daemon the two processes'
kernels share the card's SMs concurrently; `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`, read when a
process creates its CUDA context, caps the SMs each may use: the draft gets N% and the target the
rest, and each lane is labelled with its share (`cuda:0 [mps 30%]`).

A process whose daemon is absent silently falls back to time-slicing, so a run that asks for MPS
checks for the daemon first and refuses to start without it. amusd-viz never starts the daemon
nor changes the card's settings (compute mode, MIG, clocks): the user (or scripts/gpu-check.sh,
which stops it again) runs `nvidia-cuda-mps-control -d`. Imports no torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from amusd_viz.errors import UserError

PERCENT_VAR = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"  # the daemon's default; CUDA_MPS_PIPE_DIRECTORY moves it
_SHARE = re.compile(r"^mps:(\d{1,3})$")
START_HINT = ("start the daemon (as root: nvidia-cuda-mps-control -d) or use --gpu-share baton "
              "(the workers take turns)")


def parse_share(choice: str) -> int | None:
    """`baton` -> None; `mps:N` -> N, the draft's percent of the GPU's SMs (1..99)."""
    if choice == "baton":
        return None
    match = _SHARE.match(choice)
    if not match or not 1 <= int(match.group(1)) <= 99:
        raise UserError(f"--gpu-share {choice!r}: use baton, or mps:N with N from 1 to 99 (the "
                        "draft's percent of the GPU; the target gets the rest).")
    return int(match.group(1))


def daemon_problem() -> str | None:
    """Why no MPS daemon is reachable, or None: its control tool answers on its pipe."""
    pipe_dir = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_PIPE_DIR))
    if not shutil.which("nvidia-cuda-mps-control"):
        return "nvidia-cuda-mps-control is not installed (it comes with the NVIDIA driver)"
    if not (pipe_dir / "control").exists():
        return f"no MPS daemon is running (no control pipe in {pipe_dir})"
    try:
        answer = subprocess.run(["nvidia-cuda-mps-control"], input="get_server_list\n",
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the MPS daemon did not answer ({exc})"
    if answer.returncode != 0:
        return f"the MPS daemon did not answer (exit {answer.returncode}: {answer.stderr.strip()})"
    return None


def resolve_share(choice: str, strategy: str, target: str, draft: str | None) -> int | None:
    """The draft's percent under MPS, or None (the baton); a clear error where MPS cannot
    serve: not amusd on one GPU, or no daemon."""
    share = parse_share(choice)
    if share is None:
        return None
    if strategy != "amusd" or not target.startswith("cuda") or draft != target:
        raise UserError(f"--gpu-share {choice} shares one GPU between amusd's two workers: use "
                        "it with --strategy amusd and both models on the same cuda:N.")
    if problem := daemon_problem():
        raise UserError(f"--gpu-share {choice}: {problem}. Without the daemon the two workers "
                        f"would silently take turns; {START_HINT}.")
    return share


def worker_percent(role: str, share: int | None) -> int | None:
    """The SM percent a worker's CUDA context is capped at: the draft's share, the target the
    rest."""
    if share is None:
        return None
    return share if role == "draft" else 100 - share


def enter_share(percent: int | None) -> None:
    """In a worker, before its first CUDA call: cap its context at `percent` of the SMs."""
    if percent is not None:
        os.environ[PERCENT_VAR] = str(percent)


def label(device: str, percent: int | None) -> str:
    """A device as its lane shows it: `cuda:0 [mps 30%]` under a share."""
    return device if percent is None else f"{device} [mps {percent}%]"
