"""Faster CPU linear layers for bfloat16 models, with the same numbers.

torch's CPU `F.linear` in bf16 runs oneDNN but re-lays the weight out for it on every call; for a
one-token decode step that reordering costs about as much as the product itself. oneDNN's
prepacked path (`mkldnn._reorder_linear_weight` once, then `mkldnn._linear_pointwise`, the pair
torch's own compiler emits for frozen CPU linears) skips it: 1.3-1.5x per layer on one Zen 4
core. Packing is checked at load time: a layer whose packed output is not bit-identical to
`F.linear` on a probe input is left alone, and without the ops nothing changes at all. float32
models are never touched (they are the bit-exact reference); float16 ones neither (not measured
here: Zen 4 has no fp16 matrix instructions).
"""

from __future__ import annotations

import torch
from torch import nn


def _ops_available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight is stored in oneDNN's blocked layout (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight), persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _identical(linear: nn.Linear, packed: PackedLinear) -> bool:
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(3, linear.in_features, generator=gen).to(linear.weight.dtype)
    with torch.inference_mode():
        return torch.equal(linear(probe), packed(probe))


def _pack_one(parent: nn.Module, name: str, linear: nn.Linear) -> bool:
    """Swap one layer for its packed twin if that gives the same outputs; in a function of its
    own so that no reference to the plain layer outlives the swap."""
    try:
        packed = PackedLinear(linear)
        same = _identical(linear, packed)
    except RuntimeError:  # this CPU or torch build cannot run it packed: keep the plain layer
        return False
    if same:
        setattr(parent, name, packed)
    return same


def pack_linears(model: nn.Module) -> int:
    """Swap every CPU bf16 `nn.Linear` of `model` for a `PackedLinear` that gives the same
    outputs. Returns how many were swapped (0 where the ops or the dtype do not apply).

    transformers memory-maps the checkpoint, and the unpacked weights stay resident for as long
    as any tensor still points into the file; so once something is packed, the rest (embeddings,
    norms) is copied out of the mapping and the process holds one copy of the model, not two."""
    if not _ops_available():
        return 0
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if (type(child) is nn.Linear and child.weight.device.type == "cpu"
                    and child.weight.dtype == torch.bfloat16):
                swaps.append((parent, name, child))
    done = 0
    while swaps:
        if _pack_one(*swaps.pop()):
            done += 1
    if done:
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                if not tensor.is_mkldnn:
                    tensor.data = tensor.data.clone()
    return done
