"""FlexAttention with the same mask, for the comparison every benchmark reports.

FlexAttention runs on a tile-major (GNA-permuted) token order: tokens are laid out tile by
tile (each tile a box of the grid), so that its 128-token blocks are our tiles. The
`mask_mod` is generated from the IR (it decodes a permuted index back to grid coordinates
and applies maskdsl's rule); the BlockMask is built from the exact closed-form tile
classification (maskdsl.analysis), which is what `create_block_mask` would compute by
evaluating the mask_mod over all L x L pairs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from maskdsl import ir
from maskdsl.analysis import mask_box_counts


def tile_permutation(shape: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    """perm[p] = row-major token index at tile-major position p (-1 for padding of ragged tiles)."""
    grids = [math.ceil(n / t) for n, t in zip(shape, tile)]
    tile_ids = torch.arange(math.prod(grids))
    inner = torch.arange(math.prod(tile))
    tc = _unravel(tile_ids, grids)
    ic = _unravel(inner, tile)
    coords = [tc[d].view(-1, 1) * tile[d] + ic[d].view(1, -1) for d in range(len(shape))]
    valid = torch.ones_like(coords[0], dtype=torch.bool)
    flat = torch.zeros_like(coords[0])
    for d, n in enumerate(shape):
        valid &= coords[d] < n
        flat = flat * n + coords[d]
    return torch.where(valid, flat, -1).reshape(-1)


def _unravel(idx: torch.Tensor, dims) -> list[torch.Tensor]:
    out = []
    for n in reversed(dims):
        out.append(idx % n)
        idx = idx // n
    return out[::-1]


def _dim_rule(i, j, n, w, d, s, causal):
    """maskdsl.semantics.neighborhood_1d, elementwise on index tensors (torch.compile-friendly)."""
    same = (i % d) == (j % d)
    g = i % d
    gi, gj = i // d, j // d
    glen = (n - g + d - 1) // d
    if causal:
        leader = torch.minimum((gi // s) * s + s - 1, glen - 1)
        return same & (gj <= gi) & (leader - gj < w)
    leader = torch.minimum((gi // s) * s + s // 2, glen - 1)
    start = torch.minimum(torch.clamp(leader - w // 2, min=0), glen - w)
    return same & (gj >= start) & (gj < start + w)


def make_mask_mod(expr: ir.MaskExpr, shape: tuple[int, ...], perm: torch.Tensor):
    """A FlexAttention mask_mod over tile-major positions, for the static mask `expr`."""
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]

    def coords(flat):
        return [(flat // st) % n for st, n in zip(strides, shape)]

    def evaluate(e, qf, kf):
        if isinstance(e, ir.Neighborhood):
            qc, kc = coords(qf), coords(kf)
            out = None
            for d, n in enumerate(shape):
                m = _dim_rule(qc[d], kc[d], n, e.window[d], e.dilation[d], e.stride[d], e.causal[d])
                out = m if out is None else out & m
            return out
        if isinstance(e, ir.Causal):
            return qf >= kf
        if isinstance(e, ir.Full):
            return qf >= 0
        if isinstance(e, ir.Sink):
            return (qf < e.n) | (kf < e.n)
        parts = [evaluate(t, qf, kf) for t in e.terms]
        out = parts[0]
        for p in parts[1:]:
            out = out | p if isinstance(e, ir.Union_) else out & p
        return out

    def mask_mod(b, h, q_idx, kv_idx):
        qf, kf = perm[q_idx], perm[kv_idx]
        return evaluate(expr, qf, kf) & (qf >= 0) & (kf >= 0)

    return mask_mod


def tile_boxes(shape, tile) -> np.ndarray:
    """[tiles, rank, 2] start/stop of every tile, in tile-major (row-major over the tile grid) order."""
    grids = [math.ceil(n / t) for n, t in zip(shape, tile)]
    ids = np.arange(math.prod(grids))
    boxes = np.zeros((len(ids), len(shape), 2), dtype=np.int64)
    rem = ids.copy()
    for d in reversed(range(len(shape))):
        c = rem % grids[d]
        rem //= grids[d]
        boxes[:, d, 0] = c * tile[d]
        boxes[:, d, 1] = np.minimum(c * tile[d] + tile[d], shape[d])
    return boxes


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

    def __init__(self, mask: ir.MaskDef, tile: tuple[int, ...], device, compile: bool = True):
        from torch.nn.attention.flex_attention import flex_attention

        shape = mask.layout.shape
        self.perm = tile_permutation(shape, tile).to(device)
        self.valid = self.perm >= 0
        self.gather = torch.where(self.valid, self.perm, 0)
        self.mask_mod = make_mask_mod(mask.expr, shape, self.perm)
        self.block_mask = block_mask_from_analysis(mask.expr, shape, tile, device, self.mask_mod)
        self.flex = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
        self.tile = tile
        self.tokens = mask.layout.tokens

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, self.gather] * self.valid.view(1, 1, -1, 1).to(x.dtype)

    def attend_permuted(self, qp, kp, vp):
        gqa = qp.shape[1] != kp.shape[1]
        return self.flex(qp, kp, vp, block_mask=self.block_mask, enable_gqa=gqa)

    def __call__(self, q, k, v):
        out_p = self.attend_permuted(self.permute(q), self.permute(k), self.permute(v))
        out = torch.empty_like(q)
        out[:, :, self.perm[self.valid]] = out_p[:, :, self.valid]
        return out
