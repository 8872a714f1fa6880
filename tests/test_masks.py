"""The pass mask built from four integers per row (engine/masks.py) against the tree it stands
for: each real row sees exactly its token's ancestors and itself, at its token's depth; padding
rows see every slot up to their own and no real row sees them."""

from __future__ import annotations

import pytest
import torch

from amusd_viz.engine import masks

CASES = [  # keep, n, paths, pad_to
    (0, 5, (), 0),
    (7, 1, (), 0),
    (7, 3, (), 8),
    (4, 4, ((6, [50]), (5, [51, 52, 53])), 0),
    (4, 4, ((6, [50]), (8, [54, 55])), 16),
    (0, 2, ((1, [60, 61]),), 4),
]


def slots_of(keep, n, paths):
    """Each fed slot's parent slot and position: the main line goes on from keep; a path's first
    token stands in place of seq[anchor] (its parent is anchor - 1), the rest follow it."""
    parent = {keep + i: keep + i - 1 for i in range(n)}
    position = {keep + i: keep + i for i in range(n)}
    slot = keep + n
    for anchor, tokens in paths:
        for j in range(len(tokens)):
            parent[slot], position[slot] = (anchor - 1 if j == 0 else slot - 1), anchor + j
            slot += 1
    return parent, position


def ancestors(slot, parent, keep):
    seen = {slot}
    while slot in parent and parent[slot] >= 0:
        slot = parent[slot]
        seen.add(slot)
        if slot < keep:  # cached slots are the line itself: all of them before
            seen.update(range(slot))
            break
    return seen


@pytest.mark.parametrize("keep,n,paths,pad_to", CASES)
def test_each_row_sees_its_ancestors_and_padding_stays_apart(keep, n, paths, pad_to):
    width = 40
    rows = masks.pass_rows(keep, n, paths, pad_to)
    seen = masks.allowed(rows, width)
    parent, position = slots_of(keep, n, paths)
    real = len(parent)
    assert rows.shape == (4, max(real, pad_to))
    for r in range(rows.shape[1]):
        slot = keep + r
        if r < real:
            want = ancestors(slot, parent, keep)
            assert rows[masks.POSITION, r] == position[slot]
        else:  # padding: every slot up to its own, at its slot's position
            want = set(range(slot + 1))
            assert rows[masks.POSITION, r] == slot
        assert set(torch.nonzero(seen[r]).flatten().tolist()) == want, r
    assert not seen[:real, keep + real:].any()  # no real row sees padding
    assert seen.any(dim=1).all()  # never all-masked


def test_the_additive_mask_of_eager_attention_hides_what_the_boolean_one_does():
    class Config:
        _attn_implementation = "eager"

    class Model:
        config, dtype = Config(), torch.float32

    rows = masks.pass_rows(3, 2, ((4, [9]),), 4)
    inputs = masks.mask_inputs(rows, 12, Model())
    additive = inputs["attention_mask"][0, 0]
    assert torch.equal(additive == 0, masks.allowed(rows, 12))
    assert (additive[additive != 0] == torch.finfo(torch.float32).min).all()
    assert inputs["position_ids"].tolist() == [rows[masks.POSITION].tolist()]
