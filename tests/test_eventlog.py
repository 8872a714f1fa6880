"""JSONL logs: written as the run goes, read back with errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amusd_viz.errors import UserError
from amusd_viz.eventlog import JsonlRecorder, make_header, parse_log, read_log
from amusd_viz.events import SCHEMA_VERSION, Forward, RunFinished, RunStarted, TokenCommitted

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLES = sorted(ASSETS.glob("sample-*.jsonl"))


def small_run():
    return [
        RunStarted(t=0.0, strategy="ar", draft=None, target="t", draft_device=None,
                   target_device="cpu", prompt_tokens=3),
        Forward(t=0.1, role="target", device="cpu", dur=0.05, phase="prefill", n_tokens=3),
        TokenCommitted(t=0.15, pos=0, token_id=7, text="hi", how="decoded"),
        RunFinished(t=0.15, new_tokens=1, wall_s=0.05, started_at=0.1),
    ]


def test_round_trip_and_flush_per_line(tmp_path):
    path = tmp_path / "run.jsonl"
    rec = JsonlRecorder(path, make_header({"strategy": "ar"}))
    events = small_run()
    rec.emit(events[0])
    # flushed as it goes: the file is readable while the run is still open
    assert len(path.read_text().splitlines()) == 2
    for e in events[1:]:
        rec.emit(e)
    rec.close()
    log = read_log(path)
    assert log.header.schema_version == SCHEMA_VERSION and log.header.config["strategy"] == "ar"
    assert [e.type for e in log.events] == [e.type for e in events]
    assert log.events[2].text == "hi" and log.warnings == []


def _lines(*objs):
    return "".join(json.dumps(o) + "\n" for o in objs)


HEADER = {"type": "header", "schema_version": 1}


def test_bad_json_names_the_line():
    raw = _lines(HEADER, {"type": "error", "t": 0, "message": "x"}) + "{not json\n" + _lines(
        {"type": "error", "t": 1, "message": "y"})
    with pytest.raises(UserError, match=r"<log>:3: not valid JSON"):
        parse_log(raw)


def test_unknown_event_type_names_the_line():
    with pytest.raises(UserError, match=r":2: unknown event type 'teleport'"):
        parse_log(_lines(HEADER, {"type": "teleport", "t": 0}))


def test_missing_header():
    with pytest.raises(UserError, match=r":1: missing header"):
        parse_log(_lines({"type": "error", "t": 0, "message": "x"}))


def test_newer_schema_version():
    with pytest.raises(UserError, match=r"schema_version 99 is newer"):
        parse_log(_lines({"type": "header", "schema_version": 99}))


def test_missing_field_names_the_line_and_field():
    with pytest.raises(UserError, match=r":2: bad token_committed event: pos"):
        parse_log(_lines(HEADER, {"type": "token_committed", "t": 0, "token_id": 1, "text": "a",
                                  "how": "accepted"}))


def test_truncated_tail_keeps_events_before_it():
    raw = _lines(HEADER, {"type": "error", "t": 0, "message": "x"}) + '{"type": "token_comm'
    log = parse_log(raw)
    assert len(log.events) == 1
    assert any("cut short" in w for w in log.warnings)


def test_a_binary_file_is_one_clear_line(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(bytes(range(256)))
    with pytest.raises(UserError, match="not UTF-8 text") as caught:
        read_log(tmp_path / "b.jsonl")
    assert "\n" not in str(caught.value) and "codec" not in str(caught.value)


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_log(tmp_path / "e.jsonl")


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_bundled_samples_obey_the_invariants(path):
    log = read_log(path)
    events = log.events
    assert events[0].type == "run_started" and events[-1].type == "run_finished"
    commits = [e for e in events if e.type == "token_committed"]
    assert [e.pos for e in commits] == list(range(len(commits)))
    assert len(commits) == events[-1].new_tokens
    pids = {e.role: e.pid for e in events if e.type == "worker_ready"}
    assert set(pids) == {"draft", "target"} and pids["draft"] != pids["target"]
    by_device: dict[str, list] = {}
    for e in events:
        if e.type == "forward":
            by_device.setdefault(e.device, []).append((e.t, e.t + e.dur))
    assert len(by_device) == 2
    for spans in by_device.values():
        spans.sort()
        assert all(b[0] >= a[1] - 1e-6 for a, b in zip(spans, spans[1:]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.text(max_size=40),
    st.builds(json.dumps, st.dictionaries(st.sampled_from(
        ["type", "t", "pos", "token_id", "text", "how", "message", "schema_version", "role"]),
        st.one_of(st.integers(-3, 5), st.text(max_size=8), st.sampled_from(
            ["header", "token_committed", "error", "forward", "rollback", "accepted"]),
            st.none(), st.floats(allow_nan=False)), max_size=6)),
), max_size=8), st.booleans())
def test_parser_fuzz_only_ever_raises_user_errors(lines, newline_at_end):
    """Whatever the bytes, the parser returns a log or a UserError (exit 2), never a crash."""
    raw = "\n".join(lines) + ("\n" if newline_at_end else "")
    try:
        log = parse_log(raw)
    except UserError as exc:
        assert str(exc)
    else:
        assert log.header.type == "header"


def _event_types() -> set[str]:
    """Every event type the engine defines, from events.py itself."""
    from amusd_viz.events import _Event

    return {cls.model_fields["type"].default for cls in _Event.__subclasses__()}


def test_the_bundled_samples_show_what_todays_engine_does():
    """The no-model demo must show the engine users run: together the samples hold every event
    type a healthy run emits (a new type fails this until a sample shows it), and the features
    the README sells: cache hits, branch steps, a tree pass that went on along a bet, guessed
    drafts, a lent core, a sampled run, and the prompt. Failures (worker_lost, error) are
    shown by the tests, not the samples."""
    logs = [read_log(path) for path in SAMPLES]
    events = [e for log in logs for e in log.events]
    assert _event_types() - {e.type for e in events} == {"worker_lost", "error"}
    assert all(log.header.schema_version == SCHEMA_VERSION for log in logs)
    verdicts = [e for e in events if e.type == "verify_result"]
    assert any(e.from_cache for e in verdicts), "no draft handed over by the cache"
    assert any(e.tree_root is not None for e in verdicts), "no tree pass went on along a bet"
    assert any(e.type == "draft_proposed" and e.guessed for e in events), "no lookup guess"
    assert any(e.type == "forward" and e.lent for e in events), "no lent core"
    started = [e for e in events if e.type == "run_started"]
    assert all(e.prompt for e in started)
    assert any(e.temperature > 0 and e.acceptance == "rejection" for e in started)
