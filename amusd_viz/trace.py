"""Chrome trace-event export (opens in Perfetto and chrome://tracing). No torch, no textual.

One process ("amusd-viz run") with one named thread lane per device; forward passes are complete
("X") events, rollbacks instant ("i") events, tokens/s and acceptance counter ("C") tracks.
"""

from __future__ import annotations

from amusd_viz.events import (
    CacheVerdict,
    Error,
    Forward,
    Rollback,
    RunStarted,
    TokenCommitted,
    VerifyResult,
    WorkerLost,
    WorkerReady,
)

PID = 1


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def _draft_instant(e: Rollback | CacheVerdict, tid: int) -> dict:
    """A rollback, or the speculation cache's verdict at a rejection, on the draft's lane."""
    if isinstance(e, Rollback):
        name, args = "rollback", {"to_pos": e.to_pos, "discarded": len(e.discarded)}
    else:
        name = "cache hit" if e.hit else "cache miss"
        args = {"pos": e.pos, "token": e.token_id, "handed": e.handed, "branches": e.branches,
                "wasted": e.wasted}
    return {"ph": "i", "pid": PID, "tid": tid, "s": "t", "name": name, "ts": _us(e.t),
            "args": args}


def to_trace(events, window_s: float = 1.0) -> dict:
    trace = _Trace(window_s)
    for e in events:
        trace.add(e)
    return trace.result()


class _Trace:
    """The trace, built one event at a time (dispatched on the event's class)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.lanes: dict[str, int] = {}
        self.out: list[dict] = []
        self.title = "amusd-viz run"
        self.devices: dict[str, str] = {}
        self.pending_verify: dict[int, dict] = {}  # target forward span waiting for its verdict
        self.commits: list[float] = []
        self.proposed = self.accepted = 0

    def lane(self, role: str, device: str) -> int:
        key = f"{role} @ {device}"
        if key not in self.lanes:
            tid = self.lanes[key] = len(self.lanes) + 1
            self.out.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_name",
                             "args": {"name": key}})
            self.out.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_sort_index",
                             "args": {"sort_index": 0 if role == "draft" else 1}})
        return self.lanes[key]

    def add(self, e) -> None:
        match e:
            case RunStarted():
                self.title = f"amusd-viz {e.strategy}: {e.draft or '-'} → {e.target}"
                self.devices = {"target": e.target_device,
                                "draft": e.draft_device or e.target_device}
            case WorkerReady():
                self.out.append({"ph": "X", "pid": PID, "tid": self.lane(e.role, e.device),
                                 "name": "load model", "cat": "load", "ts": _us(e.t - e.load_s),
                                 "dur": _us(e.load_s), "args": {"phase": "load", "pid": e.pid}})
            case Forward():
                self._forward(e)
            case VerifyResult():
                self._verified(e)
            case Rollback() | CacheVerdict():
                self.out.append(_draft_instant(e, self.lane("draft", self.devices.get("draft", "?"))))
            case TokenCommitted():
                self.commits.append(e.t)
                recent = [t for t in self.commits if t > e.t - self.window_s]
                self.out.append({"ph": "C", "pid": PID, "name": "tokens/s", "ts": _us(e.t),
                                 "args": {"tokens/s": round(len(recent) / self.window_s, 3)}})
            case Error() | WorkerLost():
                self.out.append({"ph": "i", "pid": PID, "s": "g", "name": e.type, "ts": _us(e.t),
                                 "args": {"message": e.message, "role": e.role}})

    def _forward(self, e: Forward) -> None:
        tid = self.lane(e.role, e.device)
        span = {"ph": "X", "pid": PID, "tid": tid, "name": f"{e.phase} ×{e.n_tokens}",
                "cat": e.phase, "ts": _us(e.t), "dur": _us(e.dur),
                "args": {"phase": e.phase, "tokens": e.n_tokens, "device": e.device,
                         "lent": e.lent}}
        self.out.append(span)
        if e.role == "target":
            self.pending_verify[tid] = span

    def _verified(self, e: VerifyResult) -> None:
        for span in self.pending_verify.values():
            span["args"].update(proposed=len(e.proposed), accepted=e.accepted,
                                committed=len(e.committed))
        self.pending_verify.clear()
        self.proposed += len(e.proposed)
        self.accepted += e.accepted
        if self.proposed:
            self.out.append({"ph": "C", "pid": PID, "name": "acceptance rate", "ts": _us(e.t),
                             "args": {"rate": round(self.accepted / self.proposed, 4)}})

    def result(self) -> dict:
        head = {"ph": "M", "pid": PID, "name": "process_name", "args": {"name": self.title}}
        return {"traceEvents": [head, *self.out], "displayTimeUnit": "ms"}
