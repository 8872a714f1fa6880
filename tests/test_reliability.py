"""Faults: a dying draft, a dying target, Ctrl+C and SIGTERM, on tiny models through the real
command line. No orphan process survives any of them, and the event log stays valid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amusd_viz.engine.session import Engine, EngineConfig
from amusd_viz.errors import RunFailed
from amusd_viz.eventlog import read_log
from amusd_viz.events import EventList


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def cli(tiny_models, *extra, max_new=300):
    return [sys.executable, "-m", "amusd_viz", "--headless", "--dtype", "float32",
            "--draft-quant", "none", "--draft", str(tiny_models["draft_far"]),
            "--target", str(tiny_models["target"]), "--prompt", "hello world",
            "--max-new-tokens", str(max_new), *extra]


def worker_pids(log_path: Path, timeout=60.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists():
            pids = {}
            for line in log_path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if e.get("type") == "worker_ready":
                    pids[e["role"]] = e["pid"]
            if len(pids) == 2:
                return pids
        time.sleep(0.1)
    raise AssertionError("workers never became ready")


@pytest.mark.parametrize("devices", [(), ("--target-device", "cpu:0", "--draft-device", "cpu:0")],
                         ids=["two-cores", "one-shared-core"])
def test_killing_the_draft_keeps_every_token(tiny_models, tmp_path, devices):
    """On a shared device too: a draft killed holding the device turn or the baton must not
    stall the target (it goes on alone within a poll, not half a second per pass)."""
    events = tmp_path / "run.jsonl"
    proc = subprocess.Popen(cli(tiny_models, "--events", str(events), "--max-new-tokens", "400",
                                *devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = worker_pids(events)
    deadline = time.monotonic() + 60
    while sum(1 for line in events.read_text().splitlines() if '"token_committed"' in line) < 20:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    os.kill(pids["draft"], signal.SIGKILL)
    killed_at = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    # ~380 tiny solo passes take a second or two; 0.5 s each would be minutes
    assert time.monotonic() - killed_at < 30
    assert summary["new_tokens"] == 400 and summary["draft_lost"] is True
    log = read_log(events)
    lost = [e for e in log.events if e.type == "worker_lost"]
    assert lost and lost[0].role == "draft"
    commits = [e.pos for e in log.events if e.type == "token_committed"]
    assert commits == list(range(400))
    assert _wait_gone(pids.values()) == []
    # the target decoded alone after the loss: the text is still the target's own
    ar = subprocess.run(cli(tiny_models, "--strategy", "ar", "--max-new-tokens", "400"),
                        capture_output=True, text=True, timeout=120)
    assert summary["token_ids"] == json.loads(ar.stdout)["token_ids"]


def test_killing_the_target_ends_the_run_with_an_error(tiny_models, tmp_path):
    events = tmp_path / "run.jsonl"
    proc = subprocess.Popen(cli(tiny_models, "--events", str(events), "--max-new-tokens", "5000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = worker_pids(events)
    time.sleep(0.5)
    os.kill(pids["target"], signal.SIGKILL)
    start = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 20
    assert proc.returncode == 1
    assert "target worker" in err and "Traceback" not in err
    log = read_log(events)  # valid up to the failure
    assert any(e.type == "error" and e.role == "target" for e in log.events)
    assert _wait_gone(pids.values()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_stops_everything(tiny_models, tmp_path, sig):
    events = tmp_path / "run.jsonl"
    proc = subprocess.Popen(cli(tiny_models, "--events", str(events), "--max-new-tokens", "5000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = worker_pids(events)
    time.sleep(0.5)
    proc.send_signal(sig)
    start = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 10
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert _wait_gone(pids.values()) == []
    read_log(events)  # still a valid log


def _spawned_workers(pid: int) -> list[int]:
    """The multiprocessing workers (spawn_main) among the children of `pid`."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                              text=True).stdout.split()
    workers = []
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            workers.append(int(child))
    return workers


def test_interrupt_while_loading(tiny_models, tmp_path):
    """Ctrl+C while both workers load their models: exit 130, both workers gone."""
    proc = subprocess.Popen(cli(tiny_models), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while len(workers := _spawned_workers(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "workers never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert _wait_gone(workers) == []


def test_stalled_target_is_treated_as_lost(tiny_models):
    """A worker that stops making progress (SIGSTOP) fails the run after --stall-timeout."""
    sink = EventList()
    engine = Engine(EngineConfig("amusd", str(tiny_models["target"]), str(tiny_models["draft_far"]),
                                 "cpu:0", "cpu:1", "float32", stall_timeout=3.0), sink)
    try:
        engine.start()
        engine.wait_ready()
        os.kill(engine.pids()["target"], signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(RunFailed, match="no progress"):
            engine.generate([5, 6, 7], 2000, 3, frozenset())
        assert time.monotonic() - start < 15
    finally:
        engine.close()
    assert _wait_gone(engine.pids().values()) == []


def test_killing_the_coordinator_takes_its_workers_with_it(tiny_models, tmp_path):
    """SIGKILL leaves the coordinator no chance to clean up: the workers must still go (they
    asked Linux to kill them when their parent dies)."""
    events = tmp_path / "run.jsonl"
    proc = subprocess.Popen(cli(tiny_models, "--events", str(events), "--max-new-tokens", "5000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = worker_pids(events)
    time.sleep(0.5)
    proc.kill()
    proc.communicate(timeout=30)
    assert _wait_gone(pids.values(), timeout=5) == []
