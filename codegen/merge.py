"""Merge two partial attentions over disjoint keys by their log-sum-exps, in place, in one pass.

Context parallelism (maskdsl.distributed) attends a chunk's keys in segments (its own frames, then each
halo) and combines them: o = (e^(l1-m) o1 + e^(l2-m) o2) / (e^(l1-m) + e^(l2-m)), l = m + log(...).
As torch ops that is six passes over [rows, D]; one kernel reads o1, o2 once and writes o1. Rows that
see no key in either part (-inf, -inf) stay 0 with lse -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from maskdsl.spec.limits import padded_head_dim

ROWS = 64


@triton.jit
def _merge_kernel(O, L, O2, L2, rows, H, so_b, so_h, so_r, s2_b, s2_h, s2_r, sl_b, sl_h, sl2_b, sl2_h,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, ROWS: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    r = pid_r * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM_PAD)
    ok = r < rows
    l1 = tl.load(L + b * sl_b + h * sl_h + r, mask=ok, other=float("-inf"))
    l2 = tl.load(L2 + b * sl2_b + h * sl2_h + r, mask=ok, other=float("-inf"))
    m = tl.maximum(l1, l2)
    m = tl.where(m == float("-inf"), 0.0, m)
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    total = w1 + w2
    inv = tl.where(total > 0, 1.0 / total, 0.0)
    tile = ok[:, None] & (d[None, :] < HEAD_DIM)
    p1 = O + b * so_b + h * so_h + r[:, None] * so_r + d[None, :]
    p2 = O2 + b * s2_b + h * s2_h + r[:, None] * s2_r + d[None, :]
    o1 = tl.load(p1, mask=tile, other=0.0).to(tl.float32)
    o2 = tl.load(p2, mask=tile, other=0.0).to(tl.float32)
    o = (o1 * (w1 * inv)[:, None] + o2 * (w2 * inv)[:, None]).to(O.dtype.element_ty)
    tl.store(p1, o, mask=tile)
    tl.store(L + b * sl_b + h * sl_h + r, m + tl.log(total), mask=ok)


def merge_into(o: torch.Tensor, lse: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> None:
    """o, lse <- the merge of (o, lse) and (o2, lse2): o, o2 [B, H, rows, D] (last dimension contiguous,
    any row strides), lse, lse2 float32 [B, H, rows] with contiguous rows."""
    if o.shape != o2.shape or lse.shape != lse2.shape or o.shape[:3] != lse.shape:
        raise ValueError(f"merge_into: o {tuple(o.shape)}, o2 {tuple(o2.shape)}, lse {tuple(lse.shape)} and "
                         f"lse2 {tuple(lse2.shape)} must describe the same rows")
    if o.stride(-1) != 1 or o2.stride(-1) != 1 or lse.stride(-1) != 1 or lse2.stride(-1) != 1:
        raise ValueError("merge_into: the last dimension of every tensor must be contiguous")
    batch, heads, rows, dim = o.shape
    if rows == 0:
        return
    _merge_kernel[(triton.cdiv(rows, ROWS), batch * heads)](
        o, lse, o2, lse2, rows, heads, o.stride(0), o.stride(1), o.stride(2), o2.stride(0), o2.stride(1),
        o2.stride(2), lse.stride(0), lse.stride(1), lse2.stride(0), lse2.stride(1),
        HEAD_DIM=dim, HEAD_DIM_PAD=padded_head_dim(dim), ROWS=ROWS)
