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
    assert "default: amusd" in text and "default: bfloat16" in text
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
