"""Top-k block selection on the device: pool K once, then pool each query block and score it.

Scores are block-level ([B, H, query blocks, key blocks]), never [L, L]. Selection uses a
stable descending sort so ties go to the lower block index, as maskdsl.topk specifies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_mean(base, j, stride_l, L, BLOCK: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr):
    """Mean (fp32) of the finite rows among [j*BLOCK, min((j+1)*BLOCK, L)) of one (batch, head) slice.

    A row holding NaN or inf is left out (maskdsl.topk states why), so it cannot change the picks of
    the finite rows of its block; a block with no finite row has mean 0.
    """
    offs_d = tl.arange(0, D)
    acc = tl.zeros([D], tl.float32)
    count = tl.zeros([CHUNK], tl.float32)
    for c in tl.range(0, BLOCK, CHUNK):
        rows = j * BLOCK + c + tl.arange(0, CHUNK)
        ok = (rows < L) & (c + tl.arange(0, CHUNK) < BLOCK)
        x = tl.load(base + rows[:, None] * stride_l + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        bad = tl.sum(tl.where((x == x) & (tl.abs(x) < float("inf")), 0, 1), 1)
        use = ok & (bad == 0)
        acc += tl.sum(tl.where(use[:, None], x, 0.0), 0)
        count += use.to(tl.float32)
    return acc / tl.maximum(tl.sum(count, 0), 1.0)


@triton.jit
def _pool_kernel(X, OUT, stride_b, stride_h, stride_l, H, L, NB,
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    j = pid % NB
    bh = pid // NB
    base = X + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    mean = _block_mean(base, j, stride_l, L, BLOCK, CHUNK, D)
    tl.store(OUT + (bh * NB + j).to(tl.int64) * D + tl.arange(0, D), mean)


@triton.jit
def _score_kernel(Q, KBAR, S, stride_b, stride_h, stride_l, H, GROUP, L, NQB, NKB,
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr, NK: tl.constexpr):
    """Pool query block i (fused) and score it against every pooled key block of its kv head."""
    pid = tl.program_id(0)
    i = pid % NQB
    bh = pid // NQB
    b, h = bh // H, bh % H
    base = Q + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    offs_d = tl.arange(0, D)
    qbar = _block_mean(base, i, stride_l, L, BLOCK, CHUNK, D)
    kv = b * (H // GROUP) + h // GROUP
    for j0 in tl.range(0, NKB, NK):
        js = j0 + tl.arange(0, NK)
        kb = tl.load(KBAR + (kv * NKB + js[:, None]).to(tl.int64) * D + offs_d[None, :], mask=(js < NKB)[:, None],
                     other=0.0)
        s = tl.sum(kb * qbar[None, :], 1)
        tl.store(S + (bh * NQB + i).to(tl.int64) * NKB + js, s, mask=js < NKB)


def block_scores(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """float32 [B, H, query blocks, key blocks]: mean(q block) . mean(k block) per head."""
    batch, heads, tokens, dim = q.shape
    kv_heads = k.shape[1]
    nb = -(-tokens // block)
    chunk = min(64, triton.next_power_of_2(block))
    kbar = torch.empty(batch * kv_heads * nb, dim, device=q.device, dtype=torch.float32)
    _pool_kernel[(batch * kv_heads * nb,)](k, kbar, k.stride(0), k.stride(1), k.stride(2), kv_heads, tokens, nb,
                                           BLOCK=block, CHUNK=chunk, D=dim)
    scores = torch.empty(batch, heads, nb, nb, device=q.device, dtype=torch.float32)
    _score_kernel[(batch * heads * nb,)](q, kbar, scores, q.stride(0), q.stride(1), q.stride(2), heads,
                                         heads // kv_heads, tokens, nb, nb, BLOCK=block, CHUNK=chunk, D=dim, NK=32)
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
