"""Packed CPU linear layers (engine/kernels.py) must change speed only, never a single number."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from amusd_viz.engine.kernels import PackedLinear, pack_linears


def _load(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _linears(model, kind):
    return sum(1 for m in model.modules() if type(m) is kind)


def test_packed_model_gives_identical_logits_and_tokens(tiny_models):
    plain = _load(tiny_models["target"], torch.bfloat16)
    packed = copy.deepcopy(plain)
    n_linear = _linears(plain, nn.Linear)
    swapped = pack_linears(packed)
    if swapped == 0:
        pytest.skip("this torch build or CPU has no oneDNN packed linear")
    assert swapped == n_linear and _linears(packed, PackedLinear) == n_linear
    assert _linears(packed, nn.Linear) == 0
    ids = torch.randint(3, 98, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        assert torch.equal(plain(ids).logits, packed(ids).logits)
        kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert torch.equal(plain.generate(ids, **kw), packed.generate(ids, **kw))


def test_float32_models_are_never_touched(tiny_models):
    model = _load(tiny_models["target"], torch.float32)
    before = _linears(model, nn.Linear)
    assert pack_linears(model) == 0
    assert _linears(model, nn.Linear) == before and _linears(model, PackedLinear) == 0


def test_a_layer_whose_packed_output_differs_stays_plain(monkeypatch, tiny_models):
    model = _load(tiny_models["target"], torch.bfloat16)
    n_linear = _linears(model, nn.Linear)
    # a packed kernel that is off by one ulp somewhere must not be used
    real_forward = PackedLinear.forward
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: real_forward(self, x) * 1.0078125)
    assert pack_linears(model) == 0
    assert _linears(model, nn.Linear) == n_linear
