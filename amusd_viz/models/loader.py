"""Turn a resolved model into something transformers can load: a local directory or a hub id."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from amusd_viz.errors import UserError
from amusd_viz.models.registry import Resolved, hub_offline


def materialize(resolved: Resolved, log=lambda msg: print(msg, file=sys.stderr)) -> str:
    """A path (or, for a hub model, the hub id) ready for from_pretrained; converts the bundled
    pair on first use."""
    if resolved.source == "bundled":
        from amusd_viz.models.bundled import ensure_converted

        assert resolved.spec is not None
        resolved.path = ensure_converted(resolved.spec, log)
    if resolved.path is None:  # a hub model: download it once into the Hugging Face cache
        from huggingface_hub import snapshot_download

        assert resolved.hub_id is not None
        log(f"amusd-viz: downloading {resolved.hub_id} from the hub (once)")
        try:
            resolved.path = Path(snapshot_download(
                resolved.hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                 "*.jinja"]))
        except Exception as exc:
            raise UserError(f"cannot download {resolved.hub_id}: {str(exc).splitlines()[0]}. "
                            "Log in with `hf auth login` for gated models, or pass a local "
                            "directory.") from None
    return str(resolved.path)


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        offline = " (the hub is unreachable or HF_HUB_OFFLINE is set)" if hub_offline() else ""
        raise UserError(f"cannot load the tokenizer of {source}{offline}: {str(exc).splitlines()[0]} "
                        "Download the model where the hub is reachable, or pass a local directory.") from None


def _vocab_of(source: str) -> dict[str, int] | None:
    """The vocabulary straight from tokenizer.json (fast; no transformers import)."""
    path = Path(source) / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = dict(data.get("model", {}).get("vocab", {}) or {})
    if isinstance(vocab, list):  # unigram models store [piece, score] pairs
        vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    return vocab


def check_same_tokenizer(draft_name: str, draft_src: str, target_name: str, target_src: str,
                         draft_tok=None, target_tok=None) -> None:
    """Draft and target must give the same ids to the same text. Exit 2 naming both if not."""
    dv, tv = _vocab_of(draft_src), _vocab_of(target_src)
    if dv is None or tv is None:  # fall back on the loaded tokenizers
        draft_tok = draft_tok or load_tokenizer(draft_src)
        target_tok = target_tok or load_tokenizer(target_src)
        dv, tv = draft_tok.get_vocab(), target_tok.get_vocab()
    common = dv.keys() & tv.keys()
    differ = sum(1 for piece in common if dv[piece] != tv[piece])
    missing = len(dv.keys() ^ tv.keys())
    # Sizes may differ by a few special tokens; the shared pieces must map to the same ids.
    if differ or missing > max(64, len(tv) // 1000):
        raise UserError(
            f"draft {draft_name!r} and target {target_name!r} use different tokenizers "
            f"({differ} shared pieces with other ids, {missing} pieces in only one). Speculative "
            "decoding needs one vocabulary: pick a draft of the target's family (see `amusd-viz models`).")
