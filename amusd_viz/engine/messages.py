"""Control messages between the coordinator and a worker, beside the events on the same pipe
(toolong's `messages.py` shape: small typed messages, matched by type)."""

from __future__ import annotations

from dataclasses import dataclass

from amusd_viz.engine.request import Outcome, Request


@dataclass(frozen=True)
class RunRequest:
    """Coordinator -> worker: generate for this request; `run_id` tags the answer."""

    run_id: int
    request: Request


@dataclass(frozen=True)
class Ready:
    """Worker -> coordinator: the model(s) are loaded and warm."""

    role: str


@dataclass(frozen=True)
class Done:
    """Worker -> coordinator: a run finished; the target's outcome holds the committed ids."""

    role: str
    run_id: int
    outcome: Outcome | int  # the draft reports its number of forward passes


@dataclass(frozen=True)
class Failed:
    """Worker -> coordinator: an exception ended the worker (never swallowed)."""

    role: str
    message: str
    traceback: str = ""


Control = Ready | Done | Failed
