"""The decode kernels: split-KV attention of a few new tokens against a KV cache, and the LSE merge.

One program per (sequence, kv head and block of its query rows, split). The rows of a program are
the GQA group's query heads times the new tokens (they read the same keys, so they share one tile and
one pass over the cache). The keys a program may need come from the reach table
(maskdsl.analysis.decode_reach) at the new tokens' positions, read on the device: per slot, the lowest
first key and the highest last key over the new rows, cut to the cache's length, the second slot
starting past the first. The key tiles of both slots (and, for a top-k mask, of the picked blocks)
are numbered in one run and the splits take equal shares of it, so a window of 4096 at a 128k context
is split over its own ~64 tiles, and nothing derived from the lengths is a compile-time constant.

`attends(q_pos, k_pos)` is the mask's predicate (a top-k mask's static part S; `restrict` is its R),
a jitted function rendered per mask (codegen.decode.predicate) and passed as a constexpr;
`neighborhood` below is the per-dimension rule it calls (maskdsl/harness/semantics.py states it).
Every load is masked or clamped: keys past the cache's length are never read, page numbers are
clamped to the pool, positions outside the grid give empty rows (output 0, LSE -inf).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the kernels' softmax is base 2: scores are scaled by log2(e), LSEs converted back


@triton.jit
def neighborhood(i, j, n: tl.constexpr, window: tl.constexpr, dilation: tl.constexpr, stride: tl.constexpr,
                 causal: tl.constexpr):
    """Whether coordinate i sees coordinate j in one dimension of extent n (NATTEN/GNA rule, i, j >= 0)."""
    group = i % dilation
    gi = i // dilation
    gj = j // dilation
    glen = (n - group + dilation - 1) // dilation
    if causal:
        leader = tl.minimum((gi // stride) * stride + stride - 1, glen - 1)
        seen = (gj <= gi) & (leader - gj < window)
    else:
        leader = tl.minimum((gi // stride) * stride + stride // 2, glen - 1)
        start = tl.minimum(tl.maximum(leader - window // 2, 0), glen - window)
        seen = (gj >= start) & (gj < start + window)
    return (group == j % dilation) & seen


@triton.jit
def _slot(IV, first, length, slot: tl.constexpr, reach, TOKENS: tl.constexpr, Q_LEN: tl.constexpr,
          Q_PAD: tl.constexpr):
    """(lo, hi): the keys slot `slot` of the new rows reaches, inclusive, cut to [reach + 1, length)."""
    t = tl.arange(0, Q_PAD)
    pos = first + t
    ok = (t < Q_LEN) & (pos >= 0) & (pos < TOKENS)
    row = tl.minimum(tl.maximum(pos, 0), TOKENS - 1)
    lo = tl.load(IV + row.to(tl.int64) * 4 + 2 * slot, mask=ok, other=1)
    hi = tl.load(IV + row.to(tl.int64) * 4 + 2 * slot + 1, mask=ok, other=0)
    used = ok & (lo <= hi)
    a = tl.min(tl.where(used, lo, 2147483647), 0)
    b = tl.max(tl.where(used, hi, -1), 0)
    return tl.maximum(a, reach + 1), tl.minimum(b, length - 1)


@triton.jit
def _tiles(a, b, BLOCK_N: tl.constexpr):
    return tl.where(a <= b, b // BLOCK_N - a // BLOCK_N + 1, 0)


@triton.jit
def _tile(acc, m_i, l_i, q, scale_log2, keys, kv_ok, seen, K, V, PAGES, b, kvh,
          k_sb, k_sh, k_st, v_sb, v_sh, v_st, p_sb, num_pages,
          HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
          DOT_F32: tl.constexpr):
    """One key tile into the online softmax: `keys` [BLOCK_N] (read where kv_ok), `seen` [BLOCK_M, BLOCK_N]."""
    d = tl.arange(0, HEAD_DIM)
    if PAGED:
        if PAGE_SIZE >= BLOCK_N:  # tiles start on multiples of BLOCK_N: the whole tile is in one page
            page = tl.load(PAGES + b * p_sb + tl.min(keys, 0) // PAGE_SIZE, mask=tl.max(kv_ok.to(tl.int32), 0) > 0,
                           other=0)
        else:
            page = tl.load(PAGES + b * p_sb + keys // PAGE_SIZE, mask=kv_ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
        k_rows = page * k_sb + (keys % PAGE_SIZE) * k_st
        v_rows = page * v_sb + (keys % PAGE_SIZE) * v_st
    else:
        k_rows = b.to(tl.int64) * k_sb + keys.to(tl.int64) * k_st
        v_rows = b.to(tl.int64) * v_sb + keys.to(tl.int64) * v_st
    k = tl.load(K + kvh.to(tl.int64) * k_sh + k_rows[:, None] + d[None, :], mask=kv_ok[:, None], other=0.0)
    v = tl.load(V + kvh.to(tl.int64) * v_sh + v_rows[:, None] + d[None, :], mask=kv_ok[:, None], other=0.0)
    if DOT_F32:  # Triton's interpreter multiplies bf16 through numpy: take fp32 there
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(seen & kv_ok[None, :], s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet stays 0, not NaN
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_F32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _attend(acc, m_i, l_i, q, scale_log2, pos, row_ok, K, V, PAGES, b, kvh, a, bb, t0, t1,
            k_sb, k_sh, k_st, v_sb, v_sh, v_st, p_sb, num_pages, PICKED, pick_rows,
            ATTENDS: tl.constexpr, TOPK: tl.constexpr, RESTRICT: tl.constexpr, KEY_BLOCK: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
            DOT_F32: tl.constexpr):
    """Key tiles t0..t1-1 of the interval [a, bb] (tile 0 holds key a). With TOPK, the interval is the
    static part's and a pair is seen where S holds or its key's block is picked for the row's head and R holds."""
    base = a // BLOCK_N
    for i in range(t0, t1):
        keys = (base + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_ok = (keys >= a) & (keys <= bb)
        seen = ATTENDS(pos[:, None], keys[None, :])
        if TOPK:
            block = KEY_BLOCK(keys)
            picked = tl.load(PICKED + pick_rows[:, None] + block[None, :], mask=row_ok[:, None] & kv_ok[None, :],
                             other=0)
            seen = seen | ((picked != 0) & RESTRICT(pos[:, None], keys[None, :]))
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, scale_log2, keys, kv_ok, seen & row_ok[:, None], K, V, PAGES, b, kvh,
                              k_sb, k_sh, k_st, v_sb, v_sh, v_st, p_sb, num_pages, HEAD_DIM, BLOCK_N, PAGED, PAGE_SIZE,
                              DOT_F32)
    return acc, m_i, l_i


@triton.jit
def _attend_picks(acc, m_i, l_i, q, scale_log2, pos, row_ok, K, V, PAGES, b, kvh, length, v0, v1, a0, b0, a1, b1,
                  k_sb, k_sh, k_st, v_sb, v_sh, v_st, p_sb, num_pages, PICKED, pick_rows, PLIST,
                  RESTRICT: tl.constexpr, KEY_BLOCK: tl.constexpr, BLOCK_FIRST: tl.constexpr,
                  BLOCK_LAST: tl.constexpr, BLOCK_TILES: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_F32: tl.constexpr):
    """Work items v0..v1-1 of the picked blocks (BLOCK_TILES key tiles per entry of PLIST, the group's
    picks in block order, -1 past its last): the keys of the block outside the static intervals
    [a0, b0] and [a1, b1] (visited already), a pair seen where the row's head picked the block and R holds."""
    for v in range(v0, v1):
        j = tl.load(PLIST + v // BLOCK_TILES)
        if j >= 0:
            lo = BLOCK_FIRST(j)
            hi = tl.minimum(BLOCK_LAST(j), length - 1)
            keys = (lo // BLOCK_N + v % BLOCK_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_ok = (keys >= lo) & (keys <= hi) & (KEY_BLOCK(keys) == j)
            kv_ok = kv_ok & ((keys < a0) | (keys > b0)) & ((keys < a1) | (keys > b1))
            picked = tl.load(PICKED + pick_rows + j, mask=row_ok, other=0) != 0
            seen = (picked & row_ok)[:, None] & RESTRICT(pos[:, None], keys[None, :])
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, scale_log2, keys, kv_ok, seen, K, V, PAGES, b, kvh, k_sb, k_sh,
                                  k_st, v_sb, v_sh, v_st, p_sb, num_pages, HEAD_DIM, BLOCK_N, PAGED, PAGE_SIZE,
                                  DOT_F32)
    return acc, m_i, l_i


@triton.jit
def decode_split(Q, K, V, SEQLENS, PAGES, IV, OUT, LSE, PART_O, PART_L, PICKED, PLIST, scale_log2,
                 q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, o_sb, o_sh, o_st, p_sb,
                 capacity, num_pages,
                 ATTENDS: tl.constexpr, TOKENS: tl.constexpr, HEADS: tl.constexpr, GROUP: tl.constexpr,
                 Q_LEN: tl.constexpr, Q_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, DIRECT: tl.constexpr,
                 DOT_F32: tl.constexpr, TOPK: tl.constexpr = False, RESTRICT: tl.constexpr = None,
                 KEY_BLOCK: tl.constexpr = None, BLOCK_FIRST: tl.constexpr = None, BLOCK_LAST: tl.constexpr = None,
                 N_BLOCKS: tl.constexpr = 1, N_PICKS: tl.constexpr = 0, BLOCK_TILES: tl.constexpr = 1):
    """Grid (batch, kv heads x row blocks, splits). DIRECT (one split): write the output and the natural
    LSE; else each split writes its normalized partial output and base-2 LSE for `decode_merge`.

    TOPK: `attends` is the static part S, PICKED [B, H, N_BLOCKS] int8 the blocks each head picked and
    PLIST [B, H_kv, N_PICKS] int32 their union over the group (codegen.decode.select); the picked blocks'
    tiles follow the static intervals' in the run the splits share."""
    b = tl.program_id(0)
    M_TILES: tl.constexpr = (GROUP * Q_LEN + BLOCK_M - 1) // BLOCK_M
    kvh = tl.program_id(1) // M_TILES
    m = (tl.program_id(1) % M_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    splits = tl.num_programs(2)

    seqlen = tl.load(SEQLENS + b)
    length = tl.minimum(tl.minimum(seqlen, capacity), TOKENS)  # keys that exist, whatever the values say
    first = seqlen - Q_LEN  # the position of the first new token
    exists = m < GROUP * Q_LEN
    head = kvh * GROUP + m // Q_LEN
    t = m % Q_LEN
    pos = first + t
    row_ok = exists & (pos >= 0) & (pos < TOKENS)

    d = tl.arange(0, HEAD_DIM)
    q_rows = b.to(tl.int64) * q_sb + head.to(tl.int64) * q_sh + t * q_st  # q may be a view of a longer tensor
    q = tl.load(Q + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)

    a0, b0 = _slot(IV, first, length, 0, -1, TOKENS, Q_LEN, Q_PAD)
    a1, b1 = _slot(IV, first, length, 1, tl.maximum(b0, -1), TOKENS, Q_LEN, Q_PAD)
    n0 = _tiles(a0, b0, BLOCK_N)
    n1 = _tiles(a1, b1, BLOCK_N)
    total = n0 + n1 + N_PICKS * BLOCK_TILES
    start = total * split // splits
    stop = total * (split + 1) // splits
    pick_rows = (b * HEADS + head).to(tl.int64) * N_BLOCKS

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, scale_log2, pos, row_ok, K, V, PAGES, b, kvh, a0, b0,
                            tl.maximum(start, 0), tl.minimum(stop, n0), k_sb, k_sh, k_st, v_sb, v_sh, v_st, p_sb,
                            num_pages, PICKED, pick_rows, ATTENDS, TOPK, RESTRICT, KEY_BLOCK, HEAD_DIM, BLOCK_N,
                            PAGED, PAGE_SIZE, DOT_F32)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, scale_log2, pos, row_ok, K, V, PAGES, b, kvh, a1, b1,
                            tl.maximum(start - n0, 0), tl.minimum(stop - n0, n1), k_sb, k_sh, k_st, v_sb, v_sh,
                            v_st, p_sb, num_pages, PICKED, pick_rows, ATTENDS, TOPK, RESTRICT, KEY_BLOCK, HEAD_DIM,
                            BLOCK_N, PAGED, PAGE_SIZE, DOT_F32)
    if TOPK:
        acc, m_i, l_i = _attend_picks(acc, m_i, l_i, q, scale_log2, pos, row_ok, K, V, PAGES, b, kvh, length,
                                      tl.maximum(start - n0 - n1, 0), tl.minimum(stop - n0 - n1, N_PICKS * BLOCK_TILES),
                                      a0, b0, a1, b1, k_sb, k_sh, k_st, v_sb, v_sh, v_st, p_sb, num_pages, PICKED,
                                      pick_rows, PLIST + (b * (HEADS // GROUP) + kvh).to(tl.int64) * N_PICKS,
                                      RESTRICT, KEY_BLOCK, BLOCK_FIRST, BLOCK_LAST, BLOCK_TILES, HEAD_DIM, BLOCK_N,
                                      PAGED, PAGE_SIZE, DOT_F32)

    some = l_i > 0.0
    o = acc / tl.where(some, l_i, 1.0)[:, None]
    lse2 = tl.where(some, m_i + tl.log2(tl.where(some, l_i, 1.0)), float("-inf"))
    if DIRECT:
        out = OUT + (b.to(tl.int64) * o_sb + head.to(tl.int64) * o_sh + t * o_st)[:, None] + d[None, :]
        tl.store(out, o.to(OUT.dtype.element_ty), mask=exists[:, None])
        tl.store(LSE + (b * HEADS + head) * Q_LEN + t, lse2 * 0.6931471805599453, mask=exists)
    else:
        row = ((b * HEADS + head) * Q_LEN + t).to(tl.int64) * splits + split
        tl.store(PART_O + row[:, None] * HEAD_DIM + d[None, :], o, mask=exists[:, None])
        tl.store(PART_L + row, lse2, mask=exists)


@triton.jit
def decode_merge(PART_O, PART_L, OUT, LSE, splits, o_sb, o_sh, o_st,
                 HEADS: tl.constexpr, Q_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """One program per (sequence, head, new token): the splits' partials combined by log-sum-exp."""
    row = tl.program_id(0)
    b = row // (HEADS * Q_LEN)
    head = (row // Q_LEN) % HEADS
    t = row % Q_LEN
    sp = tl.arange(0, SPLITS_PAD)
    ok = sp < splits
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(PART_L + row.to(tl.int64) * splits + sp, mask=ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top_use = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top_use)
    total = tl.sum(w, 0)
    part = tl.load(PART_O + (row.to(tl.int64) * splits + sp)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None],
                   other=0.0)
    o = tl.sum(w[:, None] * part, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(OUT + b.to(tl.int64) * o_sb + head.to(tl.int64) * o_sh + t * o_st + d, o.to(OUT.dtype.element_ty))
    tl.store(LSE + row, tl.where(total > 0.0, (top_use + tl.log2(tl.where(total > 0.0, total, 1.0))) * 0.6931471805599453,
                                 float("-inf")))


@triton.jit
def decode_check(SEQLENS, LAST, PAGES, FLAGS, p_sb, limit, num_pages, TOKENS: tl.constexpr, Q_LEN: tl.constexpr,
                 Q_PAD: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, MAX_PAGES: tl.constexpr,
                 BLOCK_P: tl.constexpr):
    """One program per sequence: FLAGS[b] = 1 when its length or pages do not fit (codegen.decode.checks
    says which), and FLAGS[batch] the largest flag, the one number the host reads."""
    b = tl.program_id(0)
    n = tl.load(SEQLENS + b)
    bad = (n < Q_LEN) | (n > limit)
    t = tl.arange(0, Q_PAD)
    pos = tl.minimum(tl.maximum(n - Q_LEN + t, 0), TOKENS - 1)
    last = tl.load(LAST + pos, mask=t < Q_LEN, other=-1)
    bad = bad | (tl.max(last, 0) >= n)
    if PAGED:
        used = (n + PAGE_SIZE - 1) // PAGE_SIZE
        for j0 in range(0, MAX_PAGES, BLOCK_P):
            j = j0 + tl.arange(0, BLOCK_P)
            page = tl.load(PAGES + b * p_sb + j, mask=j < MAX_PAGES, other=0)
            bad = bad | (tl.max(((j < used) & ((page < 0) | (page >= num_pages))).to(tl.int32), 0) > 0)
    flag = bad.to(tl.int32)
    tl.store(FLAGS + b, flag)
    tl.atomic_max(FLAGS + tl.num_programs(0), flag)
