"""Top-k block selection on the device: pool K once, then pool each query block and score it.

Blocks are boxes of the grid (maskdsl.harness.topk); the pooling kernels walk a block's box in chunks of
its flattened coordinates and read the grid's tokens only (a cut last block averages fewer).

Scores are block-level ([B, H, query blocks, key blocks]), never [L, L]. Selection uses a
stable descending sort so ties go to the lower block index, as maskdsl.harness.topk specifies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_mean(base, j, stride_l, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, B0: tl.constexpr,
                B1: tl.constexpr, B2: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """Mean (fp32) of the finite rows of block j, a box of B0 x B1 x B2 coordinates cut by the N0 x N1 x N2 grid.

    DP is D rounded up to a power of two (Triton's block shapes); the columns past D read as 0. A row
    holding NaN or inf is left out (maskdsl.harness.topk states why), so it cannot change the picks of the
    finite rows of its block; a block with no finite row has mean 0."""
    NB1: tl.constexpr = (N1 + B1 - 1) // B1
    NB2: tl.constexpr = (N2 + B2 - 1) // B2
    VOL: tl.constexpr = B0 * B1 * B2
    start0 = (j // (NB1 * NB2)) * B0
    start1 = ((j // NB2) % NB1) * B1
    start2 = (j % NB2) * B2
    offs_d = tl.arange(0, DP)
    acc = tl.zeros([DP], tl.float32)
    count = tl.zeros([CHUNK], tl.float32)
    for c in tl.range(0, VOL, CHUNK):
        local = c + tl.arange(0, CHUNK)
        c0 = start0 + local // (B1 * B2)
        c1 = start1 + (local // B2) % B1
        c2 = start2 + local % B2
        ok = (local < VOL) & (c0 < N0) & (c1 < N1) & (c2 < N2)
        rows = (c0 * N1 + c1) * N2 + c2
        x = tl.load(base + rows[:, None].to(tl.int64) * stride_l + offs_d[None, :],
                    mask=ok[:, None] & (offs_d < D)[None, :], other=0.0)
        x = x.to(tl.float32)
        bad = tl.sum(tl.where((x == x) & (tl.abs(x) < float("inf")), 0, 1), 1)
        use = ok & (bad == 0)
        acc += tl.sum(tl.where(use[:, None], x, 0.0), 0)
        count += use.to(tl.float32)
    return acc / tl.maximum(tl.sum(count, 0), 1.0)


@triton.jit
def _pool_kernel(X, OUT, stride_b, stride_h, stride_l, H, NB, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                 B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
                 DP: tl.constexpr):
    pid = tl.program_id(0)
    j = pid % NB
    bh = pid // NB
    base = X + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    mean = _block_mean(base, j, stride_l, N0, N1, N2, B0, B1, B2, CHUNK, D, DP)
    tl.store(OUT + (bh * NB + j).to(tl.int64) * DP + tl.arange(0, DP), mean)


@triton.jit
def _score_kernel(Q, KBAR, S, stride_b, stride_h, stride_l, H, GROUP, NQB, NKB, N0: tl.constexpr, N1: tl.constexpr,
                  N2: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, CHUNK: tl.constexpr,
                  D: tl.constexpr, DP: tl.constexpr, NK: tl.constexpr):
    """Pool query block i (fused) and score it against every pooled key block of its kv head."""
    pid = tl.program_id(0)
    i = pid % NQB
    bh = pid // NQB
    b, h = bh // H, bh % H
    base = Q + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    offs_d = tl.arange(0, DP)
    qbar = _block_mean(base, i, stride_l, N0, N1, N2, B0, B1, B2, CHUNK, D, DP)
    kv = b * (H // GROUP) + h // GROUP
    for j0 in tl.range(0, NKB, NK):
        js = j0 + tl.arange(0, NK)
        kb = tl.load(KBAR + (kv * NKB + js[:, None]).to(tl.int64) * DP + offs_d[None, :], mask=(js < NKB)[:, None],
                     other=0.0)
        s = tl.sum(kb * qbar[None, :], 1)
        tl.store(S + (bh * NQB + i).to(tl.int64) * NKB + js, s, mask=js < NKB)


def block_scores(q: torch.Tensor, k: torch.Tensor, shape: tuple[int, ...], block: tuple[int, ...]) -> torch.Tensor:
    """float32 [B, H, query blocks, key blocks]: mean(q block) . mean(k block) per head, blocks as
    maskdsl.harness.topk defines them (boxes of the grid, cut by it); grids have at most three dimensions."""
    pad = 3 - len(shape)
    n0, n1, n2 = (1,) * pad + tuple(shape)
    b0, b1, b2 = (1,) * pad + tuple(min(b, n) for b, n in zip(block, shape))
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    nb = -(-n0 // b0) * -(-n1 // b1) * -(-n2 // b2)
    sizes = dict(N0=n0, N1=n1, N2=n2, B0=b0, B1=b1, B2=b2, CHUNK=min(64, triton.next_power_of_2(b0 * b1 * b2)),
                 D=dim, DP=triton.next_power_of_2(dim))
    kbar = torch.empty(batch * kv_heads * nb, sizes["DP"], device=q.device, dtype=torch.float32)
    _pool_kernel[(batch * kv_heads * nb,)](k, kbar, k.stride(0), k.stride(1), k.stride(2), kv_heads, nb, **sizes)
    scores = torch.empty(batch, heads, nb, nb, device=q.device, dtype=torch.float32)
    _score_kernel[(batch * heads * nb,)](q, kbar, scores, q.stride(0), q.stride(1), q.stride(2), heads,
                                         heads // kv_heads, nb, nb, NK=32, **sizes)
    return scores


def select(scores: torch.Tensor, candidates: torch.Tensor, k: int):
    """(picked int8 [B, H, nqb, nkb], idx int32 [B, H, nqb, k] ascending, count int32 [B, H, nqb])."""
    masked = scores.masked_fill(~candidates, float("-inf"))
    k = min(k, scores.shape[-1])
    order = torch.sort(masked, dim=-1, descending=True, stable=True)
    keep = order.indices[..., :k]
    ok = order.values[..., :k] > float("-inf")
    picked = torch.zeros(scores.shape, dtype=torch.int8, device=scores.device)
    picked.scatter_(-1, keep, ok.to(torch.int8))
    idx = torch.where(ok, keep, scores.shape[-1]).sort(dim=-1).values.to(torch.int32)
    return picked, idx.contiguous(), ok.sum(-1).to(torch.int32)
