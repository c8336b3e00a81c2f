"""The forward of a document mask: one program per (query tile, batch x head), key tiles found on the device.

Each program loads its rows' document metadata, evaluates every term's key interval per row
(`intervals.row_interval`), and from them each term's span of key tiles (visited) and the span every row
sees whole (full). It then walks the union of the visited spans once, in increasing order: a tile in some
term's full span runs with no predicate, any other with the rows' intervals as its predicate. Tiles no
term reaches are never loaded, whatever the documents.
"""

from __future__ import annotations

import triton
import triton.language as tl

from maskdsl.codegen.documents.intervals import inside, keep_keys, load_meta, next_tile, split_span, term_spans


@triton.jit
def _load_tile(base, idx, ok, stride, offs_d, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    ptrs = base + idx[:, None].to(tl.int64) * stride + offs_d[None, :]
    if MASKED:
        return tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _fold(acc, m_i, l_i, qk, v, keep, MASKED: tl.constexpr):
    """One key tile into the online softmax (base 2: qk is scaled by log2(e) already)."""
    if MASKED:
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays all zero
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _key_tile(acc, m_i, l_i, q, qk_scale, t, k_base, v_base, stride_kl, stride_vl, L, offs_n, offs_d,
              lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
              T3: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
              MASKED: tl.constexpr):
    """Key tile t into the query tile's online softmax; MASKED: with the rows' intervals as the predicate
    (and keys past the grid masked), else none (a full tile lies inside the grid)."""
    keys = t * BLOCK_N + offs_n
    k = _load_tile(k_base, keys, keys < L, stride_kl, offs_d, HEAD_DIM, MASKED)
    v = _load_tile(v_base, keys, keys < L, stride_vl, offs_d, HEAD_DIM, MASKED)
    if DOT_F32:  # Triton's interpreter cannot multiply bf16
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        keep = keep_keys(keys, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3)
        return _fold(acc, m_i, l_i, qk, v, keep, True)
    return _fold(acc, m_i, l_i, qk, v, None, False)


@triton.jit
def document_fwd(Q, K, V, O, LSE, META, COUNTS, L, qk_scale,
                 stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                 stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol,
                 H, GROUP,
                 T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, T3: tl.constexpr, NT: tl.constexpr,
                 INNER: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_F32: tl.constexpr, COUNT: tl.constexpr = False):
    """COUNT: also write (full, partial) key tiles visited per program into COUNTS [B x H, query tiles, 2]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)

    s, e, p = load_meta(META, rows, row_ok, L)
    (lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, a0, b0, a1, b1, a2, b2, a3, b3,
     f0, g0, f1, g1, f2, g2, f3, g3) = term_spans(rows, s, e, p, row_ok, T0, T1, T2, T3, INNER, BLOCK_N, True)

    q = _load_tile(q_base, rows, row_ok, stride_ql, offs_d, HEAD_DIM, True)
    if DOT_F32:  # Triton's interpreter cannot multiply bf16
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_full = 0
    n_partial = 0
    if NT == 1:  # one span: masked head, full middle, masked tail, each a loop the compiler can pipeline
        f, g = split_span(a0, b0, f0, g0)
        n_full = g - f
        n_partial = tl.maximum(f - a0, 0) + (b0 - g)
        for t in range(a0, f):
            acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, qk_scale, t, k_base, v_base, stride_kl, stride_vl, L,
                                      offs_n, offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3,
                                      HEAD_DIM, BLOCK_N, DOT_F32, True)
        for t in range(f, g):
            acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, qk_scale, t, k_base, v_base, stride_kl, stride_vl, L,
                                      offs_n, offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3,
                                      HEAD_DIM, BLOCK_N, DOT_F32, False)
        for t in range(g, b0):
            acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, qk_scale, t, k_base, v_base, stride_kl, stride_vl, L,
                                      offs_n, offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3,
                                      HEAD_DIM, BLOCK_N, DOT_F32, True)
    else:  # the union of the spans, each tile once, in increasing order
        t = tl.minimum(tl.minimum(a0, a1), tl.minimum(a2, a3))
        while t < 2147483647:
            full = inside(t, f0, g0) | inside(t, f1, g1) | inside(t, f2, g2) | inside(t, f3, g3)
            n_full += full.to(tl.int32)
            n_partial += 1 - full.to(tl.int32)
            if full:  # inside every row's interval of one term, and inside the grid: no predicate
                acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, qk_scale, t, k_base, v_base, stride_kl, stride_vl, L,
                                          offs_n, offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3,
                                          HEAD_DIM, BLOCK_N, DOT_F32, False)
            else:
                acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, qk_scale, t, k_base, v_base, stride_kl, stride_vl, L,
                                          offs_n, offs_d, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, T0, T1, T2, T3,
                                          HEAD_DIM, BLOCK_N, DOT_F32, True)
            t = next_tile(t, a0, b0, a1, b1, a2, b2, a3, b3)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(O.dtype.element_ty)
    tl.store(o_base + rows[:, None].to(tl.int64) * stride_ol + offs_d[None, :], out,
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + pid_bh.to(tl.int64) * L + rows, lse, mask=row_ok)
    if COUNT:
        counts = COUNTS + (pid_bh * tl.num_programs(0) + pid_m) * 2
        tl.store(counts, n_full)
        tl.store(counts + 1, n_partial)
