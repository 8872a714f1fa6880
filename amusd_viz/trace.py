"""Chrome trace-event export (opens in Perfetto and chrome://tracing). No torch, no textual.

One process ("amusd-viz run") with one named thread lane per device; forward passes are complete
("X") events, rollbacks instant ("i") events, tokens/s and acceptance counter ("C") tracks.
"""

from __future__ import annotations

PID = 1


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def _draft_instant(e, tid: int) -> dict:
    """A rollback, or the speculation cache's verdict at a rejection, on the draft's lane."""
    if e.type == "rollback":
        name, args = "rollback", {"to_pos": e.to_pos, "discarded": len(e.discarded)}
    else:
        name = "cache hit" if e.hit else "cache miss"
        args = {"pos": e.pos, "token": e.token_id, "handed": e.handed, "branches": e.branches,
                "wasted": e.wasted}
    return {"ph": "i", "pid": PID, "tid": tid, "s": "t", "name": name, "ts": _us(e.t),
            "args": args}


def to_trace(events, window_s: float = 1.0) -> dict:
    lanes: dict[str, int] = {}
    out: list[dict] = []
    title = "amusd-viz run"

    def lane(role: str, device: str) -> int:
        key = f"{role} @ {device}"
        if key not in lanes:
            lanes[key] = len(lanes) + 1
            out.append({"ph": "M", "pid": PID, "tid": lanes[key], "name": "thread_name",
                        "args": {"name": key}})
            out.append({"ph": "M", "pid": PID, "tid": lanes[key], "name": "thread_sort_index",
                        "args": {"sort_index": 0 if role == "draft" else 1}})
        return lanes[key]

    devices: dict[str, str] = {}
    pending_verify: dict[int, dict] = {}  # target forward span waiting for its verify result
    commits: list[float] = []
    proposed = accepted = 0
    for e in events:
        if e.type == "run_started":
            title = f"amusd-viz {e.strategy}: {e.draft or '-'} → {e.target}"
            devices = {"target": e.target_device, "draft": e.draft_device or e.target_device}
        elif e.type == "worker_ready":
            tid = lane(e.role, e.device)
            out.append({"ph": "X", "pid": PID, "tid": tid, "name": "load model", "cat": "load",
                        "ts": _us(e.t - e.load_s), "dur": _us(e.load_s),
                        "args": {"phase": "load", "pid": e.pid}})
        elif e.type == "forward":
            tid = lane(e.role, e.home)
            span = {"ph": "X", "pid": PID, "tid": tid, "name": f"{e.phase} ×{e.n_tokens}",
                    "cat": e.phase, "ts": _us(e.t), "dur": _us(e.dur),
                    "args": {"phase": e.phase, "tokens": e.n_tokens, "device": e.device}}
            out.append(span)
            if e.role == "target":
                pending_verify[tid] = span
        elif e.type == "verify_result":
            for span in pending_verify.values():
                span["args"].update(proposed=len(e.proposed), accepted=e.accepted,
                                    committed=len(e.committed))
            pending_verify.clear()
            proposed += len(e.proposed)
            accepted += e.accepted
            if proposed:
                out.append({"ph": "C", "pid": PID, "name": "acceptance rate", "ts": _us(e.t),
                            "args": {"rate": round(accepted / proposed, 4)}})
        elif e.type in ("rollback", "cache_verdict"):
            out.append(_draft_instant(e, lane("draft", devices.get("draft", "?"))))
        elif e.type == "token_committed":
            commits.append(e.t)
            recent = [t for t in commits if t > e.t - window_s]
            out.append({"ph": "C", "pid": PID, "name": "tokens/s", "ts": _us(e.t),
                        "args": {"tokens/s": round(len(recent) / window_s, 3)}})
        elif e.type in ("error", "worker_lost"):
            out.append({"ph": "i", "pid": PID, "s": "g", "name": e.type, "ts": _us(e.t),
                        "args": {"message": e.message, "role": e.role}})
    out.insert(0, {"ph": "M", "pid": PID, "name": "process_name", "args": {"name": title}})
    return {"traceEvents": out, "displayTimeUnit": "ms"}
