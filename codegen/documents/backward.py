"""The backward of a document mask: FlashAttention-2's split, deterministic, spans derived on the device.

`document_delta` computes delta = rowsum(O * dO); `document_dkdv` runs one program per (key tile,
batch x kv head) and walks the query tiles that see its keys (`intervals.column_interval`: the
transposed rule, per key), over every query head of its GQA group, so dK and dV are written once, never
added to; `document_dq` runs one program per (query tile, batch x head) over the forward's key tiles.
Both classify a (query tile, key tile) pair as the forward does: full when one term holds it whole.
"""

from __future__ import annotations

import triton
import triton.language as tl

from maskdsl.codegen.documents.forward import _load_tile
from maskdsl.codegen.documents.intervals import (inside, keep_keys, keep_rows, load_meta, next_tile, split_span,
                                                 term_spans)


@triton.jit
def document_delta(O, DO, DELTA, L, stride_ob, stride_oh, stride_ol, stride_db, stride_dh, stride_dl, H,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < L
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    o = _load_tile(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, rows, ok, stride_ol, offs_d,
                   HEAD_DIM, True)
    do = _load_tile(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh, rows, ok, stride_dl, offs_d,
                    HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * L + rows, delta, mask=ok)


@triton.jit
def _pair_grads(q, k, v, do, lse2, delta, qk_scale, keep, MASKED: tl.constexpr):
    """(p, ds) of one (query tile, key tile) pair: probabilities and score gradients (rows with LSE -inf: 0)."""
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.math.exp2(qk - lse2[:, None])
    if MASKED:
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _row_state(LSE, DELTA, bh, rows, ok, L):
    """A query tile's LSE in base 2 (+inf where the row saw nothing or is past the grid: p = 0) and delta."""
    lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * L + rows, mask=ok, other=0.0)
    return lse, delta


@triton.jit
def _query_tile(dk, dv, k, v, t, q_base, do_base, LSE, DELTA, bh, L, qk_scale, stride_ql, stride_dl, offs_m, offs_d,
                lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
                T3: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr,
                MASKED: tl.constexpr):
    """Query tile t's contribution to the key tile's dK and dV; MASKED: with the keys' query intervals."""
    rows = t * BLOCK_M + offs_m
    row_ok = rows < L
    q = _load_tile(q_base, rows, row_ok, stride_ql, offs_d, HEAD_DIM, True)
    do = _load_tile(do_base, rows, row_ok, stride_dl, offs_d, HEAD_DIM, True)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2, delta = _row_state(LSE, DELTA, bh, rows, row_ok, L)
    if MASKED:
        keep = keep_rows(rows, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3)
        pr, ds = _pair_grads(q, k, v, do, lse2, delta, qk_scale, keep, True)
    else:
        pr, ds = _pair_grads(q, k, v, do, lse2, delta, qk_scale, None, False)
    dv = tl.dot(tl.trans(pr).to(do.dtype), do, dv)
    dk = tl.dot(tl.trans(ds).to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def document_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, META, COUNTS, L, qk_scale, sm_scale,
                  stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                  stride_vb, stride_vh, stride_vl, stride_db, stride_dh, stride_dl,
                  stride_dkb, stride_dkh, stride_dkl, stride_dvb, stride_dvh, stride_dvl,
                  H, H_KV, GROUP,
                  T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, T3: tl.constexpr, NT: tl.constexpr,
                  INNER: tl.constexpr,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_F32: tl.constexpr, COUNT: tl.constexpr = False):
    """COUNT: also write (full, partial) query tiles visited per program (one query head's walk) into
    COUNTS [B x H_kv, key tiles, 2]."""
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = pid_bkv // H_KV
    kvh = pid_bkv % H_KV
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < L
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)

    s, e, p = load_meta(META, keys, key_ok, L)
    (lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, a0, b0, a1, b1, a2, b2, a3, b3,
     f0, g0, f1, g1, f2, g2, f3, g3) = term_spans(keys, s, e, p, key_ok, T0, T1, T2, T3, INNER, BLOCK_M, False)

    k = _load_tile(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh, keys, key_ok, stride_kl, offs_d,
                   HEAD_DIM, True)
    v = _load_tile(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh, keys, key_ok, stride_vl, offs_d,
                   HEAD_DIM, True)
    if DOT_F32:  # Triton's interpreter cannot multiply bf16
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    first = tl.minimum(tl.minimum(a0, a1), tl.minimum(a2, a3))
    n_full = 0
    n_partial = 0
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
        if NT == 1:  # masked head, full middle, masked tail: loops the compiler can pipeline
            f, g = split_span(a0, b0, f0, g0)
            n_full = g - f
            n_partial = tl.maximum(f - a0, 0) + (b0 - g)
            for t in range(a0, f):
                dk, dv = _query_tile(dk, dv, k, v, t, q_base, do_base, LSE, DELTA, bh, L, qk_scale, stride_ql,
                                     stride_dl, offs_m, offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3,
                                     T0, T1, T2, T3, HEAD_DIM, BLOCK_M, DOT_F32, True)
            for t in range(f, g):
                dk, dv = _query_tile(dk, dv, k, v, t, q_base, do_base, LSE, DELTA, bh, L, qk_scale, stride_ql,
                                     stride_dl, offs_m, offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3,
                                     T0, T1, T2, T3, HEAD_DIM, BLOCK_M, DOT_F32, False)
            for t in range(g, b0):
                dk, dv = _query_tile(dk, dv, k, v, t, q_base, do_base, LSE, DELTA, bh, L, qk_scale, stride_ql,
                                     stride_dl, offs_m, offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3,
                                     T0, T1, T2, T3, HEAD_DIM, BLOCK_M, DOT_F32, True)
        else:
            t = first
            n_full = 0
            n_partial = 0
            while t < 2147483647:
                full = inside(t, f0, g0) | inside(t, f1, g1) | inside(t, f2, g2) | inside(t, f3, g3)
                n_full += full.to(tl.int32)
                n_partial += 1 - full.to(tl.int32)
                if full:
                    dk, dv = _query_tile(dk, dv, k, v, t, q_base, do_base, LSE, DELTA, bh, L, qk_scale, stride_ql,
                                         stride_dl, offs_m, offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3,
                                         T0, T1, T2, T3, HEAD_DIM, BLOCK_M, DOT_F32, False)
                else:
                    dk, dv = _query_tile(dk, dv, k, v, t, q_base, do_base, LSE, DELTA, bh, L, qk_scale, stride_ql,
                                         stride_dl, offs_m, offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3,
                                         T0, T1, T2, T3, HEAD_DIM, BLOCK_M, DOT_F32, True)
                t = next_tile(t, a0, b0, a1, b1, a2, b2, a3, b3)

    if COUNT:
        counts = COUNTS + (pid_bkv * tl.num_programs(0) + pid_n) * 2
        tl.store(counts, n_full)
        tl.store(counts + 1, n_partial)
    dk = dk * sm_scale
    col = offs_d[None, :] < HEAD_DIM
    tl.store(DK + b.to(tl.int64) * stride_dkb + kvh.to(tl.int64) * stride_dkh + keys[:, None].to(tl.int64) * stride_dkl
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & col)
    tl.store(DV + b.to(tl.int64) * stride_dvb + kvh.to(tl.int64) * stride_dvh + keys[:, None].to(tl.int64) * stride_dvl
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & col)


@triton.jit
def _key_tile_dq(dq, q, do, lse2, delta, t, k_base, v_base, stride_kl, stride_vl, L, qk_scale, offs_n, offs_d,
                 lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
                 T3: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
                 MASKED: tl.constexpr):
    """Key tile t's contribution to the query tile's dQ; MASKED: with the rows' key intervals."""
    keys = t * BLOCK_N + offs_n
    k = _load_tile(k_base, keys, keys < L, stride_kl, offs_d, HEAD_DIM, MASKED)
    v = _load_tile(v_base, keys, keys < L, stride_vl, offs_d, HEAD_DIM, MASKED)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if MASKED:
        keep = keep_keys(keys, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3)
        pr, ds = _pair_grads(q, k, v, do, lse2, delta, qk_scale, keep, True)
    else:
        pr, ds = _pair_grads(q, k, v, do, lse2, delta, qk_scale, None, False)
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit
def document_dq(Q, K, V, DO, LSE, DELTA, DQ, META, L, qk_scale, sm_scale,
                stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                stride_vb, stride_vh, stride_vl, stride_db, stride_dh, stride_dl,
                stride_dqb, stride_dqh, stride_dql,
                H, GROUP,
                T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, T3: tl.constexpr, NT: tl.constexpr,
                INNER: tl.constexpr,
                HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)

    s, e, p = load_meta(META, rows, row_ok, L)
    (lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, a0, b0, a1, b1, a2, b2, a3, b3,
     f0, g0, f1, g1, f2, g2, f3, g3) = term_spans(rows, s, e, p, row_ok, T0, T1, T2, T3, INNER, BLOCK_N, True)

    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, rows, row_ok, stride_ql, offs_d,
                   HEAD_DIM, True)
    do = _load_tile(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh, rows, row_ok, stride_dl, offs_d,
                    HEAD_DIM, True)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2, delta = _row_state(LSE, DELTA, pid_bh, rows, row_ok, L)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    if NT == 1:  # masked head, full middle, masked tail: loops the compiler can pipeline
        f, g = split_span(a0, b0, f0, g0)
        for t in range(a0, f):
            dq = _key_tile_dq(dq, q, do, lse2, delta, t, k_base, v_base, stride_kl, stride_vl, L, qk_scale, offs_n,
                              offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3, HEAD_DIM, BLOCK_N,
                              DOT_F32, True)
        for t in range(f, g):
            dq = _key_tile_dq(dq, q, do, lse2, delta, t, k_base, v_base, stride_kl, stride_vl, L, qk_scale, offs_n,
                              offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3, HEAD_DIM, BLOCK_N,
                              DOT_F32, False)
        for t in range(g, b0):
            dq = _key_tile_dq(dq, q, do, lse2, delta, t, k_base, v_base, stride_kl, stride_vl, L, qk_scale, offs_n,
                              offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3, HEAD_DIM, BLOCK_N,
                              DOT_F32, True)
    else:
        t = tl.minimum(tl.minimum(a0, a1), tl.minimum(a2, a3))
        while t < 2147483647:
            full = inside(t, f0, g0) | inside(t, f1, g1) | inside(t, f2, g2) | inside(t, f3, g3)
            if full:
                dq = _key_tile_dq(dq, q, do, lse2, delta, t, k_base, v_base, stride_kl, stride_vl, L, qk_scale,
                                  offs_n, offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3, HEAD_DIM,
                                  BLOCK_N, DOT_F32, False)
            else:
                dq = _key_tile_dq(dq, q, do, lse2, delta, t, k_base, v_base, stride_kl, stride_vl, L, qk_scale,
                                  offs_n, offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3, HEAD_DIM,
                                  BLOCK_N, DOT_F32, True)
            t = next_tile(t, a0, b0, a1, b1, a2, b2, a3, b3)

    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + rows[:, None].to(tl.int64) * stride_dql
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
