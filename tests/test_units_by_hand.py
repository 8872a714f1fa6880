"""The near-tie rule, the bench's arithmetic, statistics and trace export on hand-built inputs,
each expected value worked out by hand (not by the code's own formula)."""

from __future__ import annotations

import pytest

from amusd_viz.bench import Result, compare_with_ar, load_prompts, summarize
from amusd_viz.errors import UserError
from amusd_viz.events import (
    Error,
    Forward,
    Rollback,
    RunFinished,
    RunStarted,
    TokenCommitted,
    VerifyResult,
    WorkerLost,
)
from amusd_viz.lossless import TopTwo, is_near_tie, note, tolerance, top_two, ulp
from amusd_viz.stats import compute
from amusd_viz.trace import to_trace

# ---------------------------------------------------------------------------- the near-tie rule


def test_ulps_by_hand():
    assert ulp(1.0, "bfloat16") == 2 ** -7
    assert ulp(20.0, "bfloat16") == 0.125  # 16 <= 20 < 32: 2**4 / 2**7
    assert ulp(-3.0, "float16") == 2 ** -9  # 2 <= 3 < 4: 2**1 / 2**10
    assert ulp(20.0, "float32") == 2 ** -19
    assert tolerance(TopTwo(1, 20.0, 2, 19.875), "bfloat16") == 0.5  # 4 ulps of 0.125


@pytest.mark.parametrize(("token", "top", "dtype", "device", "near"), [
    # the runner-up, one bf16 ulp apart at magnitude 20: a near-tie
    (2, TopTwo(1, 20.0, 2, 19.875), "bfloat16", "cpu", True),
    # the runner-up, but 5 ulps apart (0.625 > 0.5): a bug
    (2, TopTwo(1, 20.0, 2, 19.375), "bfloat16", "cpu", False),
    # a dead tie, but the run chose a third token: a bug
    (3, TopTwo(1, 20.0, 2, 20.0), "bfloat16", "cpu", False),
    # float32 on a CPU is exact: never a near-tie
    (2, TopTwo(1, 20.0, 2, 20.0), "float32", "cpu", False),
    # float32 on CUDA: within 128 float32 ulps (2.4e-4 at 20) yes, 1e-2 no
    (2, TopTwo(1, 20.0, 2, 20.0 - 1e-4), "float32", "cuda:0", True),
    (2, TopTwo(1, 20.0, 2, 20.0 - 1e-2), "float32", "cuda:0", False),
    # float16's ulp at 5 is 2**-8: 4 ulps = 0.015625
    (2, TopTwo(1, 5.0, 2, 5.0 - 0.015625), "float16", "cpu", True),
    (2, TopTwo(1, 5.0, 2, 5.0 - 0.02), "float16", "cpu", False),
    # no logits recorded (an old log): cannot be excused
    (2, None, "bfloat16", "cpu", False),
])
def test_near_tie_needs_the_runner_up_within_a_few_ulps(token, top, dtype, device, near):
    assert is_near_tie(token, top, dtype, device) is near


def test_top_two_reads_logged_candidates():
    assert top_two([{"id": 5, "logit": 3.5, "p": 0.6}, {"id": 9, "logit": 3.25, "p": 0.3}]) == \
        TopTwo(5, 3.5, 9, 3.25)
    three = [{"id": 5, "logit": 3.5}, {"id": 9, "logit": 3.25}, {"id": 2, "logit": 3.25}]
    assert top_two(three, token=2) == TopTwo(5, 3.5, 2, 3.25)  # the diverging token's logit
    assert top_two(three, token=77) == TopTwo(5, 3.5, 9, 3.25)  # not among them: the runner-up
    # an exact tie listed the other way round: the reference chose 9, the run 5
    tie = [{"id": 5, "logit": 21.375}, {"id": 9, "logit": 21.375}, {"id": 2, "logit": 14.8}]
    assert top_two(tie, token=5, chosen=9) == TopTwo(9, 21.375, 5, 21.375)
    assert is_near_tie(5, top_two(tie, token=5, chosen=9), "bfloat16", "cpu")
    assert top_two([{"id": 5, "logit": None}, {"id": 9, "logit": 1.0}]) is None
    assert top_two([{"id": 5, "logit": 1.0}]) is None


def test_exactness_note():
    assert note("float32", "cpu:0") is None
    assert "near-ties" in note("bfloat16", "cpu")
    assert "float32 on cuda:0" in note("float32", "cuda:0")


# ------------------------------------------------------------------------- the bench's verdicts


def _result(strategy, ids, prompt="p1", tops=(), ms=100.0, kind="code", busy=None):
    return Result(strategy, prompt, kind, 0, len(ids), ms * len(ids) / 1000, ms, list(ids),
                  busy=busy or {}, tops=list(tops))


AR_TOPS = [[{"id": 1, "logit": 20.0}, {"id": 7, "logit": 19.875}],  # a near-tie at 0
           [{"id": 2, "logit": 20.0}, {"id": 8, "logit": 18.0}],  # far apart at 1
           [{"id": 3, "logit": 10.0}, {"id": 9, "logit": 9.9375}],  # 1 ulp at 2
           # a three-way tie at 3 (bf16 logits tie often); 6 is 5 ulps down
           [{"id": 4, "logit": 20.0}, {"id": 5, "logit": 19.875}, {"id": 11, "logit": 19.875},
            {"id": 6, "logit": 19.375}]]


def test_compare_with_ar_verdicts_by_hand():
    results = [
        _result("ar", [1, 2, 3, 4], tops=AR_TOPS),
        _result("same", [1, 2, 3, 4]),
        _result("runner_up_at_tie", [7, 5, 5, 5]),  # ar's runner-up at a 1-ulp gap
        _result("runner_up_far", [1, 8, 3, 4]),  # ar's runner-up, but 2.0 apart
        _result("third_at_tie", [1, 2, 4, 4]),  # gap of one ulp, but not among ar's top
        _result("tied_for_second", [1, 2, 3, 11]),  # ar's third, tied with its runner-up
        _result("fourth_too_far", [1, 2, 3, 6]),  # ar's fourth, 5 ulps down
        _result("short", [1, 2, 3]),  # stopped early
    ]
    got = {v["strategy"]: v for v in compare_with_ar(results, "bfloat16")}
    assert got["same"]["verdict"] == "identical" and got["same"]["first_difference"] is None
    assert (got["runner_up_at_tie"]["verdict"], got["runner_up_at_tie"]["first_difference"],
            got["runner_up_at_tie"]["top2_logit_gap"], got["runner_up_at_tie"]["tolerance"]) == \
        ("near-tie", 0, 0.125, 0.5)
    assert got["runner_up_far"]["verdict"] == "differs"
    assert got["third_at_tie"]["verdict"] == "differs"
    assert (got["tied_for_second"]["verdict"], got["tied_for_second"]["top2_logit_gap"]) == \
        ("near-tie", 0.125)
    assert got["fourth_too_far"]["verdict"] == "differs"
    assert (got["short"]["verdict"], got["short"]["first_difference"]) == ("differs", 3)
    # float32 on a CPU: the same near-tie is a bug
    exact = {v["strategy"]: v for v in compare_with_ar(results, "float32")}
    assert exact["runner_up_at_tie"]["verdict"] == "differs"
    assert exact["runner_up_at_tie"]["tolerance"] is None


def test_compare_with_ar_under_sampling_rules():
    results = [_result("ar", [1, 2, 3, 4], tops=AR_TOPS), _result("sync", [1, 5, 5, 5]),
               _result("hf-assisted", [4, 4, 4, 4])]
    coupled = {v["strategy"]: v["verdict"] for v in compare_with_ar(results, "bfloat16", "coupled")}
    assert coupled == {"sync": "parted"}  # transformers' own sampler promises no identity
    exact = {v["strategy"]: v["verdict"] for v in compare_with_ar(results, "float32", "coupled")}
    assert exact == {"sync": "differs"}
    assert compare_with_ar(results, "bfloat16", "rejection") == []  # a distribution, not ids


# ---------------------------------------------------------------------------- bench arithmetic


def test_summary_medians_and_speedups_by_hand():
    rows = [_result("ar", [1], prompt="a", ms=100.0, busy={"t": 0.9}),
            _result("ar", [1], prompt="b", ms=300.0, busy={"t": 0.7}),
            _result("ar", [1], prompt="c", ms=200.0, busy={"t": 0.8}, kind="prose"),
            _result("sync", [1], prompt="a", ms=40.0),
            _result("sync", [1], prompt="b", ms=100.0),
            _result("sync", [1], prompt="c", ms=400.0, kind="prose")]
    s = summarize(rows, ["ar", "sync"])
    ar, sync = s["overall"]["ar"], s["overall"]["sync"]
    assert (ar["median_ms_per_token"], ar["min_ms_per_token"], ar["max_ms_per_token"]) == \
        (200.0, 100.0, 300.0)
    assert sync["median_ms_per_token"] == 100.0
    assert sync["speedup_vs_ar"] == 2.0 and ar["speedup_vs_sync"] == 0.5
    assert ar["busy"] == {"t": 0.8} and ar["runs"] == 3
    code = s["by_kind"]["code"]
    assert code["ar"]["median_ms_per_token"] == 200.0  # median of 100 and 300
    assert code["sync"]["speedup_vs_ar"] == round(200.0 / 70.0, 3)
    assert s["by_kind"]["prose"]["sync"]["speedup_vs_ar"] == 0.5
    # paired: per prompt 100/40, 300/100, 200/400, geometric mean (2.5 * 3 * 0.5) ** (1/3)
    assert sync["paired_vs_ar"] == round((2.5 * 3 * 0.5) ** (1 / 3), 3)
    assert ar["paired_vs_sync"] == round(1 / (2.5 * 3 * 0.5) ** (1 / 3), 3)
    assert sync["paired_vs_sync"] == 1.0
    lone = summarize([*rows, _result("amusd", [1], prompt="z", ms=50.0)], ["ar", "amusd"])
    assert lone["overall"]["amusd"]["paired_vs_ar"] is None  # no prompt in common


def test_prompt_file_errors_name_the_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        load_prompts(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="holds no prompts"):
        load_prompts(empty)
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hi"}\n\n{"id": "z", "prompt": "yo", "kind": "chat"}\n')
    got = [(p.id, p.prompt, p.kind) for p in load_prompts(good)]
    assert got == [("1", "hi", "other"), ("z", "yo", "chat")]


# ------------------------------------------------------------------------------ stats by hand


def _fwd(role, device, t, dur, phase="decode", n=1):
    return Forward(t=t, role=role, device=device, dur=dur, phase=phase, n_tokens=n)


def _commit(pos, t, how="accepted"):
    return TokenCommitted(t=t, pos=pos, token_id=pos, text="x", how=how)


def test_busy_overlap_and_acceptance_by_position_by_hand():
    """A 10 s window [0, 10]: the target computes 0-2 and 3-7 (6 s), the draft 1-4 and 6-9
    (6 s). Both compute in 1-2, 3-4 and 6-7: 3 s. Two verify passes: the
    first accepts 2 of 3 (positions 0, 1 accepted, 2 rejected), the second 0 of 2 (position 0
    rejected, position 1 never checked)."""
    events = [
        RunStarted(t=0.0, strategy="amusd", draft="d", target="t", draft_device="cpu:1",
                   target_device="cpu:0", prompt_tokens=3),
        _fwd("target", "cpu:0", 0.0, 2.0, "prefill", 3), _fwd("draft", "cpu:1", 1.0, 3.0),
        _fwd("target", "cpu:0", 3.0, 4.0, "verify", 4), _fwd("draft", "cpu:1", 6.0, 3.0),
        VerifyResult(t=7.0, start_pos=0, proposed=[5, 6, 7], accepted=2, committed=[5, 6, 1]),
        Rollback(t=7.1, to_pos=2, discarded=[7, 8]),
        VerifyResult(t=8.0, start_pos=3, proposed=[2, 3], accepted=0, committed=[4]),
        *[_commit(i, 7.0 + 0.1 * i, how) for i, how in
          enumerate(["accepted", "accepted", "correction", "correction"])],
        RunFinished(t=10.0, new_tokens=4, wall_s=10.0, started_at=0.0),
    ]
    s = compute(events)
    assert s.busy == {"target@cpu:0": 0.6, "draft@cpu:1": 0.6}
    assert s.overlap == pytest.approx(0.3)
    assert s.acceptance_by_position == [0.5, 1.0, 0.0]  # pos 0: 1 of 2; pos 1: 1 of 1; pos 2: 0/1
    assert s.acceptance_rate == 2 / 5 and s.mean_accepted_per_pass == 1.0
    assert s.accepted_histogram == {0: 1, 2: 1}
    assert (s.rollbacks, s.wasted_draft_tokens) == (1, 2)
    assert s.how == {"accepted": 2, "correction": 2}
    assert (s.ms_per_token, s.tokens_per_s) == (2500.0, 0.4)
    assert s.mean_committed_per_pass == 2.0  # 3 then 1


def test_busy_is_clipped_to_the_generation_window():
    """Model loading and warm-up before the prompt went in (t < 2) do not count as busy."""
    events = [_fwd("target", "cpu", 0.0, 3.0, "prefill"), _fwd("target", "cpu", 4.0, 1.0),
              RunFinished(t=6.0, new_tokens=2, wall_s=4.0, started_at=2.0), _commit(0, 3), _commit(1, 5)]
    s = compute(events)
    assert s.busy == {"target@cpu": 0.5}  # 2-3 and 4-5 in [2, 6]
    assert s.overlap is None and s.ms_per_token == 2000.0


# ------------------------------------------------------------------------------ trace by hand


def test_trace_marks_errors_and_lost_workers():
    events = [RunStarted(t=0.0, strategy="amusd", draft="d", target="t", draft_device="cpu:1",
                         target_device="cpu:0", prompt_tokens=3),
              _fwd("draft", "cpu:1", 0.5, 0.25),
              WorkerLost(t=1.5, role="draft", message="the draft worker died (exit -9)"),
              Error(t=2.0, message="out of memory", role="target")]
    trace = to_trace(events)["traceEvents"]
    instants = [(e["name"], e["ts"], e["args"]) for e in trace if e["ph"] == "i"]
    assert instants == [
        ("worker_lost", 1_500_000.0, {"message": "the draft worker died (exit -9)", "role": "draft"}),
        ("error", 2_000_000.0, {"message": "out of memory", "role": "target"})]
    spans = [e for e in trace if e["ph"] == "X"]
    assert [(e["ts"], e["dur"], e["name"]) for e in spans] == [(500_000.0, 250_000.0, "decode ×1")]
    assert trace[0]["args"]["name"] == "amusd-viz amusd: d → t"
