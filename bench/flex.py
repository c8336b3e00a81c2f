"""FlexAttention with the same mask, for the comparison every benchmark reports.

FlexAttention runs on a tile-major (GNA-permuted) token order: tokens are laid out tile by tile
(each tile a box of the grid), so that its blocks are our tiles. Its `mask_mod` applies
maskdsl's own rule (`maskdsl.harness.semantics.attends`) to the grid coordinates of a tile-major position,
which it gets in one of two ways:

* ``arithmetic`` (the default, the strongest FlexAttention): decode the position with integer
  arithmetic (tile index and offset inside the tile, unravelled over the tile grid and the tile),
  as a FlexAttention user who knows the layout writes it; nothing is read from memory per element.
* ``gather``: look the row-major token up in the permutation (`perm[q_idx]`), one global load per
  element and operand; the generic form, kept as a second column.

The BlockMask is built from the exact closed-form tile classification (maskdsl.analysis.counts), which is
what `create_block_mask` would compute by evaluating the mask_mod over all L x L pairs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from maskdsl.spec import ir
from maskdsl.analysis.counts import mask_box_counts
from maskdsl.harness.semantics import attends, flat_coords, flat_index
from maskdsl.simulator.tiles import dim_intervals, permuted_boxes

FORMS = ("arithmetic", "gather")


def tile_grid(shape: tuple[int, ...], tile: tuple[int, ...]) -> list[int]:
    """Tiles per dimension (the last one ragged where the tile does not divide the extent)."""
    return [math.ceil(n / t) for n, t in zip(shape, tile)]


def tile_major_coords(pos, shape: tuple[int, ...], tile: tuple[int, ...]) -> list:
    """Grid coordinates of tile-major positions, by arithmetic (padding gives coordinates past the extent)."""
    volume = math.prod(tile)
    tiles = flat_coords(tuple(tile_grid(shape, tile)), pos // volume)
    inner = flat_coords(tuple(tile), pos % volume)
    return [tc * t + ic for tc, ic, t in zip(tiles, inner, tile)]


def tile_permutation(shape: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    """perm[p] = row-major token index at tile-major position p (-1 for padding of ragged tiles)."""
    positions = torch.arange(math.prod(tile_grid(shape, tile)) * math.prod(tile))
    coords = tile_major_coords(positions, shape, tile)
    valid = _inside(coords, shape)
    return torch.where(valid, flat_index(shape, coords), -1)


def _inside(coords, shape):
    out = None
    for c, n in zip(coords, shape):
        out = (c < n) if out is None else out & (c < n)
    return out


def make_mask_mod(expr: ir.MaskExpr, shape: tuple[int, ...], tile: tuple[int, ...], form: str = "arithmetic",
                  perm: torch.Tensor | None = None):
    """A FlexAttention mask_mod over tile-major positions for the static mask `expr`.

    `form` says how a position becomes grid coordinates (module docstring); ``gather`` reads `perm`
    (`tile_permutation(shape, tile)` on the attention's device, built here when not given).
    Padding positions of ragged tiles attend nothing and are attended by nothing.
    """
    if form == "arithmetic":
        def coords(pos):
            c = tile_major_coords(pos, shape, tile)
            return c, _inside(c, shape)
    elif form == "gather":
        table = tile_permutation(shape, tile) if perm is None else perm

        def coords(pos):
            flat = table[pos]
            return flat_coords(shape, flat), flat >= 0
    else:
        raise ValueError(f"unknown FlexAttention mask_mod form {form!r}; hint: use one of {', '.join(FORMS)}")

    def mask_mod(b, h, q_idx, kv_idx):
        qc, q_ok = coords(q_idx)
        kc, k_ok = coords(kv_idx)
        return attends(expr, shape, qc, kc) & q_ok & k_ok

    return mask_mod


def tile_boxes(shape, tile) -> np.ndarray:
    """[tiles, rank, 2] start/stop of every tile, in tile-major order (the simulator's undilated layout)."""
    return permuted_boxes([dim_intervals(n, t) for n, t in zip(shape, tile)])


def block_mask_from_analysis(expr: ir.MaskExpr, shape, tile, device, mask_mod):
    """FlexAttention's BlockMask from the closed-form counts: partial and full key blocks per query block."""
    from torch.nn.attention.flex_attention import BlockMask

    boxes = tile_boxes(shape, tile)
    counts = torch.from_numpy(mask_box_counts(expr, shape, boxes, boxes))
    sizes = torch.from_numpy(np.prod(boxes[:, :, 1] - boxes[:, :, 0], axis=1))
    full = counts == sizes.view(-1, 1) * sizes.view(1, -1)
    partial = (counts > 0) & ~full

    def pack(sel):
        num = sel.sum(1).to(torch.int32)
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return num.view(1, 1, -1).to(device), order.view(1, 1, *order.shape).to(device)

    kv_num, kv_idx = pack(partial)
    full_num, full_idx = pack(full)
    block = math.prod(tile)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(len(boxes) * block, len(boxes) * block))


class FlexRunner:
    """FlexAttention on tile-major tokens: permute once, run compiled flex_attention, un-permute."""

    def __init__(self, mask: ir.MaskDef, tile: tuple[int, ...], device, compile: bool = True,
                 form: str = "arithmetic"):
        from torch.nn.attention.flex_attention import flex_attention

        shape = mask.layout.shape
        self.perm = tile_permutation(shape, tile).to(device)
        self.valid = self.perm >= 0
        self.gather = torch.where(self.valid, self.perm, 0)
        self.mask_mod = make_mask_mod(mask.expr, shape, tile, form, self.perm)
        self.block_mask = block_mask_from_analysis(mask.expr, shape, tile, device, self.mask_mod)
        self.flex = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
        self.tile = tile
        self.form = form
        self.tokens = mask.layout.tokens

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, self.gather] * self.valid.view(1, 1, -1, 1).to(x.dtype)

    def attend_permuted(self, qp, kp, vp):
        gqa = qp.shape[1] != kp.shape[1]
        return self.flex(qp, kp, vp, block_mask=self.block_mask, enable_gqa=gqa)

    def unpermute(self, out_p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(like)
        out[:, :, self.perm[self.valid]] = out_p[:, :, self.valid]
        return out

    def __call__(self, q, k, v):
        return self.unpermute(self.attend_permuted(self.permute(q), self.permute(k), self.permute(v)), q)
