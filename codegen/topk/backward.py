"""Backward of top-k attention (S | (picked & R)): FlashAttention-2's split over the forward's selection.

The selection is not differentiated (as in NSA and MoBA): the picked blocks are a constant of
the backward, and every pair they (and S) attend gets its exact gradient. Three launches:

- preprocess: delta = rowsum(dO * O) per query row;
- dK/dV: one program per (key tile, batch x kv head); tiles are boxes of the grid dividing the
  block (codegen.topk.grid). It walks the query tiles that see its key tile: first S's, from a
  compile-time table that transposes S's closed-form per-query-tile key ranges per dimension (a
  term is a product, so the query tiles form a box of per-dimension intervals, a superset; the
  kernel re-checks each query tile with the forward's own bounds), then the query blocks that picked its key block, from the transposed
  pick list built here on the device. A pair already inside S's key range is left to the S walk,
  so each (query tile, key tile) pair is done once. The query heads of a GQA group are summed
  inside the program: no atomics, bitwise deterministic;
- dQ: one program per (query tile, batch x head), with the forward's loop structure.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton

from maskdsl.analysis.counts import products
from maskdsl.codegen.dispatch import interpreting
from maskdsl.codegen.cache import load_module
from maskdsl.codegen.render import kernel_key, render_template
from maskdsl.codegen.topk.backward_text import backward_context
from maskdsl.codegen.topk.grid import TopKGrid
from maskdsl.analysis.intervals import evaluate
from maskdsl.analysis.tiles import block_tile

TEMPLATE = "attention_topk_bwd.py.jinja"
MAX_TILE = 64


def static_query_tiles(rels, tokens: int, tile: int) -> np.ndarray:
    """int32 [terms, 2, key tiles]: per S term and key tile, an interval of query tiles holding every
    query tile whose key-tile range (the forward's [sa, sb]) contains that key tile.

    O(tokens): the per-row bounds come from maskdsl.analysis.intervals.evaluate, the tile bounds follow the
    kernel's formulas (first/last row of the tile, clipped to the term's query range). lo and hi are
    non-decreasing, so the interval is exact; it is a superset in any case, and the kernel re-checks.
    """
    tiles = math.ceil(tokens / tile)
    out = np.zeros((max(len(rels), 1), 2, tiles), dtype=np.int32)
    out[:, 1] = -1  # empty unless filled
    qt = np.arange(tiles)
    first = qt * tile
    last = np.minimum(first + tile, tokens) - 1
    for s, rel in enumerate(rels):
        lo, hi = evaluate(rel, tokens)
        qa, qb = rel.qa, rel.query_stop(tokens)
        tf, tl = np.maximum(first, qa), np.minimum(last, qb - 1)
        on = tf <= tl
        klo = np.where(on, lo[np.clip(tf, 0, tokens - 1)], 0)
        khi = np.where(on, hi[np.clip(tl, 0, tokens - 1)], -1)
        on &= klo <= khi
        a, b = klo[on] // tile, khi[on] // tile
        first_reaching = np.full(tiles + 1, tiles, dtype=np.int64)  # smallest query tile whose range ends at >= kt
        np.minimum.at(first_reaching, b, qt[on])
        out[s, 0] = np.minimum.accumulate(first_reaching[::-1])[::-1][:tiles]
        last_starting = np.full(tiles, -1, dtype=np.int64)  # largest query tile whose range starts at <= kt
        np.maximum.at(last_starting, a, qt[on])
        out[s, 1] = np.maximum.accumulate(last_starting)
    return out


def transpose_picks(idx: torch.Tensor, nblocks: int):
    """From idx [B, H, query blocks, k] (ascending key blocks, `nblocks` for unused slots) to, per
    (batch, head), the query blocks that picked each key block: (offsets int32 [B, H, nblocks + 1],
    query blocks int32 [B, H, query blocks * k]). Key block j's pickers are entries
    offsets[j] .. offsets[j + 1] - 1, in ascending order. O(query blocks * k), on idx's device:
    a stable sort by key block (FlexAttention transposes its block mask the same way).
    """
    batch, heads, nqb, k = idx.shape
    flat = idx.reshape(batch, heads, nqb * k).to(torch.int64)
    order = torch.sort(flat, dim=-1, stable=True)
    qblocks = (order.indices // k).to(torch.int32)
    edges = torch.arange(nblocks + 1, device=idx.device).expand(batch, heads, nblocks + 1).contiguous()
    offsets = torch.searchsorted(order.values.contiguous(), edges).to(torch.int32)
    return offsets.contiguous(), qblocks.contiguous()


def query_tile_table(term_rels, grid) -> np.ndarray:
    """int32 [terms, rank, 2, max tiles]: per S term, dimension d and key-tile coordinate c_d, the
    interval of query-tile coordinates whose key-tile range in dimension d holds c_d.

    A term is a product over dimensions, so the query tiles that visit key tile (c_0, ..) are the
    box of these intervals (a superset at worst; the kernel re-checks each with the forward's bounds).
    """
    width = max(grid.tiles)
    out = np.zeros((max(len(term_rels), 1), grid.rank, 2, width), dtype=np.int32)
    out[:, :, 1] = -1
    for d, (n, t) in enumerate(zip(grid.shape, grid.tile)):
        table = static_query_tiles([rels[d] for rels in term_rels], n, t)
        out[:len(term_rels), d, :, :table.shape[-1]] = table[:len(term_rels)]
    return out


class TopKBackward:
    """The rendered backward kernels of one CompiledTopKAttention, and their launch."""

    def __init__(self, fn):
        mask, form, cfg = fn.mask, fn.form, fn.config
        shape = mask.layout.shape
        # tiles of at most 64 tokens: a dK/dV program holds K, V, dK, dV for its key tile in registers, so the
        # forward's 128 would spill at head_dim 128. Cut from the forward's tile, it still divides the block.
        tile = block_tile(fn.grid.tile, MAX_TILE)
        self.fn = fn
        self.grid = TopKGrid(shape, form.topk.block, tile)
        s_terms = products(form.static, shape) if form.static is not None else []
        self.s_table = torch.from_numpy(query_tile_table([t.sym for t in s_terms], self.grid))
        self._tables: dict[torch.device, torch.Tensor] = {}
        context = backward_context(mask, form, cfg, self.grid)
        key = kernel_key(mask.content_hash(), f"{cfg.key()}:bwd{'x'.join(map(str, tile))}", TEMPLATE)
        self.module, self.source_path = load_module(key, lambda: render_template(TEMPLATE, **context))

    def launch(self, q, k, v, out, lse, dout, scale, dq, dk, dv, selection) -> None:
        picked, idx, count = selection
        for name, grad, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            if grad.shape != like.shape or grad.dtype != like.dtype or grad.stride(-1) != 1:
                raise ValueError(f"{name} must be {tuple(like.shape)} {like.dtype} with a contiguous last "
                                 f"dimension; got {tuple(grad.shape)} {grad.dtype}")
        if dout.shape != q.shape or out.shape != q.shape:
            raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must match q {tuple(q.shape)}")
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        lse = lse.contiguous()
        batch, heads, tokens, dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        m = self.module
        tiles = math.prod(self.grid.tiles)
        pad = triton.next_power_of_2(dim)  # head_dim runs padded to a power of two, its extra columns masked
        common = dict(HEAD_DIM=dim, HEAD_DIM_PAD=pad, DOT_F32=q.dtype == torch.bfloat16 and interpreting(),
                      num_warps=self.fn.config.num_warps, num_stages=self.fn.config.num_stages)
        delta = torch.empty(batch, heads, tokens, device=q.device, dtype=torch.float32)
        rows = 64
        m.attention_bwd_preprocess[(-(-tokens // rows), batch * heads)](
            out, dout, delta, *out.stride()[:3], *dout.stride()[:3], heads, ROWS=rows, HEAD_DIM=dim, HEAD_DIM_PAD=pad)
        offsets, qblocks = transpose_picks(idx, self.fn.nblocks)
        table = self._tables.get(q.device)
        if table is None:
            table = self._tables[q.device] = self.s_table.to(q.device)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
        m.attention_bwd_dkdv[(tiles, batch * kv_heads)](
            q, k, v, dout, dk, dv, lse, delta, picked, offsets, qblocks, table, scale * 1.4426950408889634, scale,
            *strides, *dk.stride()[:3], *dv.stride()[:3], heads, group, **common)
        m.attention_bwd_dq[(tiles, batch * heads)](
            q, k, v, dout, dq, lse, delta, picked, idx, count, scale * 1.4426950408889634, scale,
            *strides, *dq.stride()[:3], heads, group, **common)
