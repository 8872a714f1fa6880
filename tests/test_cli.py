"""The command line: every option documented, every bad value a one-line error and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from amusd_viz.cli import build_command_parser, build_run_parser, main


def run_cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "amusd_viz", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_help_lists_every_option_of_the_contract():
    text = build_run_parser().format_help()
    for option in ("--draft", "--target", "--prompt", "--prompt-file", "--strategy",
                   "--draft-device", "--target-device", "--dtype", "--max-new-tokens",
                   "--lookahead", "--events", "--summary-json", "--headless"):
        assert option in text
    for command in ("bench", "replay", "export-trace", "stats", "models"):
        assert f"amusd-viz {command}" in text
    assert "default: amusd" in text and "bfloat16 on a CPU" in text
    bench = build_command_parser("bench").format_help()
    for option in ("--prompts", "--max-new-tokens", "--strategies", "--json", "--repeats",
                   "--lookahead"):
        assert option in bench
    assert "-o" in build_command_parser("export-trace").format_help()
    assert "--speed" in build_command_parser("replay").format_help()


@pytest.mark.parametrize("args, needle", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "-4"], "--max-new-tokens"),
    (["--max-new-tokens", "ten"], "whole number"),
    (["--lookahead", "0"], "--lookahead"),
    (["--strategy", "turbo"], "--strategy"),
    (["--dtype", "int4"], "--dtype"),
    (["--prompt", "a", "--prompt-file", "b"], "not allowed with"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["replay", "x.jsonl", "--speed", "0"], "--speed"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--seed", "1.5"], "--seed"),
    (["--seed", "x"], "--seed"),
    (["--seed", str(2**32)], "2^32 - 1"),  # torch keeps 32 bits: it would repeat seed 0
    (["--acceptance", "maybe", "--temperature", "1"], "--acceptance"),
    (["bench", "--temperature", "-1"], "--temperature"),
    (["--spec-cache", "maybe"], "--spec-cache"),
    (["--adaptive", "yes"], "--adaptive"),
    (["bench", "--spec-cache", "1"], "--spec-cache"),
])
def test_bad_option_values_exit_2_with_one_line(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_prompt_file_problems(tmp_path, capsys):
    assert main(["--headless", "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["--headless", "--prompt-file", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err


def test_unknown_model_suggests_close_names(capsys):
    assert main(["--headless", "--draft", "tinylama"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'tinylama'" in err and "tinyllama" in err and "amusd-viz models" in err


def test_missing_devices(capsys):
    assert main(["--headless", "--target-device", "cpu:999"]) == 2
    assert "no core 999" in capsys.readouterr().err
    assert main(["--headless", "--draft-device", "cuda:3"]) == 2
    assert "cuda:3" in capsys.readouterr().err
    assert main(["--headless", "--target-device", "tpu"]) == 2
    assert "not a device" in capsys.readouterr().err


def test_unwritable_output_folder(tmp_path, capsys):
    assert main(["--headless", "--events", str(tmp_path / "no" / "such" / "log.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_errors_reach_the_terminal_without_traceback():
    out = run_cli("--headless", "--max-new-tokens", "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    out = run_cli("stats", "/nonexistent/log.jsonl")
    assert out.returncode == 2 and "no such event log" in out.stderr and "Traceback" not in out.stderr


def test_models_json_lists_the_default_pair(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        assert {"name", "source", "path", "available", "default_role"} <= row.keys()
        assert isinstance(row["available"], bool)
    assert by_name["qwen-coder-0.5b"]["default_role"] == "draft"
    assert by_name["qwen-coder-1.5b"]["default_role"] == "target"
    assert {"tinyllama", "llama-7b", "llama-3.2-1b", "llama-3.1-8b"} <= by_name.keys()


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "qwen-coder-1.5b" in out and "available" in out


# the typed run configuration ------------------------------------------------------------------

def test_the_cli_builds_one_resolved_run_config(tmp_path):
    from amusd_viz.cli import build_run_config

    args = build_run_parser().parse_args(["--strategy", "sync", "--lookahead", "3", "--dtype",
                                          "float32", "--events", str(tmp_path / "e.jsonl"),
                                          "--prompt", "hi"])
    cfg = build_run_config(args)
    assert cfg.strategy == "sync" and cfg.lookahead == 3 and cfg.prompt == "hi"
    assert cfg.target_device == "cpu" and cfg.draft_device == "cpu"  # sync: every core
    assert cfg.draft_quant == "int8"  # auto, on a CPU
    assert cfg.kv_cache == "dynamic"  # auto, on a CPU
    static = build_run_config(build_run_parser().parse_args(["--kv-cache", "static"]))
    assert static.kv_cache == "static" and static.log_config()["kv_cache"] == "static"
    header = cfg.log_config()
    assert header["events"] == str(tmp_path / "e.jsonl") and "faults" not in header
    with pytest.raises(Exception, match="frozen"):
        cfg.lookahead = 4  # type: ignore[misc]


def test_a_rerun_with_another_strategy_resolves_its_own_devices():
    from amusd_viz.config import RunConfig
    from amusd_viz.engine.devices import resolve_run

    amusd = resolve_run(RunConfig(strategy="amusd"))
    assert (amusd.target_device, amusd.draft_device) == ("cpu:0", "cpu:1")
    ar = resolve_run(amusd.with_strategy("ar"))
    assert (ar.target_device, ar.draft_device) == ("cpu", None)


def test_draft_quantization_follows_the_device_the_draft_runs_on(monkeypatch):
    """sync loads the draft beside the target unless given a device per model: with the target
    on a GPU, `auto` must not pick int8; a GPU target with a CPU-core draft is amusd's (its own
    worker), never sync's one process taking turns on mixed kinds."""
    from amusd_viz.config import RunConfig
    from amusd_viz.engine import devices
    from amusd_viz.errors import UserError

    monkeypatch.setattr(devices, "cuda_count", lambda: 2)
    sync = devices.resolve_run(RunConfig(strategy="sync", target_device_option="cuda"))
    assert (sync.target_device, sync.draft_device) == ("cuda:0", "cuda:0")  # one device
    assert sync.draft_quant == "none"
    two = devices.resolve_run(RunConfig(strategy="sync", target_device_option="cuda:0",
                                        draft_device_option="cuda:1"))
    assert (two.draft_device, two.draft_quant) == ("cuda:1", "none")
    with pytest.raises(UserError, match="mix kinds"):
        devices.resolve_run(RunConfig(strategy="sync", target_device_option="cuda",
                                      draft_device_option="cpu:1"))
    amusd = devices.resolve_run(RunConfig(strategy="amusd", target_device_option="cuda:0",
                                          draft_device_option="cpu:1"))
    assert amusd.draft_quant == "int8"  # its own worker, on a CPU core
    with pytest.raises(UserError, match="CPU devices only"):
        devices.resolve_run(RunConfig(strategy="sync", target_device_option="cuda:0",
                                      draft_quant_option="int8"))


def test_bench_plan_checks_strategies_and_prompts(tmp_path):
    from amusd_viz.bench import plan_runs
    from amusd_viz.config import BenchConfig, RunConfig
    from amusd_viz.errors import UserError

    with pytest.raises(UserError, match="unknown strategy 'turbo'"):
        plan_runs(BenchConfig(run=RunConfig(), strategies=("sync", "turbo")), 0, [0, 1])
    plan = plan_runs(BenchConfig(run=RunConfig(), strategies=("sync", "amusd"),
                                 lookaheads=(2, 4), kinds=("code",), limit=2), 0, [0, 1])
    assert [r.label for r in plan.runs] == ["ar", "sync@2", "sync@4", "amusd@2", "amusd@4"]
    assert len(plan.prompts) == 2 and {p.kind for p in plan.prompts} == {"code"}
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": 1}\n')
    with pytest.raises(UserError, match="non-empty"):
        plan_runs(BenchConfig(run=RunConfig(), prompts=bad), 0, [0, 1])
    with pytest.raises(UserError, match="no prompts left"):
        plan_runs(BenchConfig(run=RunConfig(), kinds=("poetry",)), 0, [0, 1])


def test_bench_report_prints_one_table_for_one_kind():
    import io

    from rich.console import Console

    from amusd_viz.bench import Result, summarize
    from amusd_viz.bench_report import print_report

    def result(strategy, ms):
        return Result(strategy, "p1", "code", 0, 10, ms / 100, ms, list(range(10)),
                      busy={"target@cpu": 0.9})

    results = [result("ar", 200.0), result("sync", 100.0)]
    s = summarize(results, ["ar", "sync"])
    assert s["overall"]["sync"]["speedup_vs_ar"] == 2.0
    report = {"summary": s["overall"], "by_kind": s["by_kind"], "lossless": [],
              "settings": {"dtype": "float32"}}
    out = io.StringIO()
    print_report(report, Console(file=out, width=120))
    text = out.getvalue()
    assert text.count("ms/token") == 1  # one kind: the table is printed once
    assert "pass times, and ms per token with no waste" in text
    assert "2.00x" in text and "lossless vs ar (greedy): 0 identical" in text
    assert "paired: sync's time per token" in text and "0.50x" in text  # ar against sync


def test_bench_plot_draws_a_png(tmp_path):
    from amusd_viz.bench_report import write_plot

    out = tmp_path / "curve.png"
    write_plot(out, {"ar": [0.1, 0.2, 0.3], "amusd": [0.05, 0.1]}, "tokens against time")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_acceptance_without_temperature_is_one_clear_line(capsys):
    assert main(["--headless", "--acceptance", "rejection"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--acceptance rejection needs --temperature above 0" in err
    assert len(err.splitlines()) == 1


def test_sampling_options_reach_the_run_config():
    from amusd_viz.cli import build_run_config

    args = build_run_parser().parse_args(["--temperature", "0.8", "--top-p", "0.9",
                                          "--top-k", "40", "--seed", "7"])
    cfg = build_run_config(args)
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed) == (0.8, 0.9, 40, 7)
    assert cfg.acceptance_rule == "coupled"  # the default rule when sampling
    assert cfg.log_config()["seed"] == 7
    fresh = {build_run_config(build_run_parser().parse_args(["--temperature", "1"])).seed
             for _ in range(5)}
    assert len(fresh) > 1  # a fresh random seed when none is given
    greedy = build_run_config(build_run_parser().parse_args([]))
    assert greedy.acceptance_rule == "greedy" and greedy.sampling.greedy


@pytest.mark.parametrize(("args", "needle"), [
    (["--headles"], "--headles"),  # no abbreviations: a typo must not start a model run
    (["stat", "x.jsonl"], "did you mean `amusd-viz stats`"),
    (["frobnicate"], "commands: bench"),
])
def test_typos_exit_2_with_a_hint_instead_of_running(args, needle, capsys):
    code = None
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
