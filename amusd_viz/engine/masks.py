"""A pass's attention mask, sent as four small integer rows and built on the model's device.

Every query row of a pass sees the keys in slots [0, below) and those in [lo, hi]: a main-line
row sees every slot up to its own (lo > hi: no band); a tree path's row sees the line before its
anchor and its own path up to itself; a padding row of a fixed-size pass (engine/static_runner.py)
sees every slot up to its own, as a main row does: never all-masked, so it stays finite, and no
real row sees it. Four numbers per row (position, below, lo, hi) travel to the device in one copy
of a few hundred bytes, and the mask, as wide as the cache line, is built there: a CUDA graph
builds it inside the replay (engine/graphs.py), so no [rows x line] mask crosses the bus.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POSITION, BELOW, LO, HI = range(4)


def pass_rows(keep: int, n: int, paths: Sequence[tuple[int, list[int]]] = (),
              pad_to: int = 0) -> torch.Tensor:
    """[4, rows] int64 on the host: each query row's position and the keys it sees, for `n` fed
    tokens after `keep` cached ones, then the paths' tokens, then padding rows up to `pad_to`."""
    table: list[tuple[int, int, int, int]] = [(keep + i, keep + i + 1, 0, -1) for i in range(n)]
    row = n  # the query row of a path's first token; its key sits at keep + row
    for anchor, tokens in paths:
        table += [(anchor + j, anchor, keep + row, keep + row + j) for j in range(len(tokens))]
        row += len(tokens)
    table += [(keep + r, keep + r + 1, 0, -1) for r in range(len(table), pad_to)]
    return torch.tensor(table, dtype=torch.long).T.contiguous()


def allowed(rows: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, width] booleans: which keys each row sees (built where `rows` lives)."""
    cols = torch.arange(width, device=rows.device)[None]
    below, lo, hi = rows[BELOW, :, None], rows[LO, :, None], rows[HI, :, None]
    return (cols < below) | ((cols >= lo) & (cols <= hi))


def mask_inputs(rows: torch.Tensor, width: int, model) -> dict:
    """position_ids and a 4D attention mask from device-side `rows`, as this model's attention
    takes it (sdpa: the boolean mask; eager: an additive one)."""
    seen = allowed(rows, width)
    if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
        dtype = model.dtype if model.dtype.is_floating_point else torch.float32
        zero = torch.zeros((), dtype=dtype, device=rows.device)
        seen = torch.where(seen, zero, torch.finfo(dtype).min)
    return {"position_ids": rows[POSITION][None], "attention_mask": seen[None, None]}
