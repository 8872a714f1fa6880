"""JSONL event logs: writing as a run goes, reading back with clear errors. No torch, no textual."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from amusd_viz import __version__
from amusd_viz.errors import UserError
from amusd_viz.events import EVENT_TYPES, SCHEMA_VERSION, Header, RunFinished, _Event, event_adapter

_PACKAGES = ("torch", "transformers", "textual", "pydantic", "plotext")


def machine_info() -> dict:
    info: dict = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    gpus = _nvidia_gpus()
    if gpus:
        info["gpus"] = gpus
    return info


def _nvidia_gpus() -> list[str]:
    """Name, memory and driver of each NVIDIA GPU (from nvidia-smi: no torch here); the CUDA
    version torch uses is in each worker's worker_ready event."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def make_header(config: dict | None = None) -> Header:
    return Header(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        amusd_viz=__version__,
        machine=machine_info(),
        packages=package_versions(),
        config=config or {},
    )


class JsonlRecorder:
    """An event sink that appends one JSON object a line and flushes each, so a crash leaves a
    valid log up to the crash."""

    def __init__(self, path: str | os.PathLike, header: Header) -> None:
        self.path = Path(path)
        try:
            # open for the recorder's lifetime; close() ends it
            self._file: IO[str] = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise UserError(f"cannot write the event log {self.path}: {exc.strerror}. "
                            "Choose a writable path with --events.") from None
        self._write(header.model_dump(mode="json"))

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._file.flush()

    def emit(self, event: _Event) -> None:
        if not self._file.closed:
            self._write(event.model_dump(mode="json"))

    def close(self) -> None:
        self._file.close()


@dataclass
class EventLog:
    header: Header
    events: list[_Event]
    warnings: list[str] = field(default_factory=list)


def read_log(path: str | os.PathLike) -> EventLog:
    """Read and validate a log. A bad line is a UserError naming its line number; a torn last
    line (a crash mid-write) is dropped with a warning."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"no such event log: {path}. Record one with --events FILE.") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not an amusd-viz event log (not UTF-8 text: a binary "
                        "file?). Pass a log written with --events FILE.") from None
    except OSError as exc:
        raise UserError(f"cannot read the event log {path}: {exc.strerror or exc}") from None
    return parse_log(raw, str(path))


def parse_log(raw: str, name: str = "<log>") -> EventLog:
    lines = raw.splitlines()
    torn_tail = bool(raw) and not raw.endswith("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UserError(f"{name} is empty: it is not an amusd-viz event log.")
    warnings: list[str] = []

    def load(lineno: int, text: str) -> dict | None:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if lineno == len(lines) and torn_tail:
                warnings.append(f"{name}:{lineno}: the last line is cut short (a crash?); "
                                "using the events before it")
                return None
            raise UserError(f"{name}:{lineno}: not valid JSON ({exc.msg}). "
                            "Is this an amusd-viz event log?") from None
        if not isinstance(obj, dict):
            raise UserError(f"{name}:{lineno}: expected a JSON object, got {type(obj).__name__}.")
        return obj

    first = load(1, lines[0])
    if first is None or first.get("type") != "header":
        raise UserError(f"{name}:1: missing header line (type 'header' with schema_version). "
                        "Is this an amusd-viz event log?")
    version = first.get("schema_version")
    if not isinstance(version, int):
        raise UserError(f"{name}:1: the header has no integer schema_version.")
    if version > SCHEMA_VERSION:
        raise UserError(f"{name}:1: schema_version {version} is newer than this amusd-viz reads "
                        f"({SCHEMA_VERSION}). Upgrade amusd-viz to read it.")
    try:
        header = Header.model_validate(first)
    except ValidationError as exc:
        raise UserError(f"{name}:1: bad header: {_first_problem(exc)}") from None

    events: list[_Event] = []
    for lineno, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        obj = load(lineno, text)
        if obj is None:
            break
        kind = obj.get("type")
        if kind not in EVENT_TYPES:
            raise UserError(f"{name}:{lineno}: unknown event type {kind!r}. Known types: "
                            f"{', '.join(sorted(EVENT_TYPES))}.")
        try:
            events.append(event_adapter.validate_python(obj))
        except ValidationError as exc:
            if lineno == len(lines) and torn_tail:
                warnings.append(f"{name}:{lineno}: the last event is incomplete; ignoring it")
                break
            raise UserError(f"{name}:{lineno}: bad {kind} event: {_first_problem(exc)}") from None
    if not any(isinstance(e, RunFinished) for e in events):
        warnings.append(f"{name}: the run has no run_finished event (stopped early?)")
    return EventLog(header=header, events=events, warnings=warnings)


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = list(err.get("loc", ()))
    if loc and loc[0] in EVENT_TYPES:  # pydantic prefixes the union's tag
        loc = loc[1:]
    where = ".".join(str(p) for p in loc) or "event"
    return f"{where}: {err.get('msg', 'invalid')}"


def save_run(events: list, folder: str | os.PathLike, strategy: str) -> tuple[Path, Path]:
    """Write a run's events (with a header) and its Perfetto trace next to each other."""
    from amusd_viz.trace import to_trace

    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(folder) / f"amusd-viz-{strategy or 'run'}-{stamp}"
    log_path, trace_path = base.with_suffix(".jsonl"), base.with_suffix(".trace.json")
    recorder = JsonlRecorder(log_path, make_header({"saved_from": "tui"}))
    for event in events:
        recorder.emit(event)
    recorder.close()
    trace_path.write_text(json.dumps(to_trace(events)), encoding="utf-8")
    return log_path, trace_path
