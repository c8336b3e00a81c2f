"""A warp-specialized Hopper (sm_90) attention forward in Gluon: whole tiles, with predicated modes.

Why a second forward: on dense and perfectly block-sparse masks the Triton template stays near
88% of cuDNN on an H100: it leaves the overlap of softmax and tensor-core work to Triton's
scheduler. Gluon is Triton's lower level (same compiler, explicit layouts, shared memory, mbarriers
and warp specialization), which lets this kernel schedule it by hand as FlashAttention-3 does; the
prototype measured 101% of cuDNN on dense 32k (d128, bf16). Full tiles run with no mask arithmetic: it
runs the masks `codegen.gluon_plan` accepts (every visited 128 x 128 tile full, one box of key tiles
per query tile) unmasked, 1-D masks with partial tiles in a predicated mode (`codegen.gluon_runs`:
intervals per row), one-term masks on grids with partial tiles or ragged extents in another
(`codegen.gluon_boxes`: an interval per row and dimension), and `CompiledAttention.launch` falls
back to the template for everything else.

A work item = one 128-token query tile (a box of the grid: a run of 128 tokens on a 1-D order, e.g.
2 x 8 x 8 on a video) of one (batch, head); the items are a table of the query tiles that visit
anything (so neighbouring items share K/V in L2) times the heads, each row holding the tile's
coordinates and its box of key tiles [lo_d, hi_d) per dimension. A CTA runs one item, or PER items of
a short-item schedule (codegen.gluon_plan.GluonSchedule.items_per_program: program p of G runs items
p, p + G, ...; two Q buffers let the loader fetch the next item's Q and K/V under the current one). Every grid is padded to 3 dimensions, so one
kernel serves 1-D, 2-D and 3-D masks: Q, K, V and O are 5-D TMA boxes [1, t0, t1, t2, head_dim]
whose shared memory the wgmma reads as [128 or 64 rows, head_dim] (same bytes, same swizzle).
Three partitions (`gl.warp_specialize`, 12 warps):
  * loader (1 warp, 24 registers): TMA-loads Q once (two half boxes, one per consumer), then walks
    the key-tile box row-major into a 2-stage ring of K and V. K and V
    have their own `ready` mbarriers (transaction counts), so S = QK^T starts before V lands;
    `kv_empty[s]` (count 2) is arrived by both consumers once their last read of a stage retired.
  * two consumers (4 warps, 240 registers each), rows 0-63 and 64-127: async wgmma S = Q K^T,
    online softmax in the log2 domain, P kept in registers as the A operand of O += P V. At step
    i a consumer issues PV(i-1) and QK(i) back to back and waits once (FA3's software pipeline).
    With PINGPONG the two take turns issuing their MMAs (mbarriers `turn`), so the tensor core
    runs one warpgroup's GEMMs while the other does its exponentials.
  * epilogue: O /= l goes through the consumer's (now free) half of Q's shared memory and a TMA
    store of that half box; LSE = (m + log2 l) * ln 2 (the natural log the template stores and the
    backward reads) goes to each row's token of the grid.

Measured variants that lost (H100, dense 32k, d128): one 8-warp consumer (-20%), 64-key tiles
(-17%), three stages (no gain), FlashAttention-3's intra-warpgroup overlap (QK(i) before PV(i-1), the
softmax under PV(i-1): -10 to -20%, docs/BENCHMARKS.md). Ping-pong vs not is within noise on dense; it is
kept as a knob.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from maskdsl.codegen.gluon_plan import BLOCK_M, BLOCK_N, box_strides

LOG2E = 1.4426950408889634
NUM_STAGES = 2  # 160 KB of shared memory at head_dim 128; a third stage measured no faster
CONSUMER_WARPS = 4
LOADER_REGS = 24
CONSUMER_REGS = 240
# 12 warps (the loader's one is padded to a warpgroup) share 64K registers: 168 a thread at launch;
# setmaxnreg then hands the loader's to the consumers (240 + 240 + 24 <= 3 x 168).
MAXNREG = 65536 // (32 * 12) // 8 * 8
PINGPONG = True


@gluon.jit
def _key_tile(i, lo2, na, lo2b, RUNS: gl.constexpr):
    """The last-dimension key tile of step i: the box's (one run) or, with two runs (1-D only), the
    first run's na tiles from lo2, then the second's from lo2b."""
    if RUNS == 2:
        return gl.where(i < na, lo2 + i, lo2b + (i - na))
    else:
        return lo2 + i


@gluon.jit
def _item(w, table_ptr, tile_base, count, BH, LONG, T0: gl.constexpr, T1: gl.constexpr, T2: gl.constexpr,
          H0: gl.constexpr, H1: gl.constexpr, H2: gl.constexpr, RUNS: gl.constexpr, BOX: gl.constexpr):
    """Work item w of the dispatch order, decoded: its batch x head, the first grid coordinate of each half
    of its query tile (the half box splits one dimension), its key-tile box, the box's size and, per
    mode, the second run (1-D) or the box of full key tiles (grids). The first LONG rows go head-major
    (each (row, head) in turn: the longest tiles start first on every head, not when the hardware
    reaches that head), the rest row-major within each head (neighbouring items share K/V in L2)."""
    ROW: gl.constexpr = 12 if RUNS == 2 else (15 if BOX else 9)
    rest = gl.maximum(count - LONG, 1)
    late = w - LONG * BH
    head_major = late < 0
    x = gl.where(head_major, w // BH, LONG + late % rest)
    bh = gl.where(head_major, w % BH, late // rest)
    entry = table_ptr + (tile_base + x) * ROW
    c0 = gl.load(entry)
    c1 = gl.load(entry + 1)
    c2 = gl.load(entry + 2)
    lo0 = gl.load(entry + 3)
    lo1 = gl.load(entry + 5)
    lo2 = gl.load(entry + 7)
    e1 = gl.load(entry + 6) - lo1
    e2 = gl.load(entry + 8) - lo2
    n = (gl.load(entry + 4) - lo0) * e1 * e2
    na = n
    lo2b = lo2
    every = 0
    if RUNS == 2:  # 1-D: a second run of key tiles after the first, and the mask-every-tile flag
        lo2b = gl.load(entry + 9)
        n = na + gl.load(entry + 10) - lo2b
        every = gl.load(entry + 11)
    full = (lo0, lo0, lo0, lo0, lo0, lo0)
    if BOX:  # the key tiles [lo, hi) per dimension that every row of this query tile sees entirely
        full = (gl.load(entry + 9), gl.load(entry + 10), gl.load(entry + 11), gl.load(entry + 12),
                gl.load(entry + 13), gl.load(entry + 14))
    q0 = (c0 * T0, c0 * T0 + (T0 - H0))
    q1 = (c1 * T1, c1 * T1 + (T1 - H1))
    q2 = (c2 * T2, c2 * T2 + (T2 - H2))
    return bh, q0, q1, q2, lo0, lo1, lo2, e1, e2, n, na, lo2b, every, full


@gluon.jit
def _load_item(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty,
               bh, bh_kv, q0, q1, q2, lo0, lo1, lo2, e1, e2, n, na, lo2b, g, j, K0: gl.constexpr, K1: gl.constexpr,
               K2: gl.constexpr, NUM_STAGES: gl.constexpr, RUNS: gl.constexpr, QBUF: gl.constexpr):
    """Item j of the program (g key tiles loaded before it): Q's two halves into Q buffer j % QBUF, then
    the key-tile box row-major (last dimension fastest) into the ring, whose stage and parity follow
    g, so the next item's Q and K/V load while the consumers finish this one."""
    qb = j % QBUF
    if QBUF > 1:  # a fresh mbarrier counts as "phase 1 complete": each buffer's first use does not wait
        mbarrier.wait(q_empty.index(qb), ((j // QBUF) & 1) ^ 1)
    qbar = q_bar.index(qb)
    mbarrier.expect(qbar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [bh, q0[0], q1[0], q2[0], 0], qbar, q_smem.index(2 * qb))
    tma.async_copy_global_to_shared(q_desc, [bh, q0[1], q1[1], q2[1], 0], qbar, q_smem.index(2 * qb + 1))
    for i in range(n):
        t = g + i
        stage = t % NUM_STAGES
        mbarrier.wait(kv_empty.index(stage), ((t // NUM_STAGES) & 1) ^ 1)
        jj = i // e2
        if RUNS == 2:  # 1-D: every leading coordinate is 0
            coord = [bh_kv, 0, 0, _key_tile(i, lo2, na, lo2b, RUNS) * K2, 0]
        else:
            coord = [bh_kv, (lo0 + jj // e1) * K0, (lo1 + jj % e1) * K1, (lo2 + i % e2) * K2, 0]
        kb = k_ready.index(stage)
        mbarrier.expect(kb, k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, coord, kb, k_bufs.index(stage))
        vb = v_ready.index(stage)
        mbarrier.expect(vb, v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, coord, vb, v_bufs.index(stage))


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty,
            bh, q0, q1, q2, lo0, lo1, lo2, e1, e2, n, na, lo2b, work, table_ptr, tile_base, count, BH, LONG, GROUP,
            T0: gl.constexpr, T1: gl.constexpr, T2: gl.constexpr, K0: gl.constexpr, K1: gl.constexpr,
            K2: gl.constexpr, NUM_STAGES: gl.constexpr, RUNS: gl.constexpr, BOX: gl.constexpr, QBUF: gl.constexpr):
    """The program's items in turn (the first decoded by the caller); `work` = (its first item, the
    stride between its items, how many it runs: one when QBUF == 1)."""
    _load_item(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty,
               bh, bh // GROUP, q0, q1, q2, lo0, lo1, lo2, e1, e2, n, na, lo2b, 0, 0, K0, K1, K2, NUM_STAGES, RUNS,
               QBUF)
    if QBUF > 1:
        H0: gl.constexpr = q_desc.block_shape[1]
        H1: gl.constexpr = q_desc.block_shape[2]
        H2: gl.constexpr = q_desc.block_shape[3]
        g = n
        w0, stride, items = work
        for j in range(1, items):
            bh, q0, q1, q2, lo0, lo1, lo2, e1, e2, n, na, lo2b, _every, _full = _item(
                w0 + j * stride, table_ptr, tile_base, count, BH, LONG, T0, T1, T2, H0, H1, H2, RUNS, BOX)
            _load_item(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty,
                       bh, bh // GROUP, q0, q1, q2, lo0, lo1, lo2, e1, e2, n, na, lo2b, g, j, K0, K1, K2,
                       NUM_STAGES, RUNS, QBUF)
            g += n


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, p_layout: gl.constexpr, o_row: gl.constexpr, dtype: gl.constexpr):
    """One online-softmax update in the log2 domain (qk_scale = scale * log2 e).

    A row whose scores are all -inf (only -inf inputs make them) keeps P = 0 instead of NaN, as the
    template and SDPA do: the subtracted maximum is 0 then.
    """
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return m_new, l_i, gl.convert_layout(p.to(dtype), p_layout), gl.convert_layout(alpha, o_row)


@gluon.jit
def _mask_edge(s, i, n, na, lo2, lo2b, every, LK, lo_a, hi_a, lo_b, hi_b, s_col: gl.constexpr,
               BLOCK_N: gl.constexpr, RUNS: gl.constexpr, TERMS: gl.constexpr):
    """S with -inf where the row does not attend the key, on the tiles that may be partial: the first
    and last of each run, or every tile of a query tile whose table row says so (codegen.gluon_runs
    sets that flag where a run has a partial tile inside). A row attends key j when one of its
    intervals [lo, hi] holds it; keys past the grid's end (a ragged last tile, zero-filled by the
    copy engine) never; LK is the key extent (a segment's buffer may be shorter than the rows)."""
    edge = (i == 0) | (i == n - 1) | (every != 0)
    if RUNS == 2:
        edge = edge | (i == na - 1) | (i == na)
    if edge:
        cols = _key_tile(i, lo2, na, lo2b, RUNS) * BLOCK_N + gl.arange(0, BLOCK_N, layout=s_col)
        c = gl.expand_dims(cols, 0)
        ok = (c >= gl.expand_dims(lo_a, 1)) & (c <= gl.expand_dims(hi_a, 1))
        if TERMS == 2:
            ok = ok | ((c >= gl.expand_dims(lo_b, 1)) & (c <= gl.expand_dims(hi_b, 1)))
        ok = ok & (c < LK)
        s = gl.where(ok, s, float("-inf"))
    return s


@gluon.jit
def _mask_box(s, i, lo0, lo1, lo2, e1, e2, full, bnd, s_col: gl.constexpr, BLOCK_N: gl.constexpr,
              K0: gl.constexpr, K1: gl.constexpr, K2: gl.constexpr):
    """S with -inf where the row does not see the key, on the key tiles of step i that are not full
    for this query tile in some dimension (codegen.gluon_boxes): a row sees a key when each of its
    coordinates lies in the row's interval [lo_d, hi_d] there. `full` = the table's full key-tile
    range per dimension, `bnd` = the rows' six bounds. A key past the grid (a tile overhanging a
    ragged extent; the copy engine loaded zeros) lies outside every interval."""
    fa0, fb0, fa1, fb1, fa2, fb2 = full
    j = i // e2
    t0 = lo0 + j // e1
    t1 = lo1 + j % e1
    t2 = lo2 + i % e2
    if (t0 < fa0) | (t0 >= fb0) | (t1 < fa1) | (t1 >= fb1) | (t2 < fa2) | (t2 >= fb2):
        b0l, b0h, b1l, b1h, b2l, b2h = bnd
        c = gl.arange(0, BLOCK_N, layout=s_col)
        k0 = gl.expand_dims(t0 * K0 + c // (K1 * K2), 0)
        k1 = gl.expand_dims(t1 * K1 + (c // K2) % K1, 0)
        k2 = gl.expand_dims(t2 * K2 + c % K2, 0)
        ok = (k0 >= gl.expand_dims(b0l, 1)) & (k0 <= gl.expand_dims(b0h, 1))
        ok = ok & (k1 >= gl.expand_dims(b1l, 1)) & (k1 <= gl.expand_dims(b1h, 1))
        ok = ok & (k2 >= gl.expand_dims(b2l, 1)) & (k2 <= gl.expand_dims(b2h, 1))
        s = gl.where(ok, s, float("-inf"))
    return s


@gluon.jit
def _consume_item(o_desc, lse_ptr, q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty, turn,
                  bh, q0, q1, q2, n, N1, N2, qk_scale, L, LK, bounds_ptr, lo0, lo1, lo2, e1, e2, na, lo2b,
                  every, full, g, tt, j, CID: gl.constexpr, SUB_M: gl.constexpr,
                  T1: gl.constexpr, T2: gl.constexpr, WARPS: gl.constexpr,
                  BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                  RUNS: gl.constexpr, TERMS: gl.constexpr, BOX: gl.constexpr, K0: gl.constexpr,
                  K1: gl.constexpr, K2: gl.constexpr, QBUF: gl.constexpr):
    """Item j of the program: g key tiles and tt ping-pong turns came before it (the ring's and the
    turns' parities count over the program's items); its Q is in buffer j % QBUF."""
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                        instr_shape=[16, HEAD_D, 16])
    # P feeds the PV wgmma straight from registers: converting from S's layout moves no data through smem
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_row: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_col: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_row: gl.constexpr = gl.SliceLayout(1, o_layout)
    r = CID * SUB_M + gl.arange(0, SUB_M, layout=s_row)  # row of the query tile -> token of the grid
    x1 = q1[0] + (r // T2) % T1
    x2 = q2[0] + r % T2
    token = ((q0[0] + r // (T1 * T2)) * N1 + x1) * N2 + x2
    live = (token < L) & (x1 < N1) & (x2 < N2)  # a ragged tile's rows past the grid write nothing
    bnd = (token, token, token, token, token, token)
    if BOX:  # this consumer's rows' key interval per dimension (codegen.gluon_boxes: lo_d then hi_d, per d)
        x0 = q0[0] + r // (T1 * T2)
        N0 = L // (N1 * N2)
        b1 = 2 * N0
        b2 = b1 + 2 * N1
        bnd = (gl.load(bounds_ptr + x0, mask=live, other=1), gl.load(bounds_ptr + N0 + x0, mask=live, other=0),
               gl.load(bounds_ptr + b1 + x1, mask=live, other=1), gl.load(bounds_ptr + b1 + N1 + x1, mask=live, other=0),
               gl.load(bounds_ptr + b2 + x2, mask=live, other=1), gl.load(bounds_ptr + b2 + N2 + x2, mask=live, other=0))
    lo_a = token
    hi_a = token
    lo_b = token
    hi_b = token
    if TERMS > 0:  # this consumer's rows' key intervals, per term ([TERMS, 2, L] int32; none past the end)
        lo_a = gl.load(bounds_ptr + token, mask=live, other=1)
        hi_a = gl.load(bounds_ptr + L + token, mask=live, other=0)
        if TERMS == 2:
            lo_b = gl.load(bounds_ptr + 2 * L + token, mask=live, other=1)
            hi_b = gl.load(bounds_ptr + 3 * L + token, mask=live, other=0)

    qb = j % QBUF
    q_box = q_smem.index(2 * qb + CID)  # this consumer's half of the query tile, a box of the grid
    q_sub = q_box.reshape([SUB_M, HEAD_D])
    m_i = gl.full([SUB_M], float("-inf"), gl.float32, s_row)
    l_i = gl.full([SUB_M], 0.0, gl.float32, s_row)
    acc = gl.zeros([SUB_M, HEAD_D], gl.float32, o_layout)
    # n >= 1: the host launches only tiles that visit something (the loop peels tile 0)

    mbarrier.wait(q_bar.index(qb), (j // QBUF) & 1)
    first = g % NUM_STAGES
    mbarrier.wait(k_ready.index(first), (g // NUM_STAGES) & 1)
    s = warpgroup_mma(q_sub, k_bufs.index(first).reshape([BLOCK_N, HEAD_D]).permute((1, 0)),
                      gl.zeros([SUB_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
    if QBUF > 1:  # noqa: SIM102 - a constexpr test, then a runtime one
        if j > 0:  # the previous item's O has left its Q buffer (the store overlapped this QK): free it
            tma.store_wait(0)
            mbarrier.arrive(q_empty.index((j - 1) % QBUF))
    s = warpgroup_mma_wait(0, deps=(s, ))
    if TERMS > 0:
        s = _mask_edge(s, 0, n, na, lo2, lo2b, every, LK, lo_a, hi_a, lo_b, hi_b, s_col, BLOCK_N, RUNS, TERMS)
    if BOX:
        s = _mask_box(s, 0, lo0, lo1, lo2, e1, e2, full, bnd, s_col, BLOCK_N, K0, K1, K2)
    m_i, l_i, p, alpha = _softmax_step(s, m_i, l_i, qk_scale, p_layout, o_row, dtype)

    for i in range(1, n):
        prev = (g + i - 1) % NUM_STAGES
        cur = (g + i) % NUM_STAGES
        if PINGPONG:  # consumer 0 goes first; each passes the turn right after issuing its MMAs
            mbarrier.wait(turn.index(CID), ((tt + i - 1) & 1) ^ (1 - CID))
        mbarrier.wait(v_ready.index(prev), ((g + i - 1) // NUM_STAGES) & 1)
        acc = warpgroup_mma(p, v_bufs.index(prev).reshape([BLOCK_N, HEAD_D]), acc, is_async=True)
        mbarrier.wait(k_ready.index(cur), ((g + i) // NUM_STAGES) & 1)
        s = warpgroup_mma(q_sub, k_bufs.index(cur).reshape([BLOCK_N, HEAD_D]).permute((1, 0)),
                          gl.zeros([SUB_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - CID))
        s, acc, p = warpgroup_mma_wait(0, deps=(s, acc, p))
        mbarrier.arrive(kv_empty.index(prev))
        if TERMS > 0:
            s = _mask_edge(s, i, n, na, lo2, lo2b, every, LK, lo_a, hi_a, lo_b, hi_b, s_col, BLOCK_N, RUNS, TERMS)
        if BOX:
            s = _mask_box(s, i, lo0, lo1, lo2, e1, e2, full, bnd, s_col, BLOCK_N, K0, K1, K2)
        m_i, l_i, p, alpha = _softmax_step(s, m_i, l_i, qk_scale, p_layout, o_row, dtype)
        acc = acc * gl.expand_dims(alpha, 1)

    last = (g + n - 1) % NUM_STAGES
    mbarrier.wait(v_ready.index(last), ((g + n - 1) // NUM_STAGES) & 1)
    acc = warpgroup_mma(p, v_bufs.index(last).reshape([BLOCK_N, HEAD_D]), acc, is_async=True)
    acc, p = warpgroup_mma_wait(0, deps=(acc, p))
    mbarrier.arrive(kv_empty.index(last))

    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    o = acc / gl.expand_dims(gl.convert_layout(l_safe, o_row), 1)
    q_sub.store(o.to(dtype))  # this consumer's Q rows are dead: stage O there for the TMA store
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [bh, q0[CID], q1[CID], q2[CID], 0], q_box)
    lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    gl.store(lse_ptr + bh * L + token, lse, mask=live)
    if QBUF == 1:
        tma.store_wait(0)


@gluon.jit
def _consumer(o_desc, lse_ptr, q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty, turn,
              bh, q0, q1, q2, n, N1, N2, qk_scale, L, LK, bounds_ptr, lo0, lo1, lo2, e1, e2, na, lo2b, every, full,
              work, table_ptr, tile_base, count, BH, LONG, CID: gl.constexpr, SUB_M: gl.constexpr,
              T0: gl.constexpr, T1: gl.constexpr, T2: gl.constexpr, WARPS: gl.constexpr,
              BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr, PINGPONG: gl.constexpr,
              RUNS: gl.constexpr, TERMS: gl.constexpr, BOX: gl.constexpr, K0: gl.constexpr,
              K1: gl.constexpr, K2: gl.constexpr, QBUF: gl.constexpr):
    """The program's items in turn (the first decoded by the caller); `work` = (its first item, the
    stride between its items, how many it runs: one when QBUF == 1). The next item's table row is
    read before this one runs, so its latency hides under this item's main loop."""
    H0: gl.constexpr = o_desc.block_shape[1]
    H1: gl.constexpr = o_desc.block_shape[2]
    H2: gl.constexpr = o_desc.block_shape[3]
    w0, stride, items = work
    last = count * BH - 1
    if QBUF > 1:
        nxt = _item(gl.minimum(w0 + stride, last), table_ptr, tile_base, count, BH, LONG, T0, T1, T2, H0, H1, H2,
                    RUNS, BOX)
    _consume_item(o_desc, lse_ptr, q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty, turn,
                  bh, q0, q1, q2, n, N1, N2, qk_scale, L, LK, bounds_ptr, lo0, lo1, lo2, e1, e2, na, lo2b,
                  every, full, 0, 0, 0, CID, SUB_M, T1, T2, WARPS, BLOCK_N, HEAD_D, NUM_STAGES, PINGPONG,
                  RUNS, TERMS, BOX, K0, K1, K2, QBUF)
    if QBUF > 1:
        g = n
        tt = n - 1
        for j in range(1, items):
            bh, q0, q1, q2, lo0, lo1, lo2, e1, e2, n, na, lo2b, every, full = nxt
            nxt = _item(gl.minimum(w0 + (j + 1) * stride, last), table_ptr, tile_base, count, BH, LONG, T0, T1, T2,
                        H0, H1, H2, RUNS, BOX)
            _consume_item(o_desc, lse_ptr, q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty, turn,
                          bh, q0, q1, q2, n, N1, N2, qk_scale, L, LK, bounds_ptr, lo0, lo1, lo2, e1, e2, na, lo2b,
                          every, full, g, tt, j, CID, SUB_M, T1, T2, WARPS, BLOCK_N, HEAD_D, NUM_STAGES,
                          PINGPONG, RUNS, TERMS, BOX, K0, K1, K2, QBUF)
            g += n
            tt += n - 1
        tma.store_wait(0)


@gluon.jit
def attention_fwd(q_desc, k_desc, v_desc, o_desc, lse_ptr, table_ptr, tile_base, qk_scale, L, N1, N2, GROUP,
                  bounds_ptr, count, BH, LONG, LK, PER, T0: gl.constexpr, T1: gl.constexpr, T2: gl.constexpr, K0: gl.constexpr, K1: gl.constexpr,
                  K2: gl.constexpr, HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  NUM_STAGES: gl.constexpr, PINGPONG: gl.constexpr, LOADER_REGS: gl.constexpr,
                  CONSUMER_REGS: gl.constexpr, RUNS: gl.constexpr, TERMS: gl.constexpr, BOX: gl.constexpr,
                  QBUF: gl.constexpr, num_warps: gl.constexpr):
    """q/k/v/o descriptors address [batch x heads, n0, n1, n2, HEAD_D] (q and o in half query tiles,
    k and v in key tiles); `table_ptr` holds int32 rows (query-tile coordinates c0..c2, then [lo, hi)
    of key tiles per dimension, then with RUNS == 2 (1-D) a second run [lo, hi) of the last dimension
    and a flag: predicate every tile) per launched tile. The work items are the count x BH (row, head)
    pairs in dispatch order (`_item`); row r runs table row tile_base + r. Program p of G runs items
    p, p + G, ... (PER at most; two Q buffers, QBUF = 2, when PER > 1): then the loader fetches the next
    item's Q and K/V while the consumers finish the current one, and a short item's launch and prologue are paid once
    per PER items. TERMS > 0: the mask's rows' key intervals are in `bounds_ptr` and the runs' edge
    tiles are masked (codegen.gluon_runs). BOX: a row of 15 ends with the key tiles [lo, hi) per
    dimension that need no predicate; the others are masked with each row's key interval per dimension
    from `bounds_ptr` (codegen.gluon_boxes), which also covers tiles overhanging a ragged grid (the copy
    engine zero-fills loads past it, clips stores)."""
    H0: gl.constexpr = o_desc.block_shape[1]
    H1: gl.constexpr = o_desc.block_shape[2]
    H2: gl.constexpr = o_desc.block_shape[3]
    # program p runs items p, p + G, p + 2G, ... (G programs): the items running at once stay neighbours
    w0 = gl.program_id(0)
    stride = gl.num_programs(0)
    work = (w0, stride, gl.minimum(PER, (count * BH - w0 + stride - 1) // stride))
    bh, q0, q1, q2, lo0, lo1, lo2, e1, e2, n, na, lo2b, every, full = _item(
        w0, table_ptr, tile_base, count, BH, LONG, T0, T1, T2, H0, H1, H2, RUNS, BOX)

    dtype: gl.constexpr = q_desc.dtype
    SUB_M: gl.constexpr = BLOCK_M // 2
    q_smem = gl.allocate_shared_memory(dtype, [2 * QBUF, 1, H0, H1, H2, HEAD_D], o_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, K0, K1, K2, HEAD_D], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, K0, K1, K2, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [QBUF, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [QBUF, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(QBUF):
        mbarrier.init(q_bar.index(b), count=1)
        mbarrier.init(q_empty.index(b), count=2)
    for st in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(st), count=1)
        mbarrier.init(v_ready.index(st), count=1)
        mbarrier.init(kv_empty.index(st), count=2)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)

    gl.warp_specialize([
        (_consumer, (o_desc, lse_ptr, q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty, turn, bh,
                     q0, q1, q2, n, N1, N2, qk_scale, L, LK, bounds_ptr, lo0, lo1, lo2, e1, e2, na, lo2b, every, full,
                     work, table_ptr, tile_base, count, BH, LONG, 0, SUB_M, T0, T1, T2, num_warps, BLOCK_N, HEAD_D,
                     NUM_STAGES, PINGPONG, RUNS, TERMS, BOX, K0, K1, K2, QBUF)),
        (_consumer, (o_desc, lse_ptr, q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty, turn, bh,
                     q0, q1, q2, n, N1, N2, qk_scale, L, LK, bounds_ptr, lo0, lo1, lo2, e1, e2, na, lo2b, every, full,
                     work, table_ptr, tile_base, count, BH, LONG, 1, SUB_M, T0, T1, T2, num_warps, BLOCK_N, HEAD_D,
                     NUM_STAGES, PINGPONG, RUNS, TERMS, BOX, K0, K1, K2, QBUF)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty, bh,
                   q0, q1, q2, lo0, lo1, lo2, e1, e2, n, na, lo2b, work, table_ptr, tile_base, count, BH, LONG, GROUP,
                   T0, T1, T2, K0, K1, K2, NUM_STAGES, RUNS, BOX, QBUF)),
    ], [num_warps, 1], [CONSUMER_REGS, LOADER_REGS])


@functools.lru_cache(maxsize=None)
def _smem_layout(box: tuple[int, ...], dtype: torch.dtype):
    """The swizzled shared-memory layout of a box: computed once (it costs ~5 us a call, and a one-head
    launch is host-bound). A box of 64 or 128 rows of head_dim swizzles like a [rows, head_dim]
    matrix, so the wgmma reads it through a plain reshape."""
    return gl.NVMMASharedLayout.get_default_for(list(box), gl.float16 if dtype == torch.float16 else gl.bfloat16)


def half_tile(q_tile: tuple[int, ...]) -> tuple[int, ...]:
    """A consumer's half of the query tile: rows 0-63 of the row-major box are the lower half of its
    first dimension longer than 1 (tiles of 128 tokens have even extents there)."""
    d = next(i for i, t in enumerate(q_tile) if t > 1)
    return q_tile[:d] + (q_tile[d] // 2,) + q_tile[d + 1:]


def _descriptor(t: torch.Tensor, grid: tuple[int, ...], box: tuple[int, ...]) -> TensorDescriptor:
    batch, heads, _, head_dim = t.shape
    block = [1, *box, head_dim]
    return TensorDescriptor(t, [batch * heads, *grid, head_dim], box_strides(t, grid), block,
                            _smem_layout(tuple(block), t.dtype))


def kernel_args(q, k, v, out, lse, scale: float, table: torch.Tensor, first: int, count: int,
                grid: tuple[int, ...], q_tile: tuple[int, ...], kv_tile: tuple[int, ...],
                pingpong: bool = PINGPONG, bounds: torch.Tensor | None = None, long: int = 0,
                k_grid: tuple[int, ...] | None = None, per: int = 1):
    """(grid, args, keyword args) of one launch over rows [first, first + count) of `table`; grid and
    tiles are RANK-dimensional (codegen.gluon_plan pads them). `per`: work items per program
    (codegen.gluon_plan.GluonSchedule.items_per_program).

    Separate from `launch` so a test can bind and compile the kernel for sm_90 without a GPU. A table of
    12 columns holds two runs and a flag (1-D); `bounds` ([slots, 2, tokens] int32: each row's key
    intervals, codegen.gluon_runs) turns on the edge tiles' predicate.
    """
    batch, heads, tokens, head_dim = q.shape
    runs = 2 if table.shape[1] == 12 else 1
    terms = 0 if bounds is None else bounds.shape[0]
    box = table.shape[1] == 15  # codegen.gluon_boxes: a predicate per dimension on the tiles not full
    half = half_tile(q_tile)
    k_grid = grid if k_grid is None else k_grid
    args = (_descriptor(q, grid, half), _descriptor(k, k_grid, kv_tile), _descriptor(v, k_grid, kv_tile),
            _descriptor(out, grid, half), lse, table, first, scale * LOG2E, tokens, grid[1], grid[2], heads // k.shape[1],
            table if bounds is None else bounds, count, batch * heads, min(long, count), k.shape[2], per)
    kwargs = dict(T0=q_tile[0], T1=q_tile[1], T2=q_tile[2], K0=kv_tile[0], K1=kv_tile[1], K2=kv_tile[2],
                  HEAD_D=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_STAGES=NUM_STAGES, PINGPONG=pingpong,
                  LOADER_REGS=LOADER_REGS, CONSUMER_REGS=CONSUMER_REGS, RUNS=runs, TERMS=0 if box else terms, BOX=box,
                  QBUF=2 if per > 1 else 1,
                  num_warps=CONSUMER_WARPS, maxnreg=MAXNREG)
    return (-(-count * batch * heads // per),), args, kwargs


def launch(q, k, v, out, lse, scale: float, table: torch.Tensor, first: int, count: int,
           grid: tuple[int, ...], q_tile: tuple[int, ...], kv_tile: tuple[int, ...],
           pingpong: bool = PINGPONG, bounds: torch.Tensor | None = None, long: int = 0,
           k_grid: tuple[int, ...] | None = None, per: int = 1) -> None:
    """Run `count` query tiles (rows of `table`) for every (batch, head); the caller checked eligibility."""
    if count:
        launch_grid, args, kwargs = kernel_args(q, k, v, out, lse, scale, table, first, count, grid, q_tile,
                                                kv_tile, pingpong, bounds, long, k_grid, per)
        attention_fwd[launch_grid](*args, **kwargs)
