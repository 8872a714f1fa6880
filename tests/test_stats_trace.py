"""Statistics and the Perfetto export, on the recorded real runs shipped in assets/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amusd_viz.cli import main
from amusd_viz.eventlog import read_log
from amusd_viz.stats import compute
from amusd_viz.trace import to_trace

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PROSE = ASSETS / "sample-amusd-prose.jsonl"
CODE = ASSETS / "sample-amusd-code.jsonl"


def test_stats_agree_with_the_events():
    events = read_log(PROSE).events
    s = compute(events)
    verifies = [e for e in events if e.type == "verify_result" and e.proposed]
    assert s.verify_passes == len(verifies)
    proposed = sum(len(e.proposed) for e in verifies)
    accepted = sum(e.accepted for e in verifies)
    assert s.acceptance_rate == pytest.approx(accepted / proposed)
    assert s.mean_accepted_per_pass == pytest.approx(accepted / len(verifies))
    assert sum(s.accepted_histogram.values()) == len(verifies)
    assert s.rollbacks == sum(1 for e in events if e.type == "rollback")
    assert s.wasted_draft_tokens == sum(len(e.discarded) for e in events if e.type == "rollback")
    assert s.new_tokens == 64
    finished = events[-1]
    assert s.ms_per_token == pytest.approx(1000 * finished.wall_s / 64)
    assert set(s.busy) == {"draft@cpu:1", "target@cpu:0"}
    assert all(0 < v <= 1 for v in s.busy.values())
    assert 0 < s.overlap <= min(s.busy.values())
    assert all(0 <= r <= 1 for r in s.acceptance_by_position)
    assert sum(s.how.values()) == 64


def test_stats_command_prints_every_figure(capsys):
    assert main(["stats", str(CODE)]) == 0
    out = capsys.readouterr().out
    for label in ("acceptance rate", "mean accepted / pass", "acceptance by position",
                  "accepted per pass", "rollbacks", "wasted draft tokens", "ms / token",
                  "busy draft@cpu:1", "busy target@cpu:0", "both devices busy"):
        assert label in out
    assert main(["stats", str(CODE), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["new_tokens"] == 64 and data["strategy"] == "amusd"


def test_trace_has_named_device_lanes_and_valid_events(tmp_path):
    out = tmp_path / "trace.json"
    assert main(["export-trace", str(PROSE), "-o", str(out)]) == 0
    trace = json.loads(out.read_text())
    events = trace["traceEvents"]
    lanes = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert sorted(lanes.values()) == ["draft @ cpu:1", "target @ cpu:0"]
    for e in events:  # the Chrome trace event format's required fields per phase
        assert e["ph"] in {"M", "X", "i", "C"}
        assert isinstance(e["pid"], int)
        if e["ph"] == "X":
            assert e["dur"] >= 0 and e["ts"] >= 0 and e["tid"] in lanes and "phase" in e["args"]
        if e["ph"] == "C":
            assert all(isinstance(v, (int, float)) for v in e["args"].values())
        if e["ph"] == "i":
            assert e["s"] in {"t", "p", "g"}
    spans = [e for e in events if e["ph"] == "X" and e["cat"] == "verify"]
    assert spans and all("accepted" in e["args"] for e in spans)
    assert any(e["ph"] == "i" and e["name"] == "rollback" for e in events)
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"tokens/s", "acceptance rate"} <= counters


def test_trace_of_a_log_without_drafts():
    events = [e for e in read_log(CODE).events if e.type in ("run_started", "forward")]
    trace = to_trace(events)
    assert trace["traceEvents"][0]["ph"] == "M"


def test_corrupted_log_exit_2_naming_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = CODE.read_text().splitlines()
    lines[5] = lines[5][:20] + "}{"
    bad.write_text("\n".join(lines) + "\n")
    for command in (["stats", str(bad)], ["export-trace", str(bad), "-o", str(tmp_path / "t.json")],
                    ["replay", str(bad)]):
        assert main(command) == 2
        assert "bad.jsonl:6" in capsys.readouterr().err


def test_acceptance_per_check_and_expected_acceptance_by_hand():
    """Two passes: 4 drafts with 2 accepted (3 checked: the third was rejected, the fourth never
    looked at), and 2 drafts both accepted (2 checked). accepted/proposed = 4/6, accepted/checked
    = 4/5; the expected acceptance is the mean of the five overlaps."""
    from amusd_viz.events import VerifyResult
    from amusd_viz.stats import compute

    events = [
        VerifyResult(t=1.0, start_pos=0, proposed=[5, 6, 7, 8], accepted=2, committed=[5, 6, 9],
                     p=[0.9, 0.8, 0.1], q=[0.9, 0.7, 0.6], accept_prob=[1.0, 1.0, 0.1 / 0.6],
                     u=[0.5, 0.5, 0.9], overlap=[0.9, 0.8, 0.4]),
        VerifyResult(t=2.0, start_pos=3, proposed=[1, 2], accepted=2, committed=[1, 2, 3],
                     p=[0.5, 0.5], q=[0.5, 0.5], accept_prob=[1.0, 1.0], u=[0.1, 0.2],
                     overlap=[1.0, 0.9]),
    ]
    s = compute(events)
    assert s.acceptance_rate == 4 / 6
    assert s.acceptance_per_check == 4 / 5
    assert abs(s.expected_acceptance - (0.9 + 0.8 + 0.4 + 1.0 + 0.9) / 5) < 1e-12
    assert s.acceptance_by_position == [1.0, 1.0, 0.0]  # position 2 reached once, rejected


def test_a_lent_pass_counts_on_the_targets_own_lane():
    """A target pass on the draft's lent core (`lent`, engine/lending.py) is the target's work:
    busy and the trace keep it on the target's own device, stats count it lent. A schema-2 log
    wrote its device as "cpu:0+cpu:1": read the same."""
    from amusd_viz.events import Forward, event_adapter

    old = event_adapter.validate_python({"type": "forward", "t": 1.5, "role": "target",
                                         "device": "cpu:0+cpu:1", "dur": 0.2, "phase": "verify",
                                         "n_tokens": 3})
    lent = Forward(t=1.5, role="target", device="cpu:0", dur=0.2, phase="verify", n_tokens=3,
                   lent=True)
    assert old == lent
    events = [e for e in read_log(PROSE).events if e.type != "forward" or e.role == "draft"]
    events += [Forward(t=1.0, role="target", device="cpu:0", dur=0.3, phase="decode", n_tokens=1),
               lent]
    s = compute(events)
    assert s.lent_passes == 1
    assert set(s.busy) == {"draft@cpu:1", "target@cpu:0"}
    lanes = {e["args"]["name"] for e in to_trace(events)["traceEvents"]
             if e.get("name") == "thread_name"}
    assert lanes == {"draft @ cpu:1", "target @ cpu:0"}


@pytest.mark.parametrize(("extra", "aside"), [(0.80, True), (0.02, False), (None, False)])
def test_a_dear_extra_token_is_reported_in_stats_summary_and_screen(extra, aside):
    """The target's pass cost timed at load (worker_ready): where an extra token costs over a
    quarter of a pass (an AVX2-only CPU) the summary's speed_note, the stats block and the
    stats panel's row say the drafts stepped aside; where it is cheap, or not timed, nothing."""
    from amusd_viz.events import WorkerReady
    from amusd_viz.stats import format_stats
    from amusd_viz.summary import RunSummary
    from amusd_viz.ui.state import RunState

    log = read_log(PROSE)
    ready = WorkerReady(t=0.5, role="target", device="cpu:0", pid=1, load_s=0.4,
                        pass_s=None if extra is None else 0.3, extra_token=extra)
    events = [*log.events, ready]
    s = compute(events)
    assert s.extra_token == extra
    summary = RunSummary(strategy="amusd", draft="d", target="t", draft_device="cpu:1",
                         target_device="cpu:0", dtype="bfloat16", prompt_tokens=3,
                         token_ids=[1], text="x", stop_reason="length", stats=s)
    assert (summary.speed_note is not None) is aside
    assert ("extra token 0.80× a pass" in (summary.speed_note or "")) is aside
    assert ("extra token per pass" in format_stats(s)) is (extra is not None)
    state = RunState()
    for e in events:
        state.ingest(e)
    assert ("drafts step aside" in state.message) is aside
