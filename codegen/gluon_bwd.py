"""A warp-specialized Hopper (sm_90) attention backward in Gluon, for whole-tile masks (FlashAttention-3's layout).

Why: the Triton split backward (codegen.backward) computes 7 tile products per (key tile, query
tile) pair, deterministically (dQ in its own pass recomputes S and dP). This one computes 5 and
accumulates dQ in an fp32 buffer with atomic adds, so its dQ is not bitwise reproducible run to run
(the order of the adds varies); dK and dV are (see GQA below). `deterministic=True` is the Triton
backward's.

It runs the masks whose forward schedule is the whole-tile mode (maskdsl.analysis.gluon_rule: every
visited 128 x 128 tile pair full, so no predicate), walked transposed: one program per (key tile
some query tile visits, query head), over the query tiles that visit it (codegen.gluon_bwd_plan's
key and visit tables), in 64-row halves of a query tile (a step).

Four partitions (`gl.warp_specialize`, 10 warps):
  * loader (1 warp): TMA-loads the key tile's K and V once (two 64-row half boxes each, one per
    consumer), then each step's Q and dO half boxes into a ring of NUM_STAGES stages, with the
    step's rows' LSE and delta by cp.async (`q_ready`: transaction counts and the cp.async's
    deferred arrive; `q_empty`, count 2, arrived by both consumers); at the end, the epilogue's
    TMA stores.
  * two consumers (4 warps each), key rows 0-63 and 64-127 of the tile, each holding its dK, dV
    [64, head_dim] in fp32 registers. Per step, with S and dP [64 queries, 64 keys] (queries as rows,
    so LSE and delta are two registers a thread):
      S = Q K^T and dP = dO V^T (async wgmma, both in flight),
      P = exp2(S scale log2 e - LSE log2 e), dS = P (dP - delta)    (registers),
      dV += P^T dO, dK += dS^T Q  (P and dS through shared memory, read transposed),
      dQ_part = dS K over the consumer's 64 keys (dS from registers),
    and dQ_part goes to shared memory for the writer. At head_dim 128 that is 192 accumulator
    registers of the 240 a consumer has. With PINGPONG the two take turns issuing their MMAs.
  * dQ writer (1 warp): sums the two consumers' parts of a step and adds them, times the scale, to
    the fp32 dQ buffer [B, H, L, D] by relaxed vector atomics (Gluon 3.6 has no TMA reduce-add),
    one add per element and (key tile, query tile) pair; torch converts the buffer to dq's dtype.
  * epilogue: each consumer writes its dK (times the scale), dV into its (now free) K and V buffers and
    the loader stores them by TMA (the coordinates and descriptors kept in a consumer's registers
    through the main loop spilled at head_dim 128): into dk, dv (MHA), or into per-query-head
    partials [B, H, L, D] in the inputs' dtype
    that the host sums over the group in fp32 in a fixed order (GQA: the heads of a group run as
    separate programs, not serialized on one, and dK, dV stay deterministic).

LSE is the forward's natural-log LSE (fp32 [B x H x L]); a row with LSE -inf (it sees no key; the
whole-tile mode launches none, but a caller may hand one) gets P = 0, never NaN. delta = rowsum(dO O)
comes from a small Gluon kernel (`attention_bwd_delta`).
"""

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

from maskdsl.codegen.dispatch import box_strides
from maskdsl.codegen.gluon_aggregates import _INT, Counter, _value
from maskdsl.codegen.gluon_bwd_plan import FIRST, KEY_COORD, KEY_WIDTH, LAST, VISIT_COORD, VISIT_WIDTH, \
    GluonBackwardSchedule

LOG2E = 1.4426950408889634
NUM_STAGES = 2  # Q and dO stages: 64 KB at head_dim 128 beside K, V (64 KB) and dS (16 KB)
CONSUMER_WARPS = 4
LOADER_REGS = 24
WRITER_REGS = 24
WRITER_WARPS = 1  # the dQ writer's warps (it shares the third warpgroup with the loader)
# The consumers take turns issuing their MMAs (S and dP, then dV, dK and dQ), so one's exponentials and
# shared-memory stores run under the other's MMAs; without it the two run in step. Unmeasured: off.
PINGPONG = False
CONSUMER_REGS = 240
MAXNREG = 65536 // (32 * 12) // 8 * 8  # 12 warps at launch; setmaxnreg moves the loader's to the consumers
DELTA_BLOCK = 64

# the tables' columns (codegen.gluon_bwd_plan), constexpr globals: a changed layout compiles anew
_KEY = gl.constexpr((KEY_COORD, KEY_COORD + 1, KEY_COORD + 2, FIRST, LAST, KEY_WIDTH))
_VISIT = gl.constexpr((VISIT_COORD, VISIT_COORD + 1, VISIT_COORD + 2, VISIT_WIDTH))


@aggregate
class BwdConfig:
    """What the kernel is compiled for (constexprs only): the query tile T and its half H (a step's
    rows), the key tile KT and its half KH (a consumer's rows), boxes of the 3-D grid; head_dim, the
    ring's stages, and the register layouts: `s_layout` of S^T / dP^T [64 keys, 64 queries],
    `d_layout` of dK, dV, dQ_part [64, head_dim], `op_layout` P^T / dS^T as a wgmma A operand."""
    T0: gl.constexpr
    T1: gl.constexpr
    T2: gl.constexpr
    H0: gl.constexpr
    H1: gl.constexpr
    H2: gl.constexpr
    KT0: gl.constexpr
    KT1: gl.constexpr
    KT2: gl.constexpr
    KH0: gl.constexpr
    KH1: gl.constexpr
    KH2: gl.constexpr
    HEAD_D: gl.constexpr
    SUB_M: gl.constexpr  # query rows of a step
    SUB_N: gl.constexpr  # key rows of a consumer
    dtype: gl.constexpr
    NUM_STAGES: gl.constexpr
    PINGPONG: gl.constexpr
    WRITER_WARPS: gl.constexpr
    s_layout: gl.constexpr
    d_layout: gl.constexpr
    op_layout: gl.constexpr
    s_row: gl.constexpr
    d_row: gl.constexpr
    d_col: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, q_tile, kv_tile, q_desc, k_desc, NUM_STAGES, PINGPONG, WRITER_WARPS, WARPS):
        self.T0, self.T1, self.T2 = (gl.constexpr(t) for t in q_tile)
        self.H0, self.H1, self.H2 = (gl.constexpr(h) for h in q_desc.block_shape[1:4])
        self.KT0, self.KT1, self.KT2 = (gl.constexpr(t) for t in kv_tile)
        self.KH0, self.KH1, self.KH2 = (gl.constexpr(h) for h in k_desc.block_shape[1:4])
        self.HEAD_D = gl.constexpr(q_desc.block_shape[4])
        self.SUB_M = gl.constexpr(self.H0 * self.H1 * self.H2)
        self.SUB_N = gl.constexpr(self.KH0 * self.KH1 * self.KH2)
        self.dtype = gl.constexpr(q_desc.dtype)
        self.NUM_STAGES = gl.constexpr(NUM_STAGES)
        self.PINGPONG = gl.constexpr(PINGPONG)
        self.WRITER_WARPS = gl.constexpr(WRITER_WARPS)
        s_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                             instr_shape=[16, self.SUB_N, 16])
        d_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                             instr_shape=[16, self.HEAD_D, 16])
        self.s_layout = gl.constexpr(s_layout)
        self.d_layout = gl.constexpr(d_layout)
        self.op_layout = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=d_layout, k_width=2))
        self.s_row = gl.constexpr(gl.SliceLayout(1, s_layout))
        self.d_row = gl.constexpr(gl.SliceLayout(1, d_layout))
        self.d_col = gl.constexpr(gl.SliceLayout(0, d_layout))


@aggregate
class KeyItem:
    """A program's work: one (batch x query head) `bh` over one key tile (its grid coordinates k0, k1,
    k2 in key tiles), whose visitors are rows [first, first + steps / 2) of the visit table."""
    bh: gl.tensor
    k0: gl.tensor
    k1: gl.tensor
    k2: gl.tensor
    first: gl.tensor
    steps: gl.tensor
    visits: gl.tensor

    @gluon.constexpr_function
    def __init__(self, bh, k0, k1, k2, first, steps, visits):
        self.bh, self.k0, self.k1, self.k2 = bh, k0, k1, k2
        self.first, self.steps, self.visits = first, steps, visits

    @gluon.jit
    def of(keys_ptr, visits_ptr, count):
        """Program p's item: heads in turn, the key tiles of a head in table order (longest first),
        so the programs running at once share a head's Q and dO in L2."""
        p = gl.program_id(0)
        bh = p // count
        entry = keys_ptr + (p % count) * _KEY[5]
        first = gl.load(entry + _KEY[3])
        steps = 2 * (gl.load(entry + _KEY[4]) - first)
        return KeyItem(bh, gl.load(entry + _KEY[0]), gl.load(entry + _KEY[1]), gl.load(entry + _KEY[2]), first,
                       steps, visits_ptr)

    @gluon.jit
    def key_origin(self, half: gl.constexpr, cfg):
        """Grid coordinates of the first token of this half of the key tile."""
        return (self.k0 * cfg.KT0 + half * (cfg.KT0 - cfg.KH0), self.k1 * cfg.KT1 + half * (cfg.KT1 - cfg.KH1),
                self.k2 * cfg.KT2 + half * (cfg.KT2 - cfg.KH2))

    @gluon.jit
    def query_origin(self, j, cfg):
        """Grid coordinates of the first token of step j's rows: half j % 2 of visitor j // 2."""
        row = self.visits + (self.first + j // 2) * _VISIT[3]
        half = j % 2
        c0 = gl.load(row + _VISIT[0])
        c1 = gl.load(row + _VISIT[1])
        c2 = gl.load(row + _VISIT[2])
        return (c0 * cfg.T0 + half * (cfg.T0 - cfg.H0), c1 * cfg.T1 + half * (cfg.T1 - cfg.H1),
                c2 * cfg.T2 + half * (cfg.T2 - cfg.H2))


@gluon.jit
def _tokens(origin, r, N1, N2, E1: gl.constexpr, E2: gl.constexpr):
    """Token indices of rows r of a box with extents (.., E1, E2) at `origin` of a grid (.., N1, N2)."""
    a0, a1, a2 = origin
    return ((a0 + r // (E1 * E2)) * N1 + a1 + (r // E2) % E1) * N2 + a2 + r % E2


@aggregate
class BwdBuffers:
    """Shared memory and its mbarriers: the key tile's K and V (a half box per consumer, `kv_bar`),
    the ring of Q and dO stages (`q_ready`, `q_empty`), and each consumer's dS^T [64 keys, 64 queries]."""
    k_smem: gl.shared_memory_descriptor
    v_smem: gl.shared_memory_descriptor
    q_smem: gl.shared_memory_descriptor
    do_smem: gl.shared_memory_descriptor
    stats: gl.shared_memory_descriptor
    p_smem: gl.shared_memory_descriptor
    ds_smem: gl.shared_memory_descriptor
    kv_bar: gl.shared_memory_descriptor
    q_ready: gl.shared_memory_descriptor
    q_empty: gl.shared_memory_descriptor
    dq_smem: gl.shared_memory_descriptor
    dq_ready: gl.shared_memory_descriptor
    dq_empty: gl.shared_memory_descriptor
    turn: gl.shared_memory_descriptor

    @gluon.constexpr_function
    def __init__(self, k_smem, v_smem, q_smem, do_smem, stats, p_smem, ds_smem, kv_bar, q_ready, q_empty,
                 dq_smem, dq_ready, dq_empty, turn):
        self.k_smem, self.v_smem, self.q_smem, self.do_smem, self.stats = k_smem, v_smem, q_smem, do_smem, stats
        self.p_smem, self.ds_smem = p_smem, ds_smem
        self.kv_bar, self.q_ready, self.q_empty = kv_bar, q_ready, q_empty
        self.dq_smem, self.dq_ready, self.dq_empty, self.turn = dq_smem, dq_ready, dq_empty, turn

    @gluon.jit
    def wait_turn(self, t, CID: gl.constexpr):
        """Consumer CID waits for its turn t (consumer 0 first: a fresh barrier has completed the phase
        before), then issues its MMAs and passes the turn (`pass_turn`)."""
        mbarrier.wait(self.turn.index(CID), (t & 1) ^ (1 - CID))

    @gluon.jit
    def pass_turn(self, CID: gl.constexpr):
        mbarrier.arrive(self.turn.index(1 - CID))

    @gluon.jit
    def allocate(q_desc, k_desc, cfg):
        k_smem = gl.allocate_shared_memory(cfg.dtype, [2, 1, cfg.KH0, cfg.KH1, cfg.KH2, cfg.HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(cfg.dtype, [2, 1, cfg.KH0, cfg.KH1, cfg.KH2, cfg.HEAD_D], k_desc.layout)
        q_smem = gl.allocate_shared_memory(cfg.dtype, [cfg.NUM_STAGES, 1, cfg.H0, cfg.H1, cfg.H2, cfg.HEAD_D],
                                           q_desc.layout)
        do_smem = gl.allocate_shared_memory(cfg.dtype, [cfg.NUM_STAGES, 1, cfg.H0, cfg.H1, cfg.H2, cfg.HEAD_D],
                                            q_desc.layout)
        # per stage the step's rows' LSE, then their delta
        stats = gl.allocate_shared_memory(gl.float32, [2 * cfg.NUM_STAGES, cfg.SUB_M],
                                          gl.SwizzledSharedLayout(1, 1, 1, [0]))
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([cfg.SUB_M, cfg.SUB_N], cfg.dtype)
        p_smem = gl.allocate_shared_memory(cfg.dtype, [2, cfg.SUB_M, cfg.SUB_N], ds_layout)
        ds_smem = gl.allocate_shared_memory(cfg.dtype, [2, cfg.SUB_M, cfg.SUB_N], ds_layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # K, V in; dK, dV out
        q_ready = gl.allocate_shared_memory(gl.int64, [cfg.NUM_STAGES, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [cfg.NUM_STAGES, 1], mbarrier.MBarrierLayout())
        dq_layout: gl.constexpr = gl.SwizzledSharedLayout(4, 1, 1, [1, 0])
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, cfg.SUB_M, cfg.HEAD_D], dq_layout)
        dq_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar.index(0), count=1)
        mbarrier.init(kv_bar.index(1), count=2)
        for st in gl.static_range(cfg.NUM_STAGES):
            mbarrier.init(q_ready.index(st), count=1)
            mbarrier.init(q_empty.index(st), count=2)
        for c in gl.static_range(2):
            mbarrier.init(dq_ready.index(c), count=1)
            mbarrier.init(dq_empty.index(c), count=1)
            mbarrier.init(turn.index(c), count=1)
        return BwdBuffers(k_smem, v_smem, q_smem, do_smem, stats, p_smem, ds_smem, kv_bar, q_ready, q_empty, dq_smem, dq_ready,
                          dq_empty, turn)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, do_desc, bufs, item, GROUP, io, cfg):
    """K and V of the key tile once, then every step's Q and dO half boxes into the ring, with its rows'
    LSE and delta (cp.async, whose completion the stage's `q_ready` also waits for)."""
    bh_kv = item.bh // GROUP
    rows: gl.constexpr = gl.BlockedLayout([cfg.SUB_M // 32], [32], [1], [0])
    r = gl.arange(0, cfg.SUB_M, layout=rows)
    head = item.bh.to(gl.int64) * io.L
    kv = bufs.kv_bar.index(0)
    mbarrier.expect(kv, 4 * k_desc.block_type.nbytes)
    for half in gl.static_range(2):
        a0, a1, a2 = item.key_origin(half, cfg)
        tma.async_copy_global_to_shared(k_desc, [bh_kv, a0, a1, a2, 0], kv, bufs.k_smem.index(half))
        tma.async_copy_global_to_shared(v_desc, [bh_kv, a0, a1, a2, 0], kv, bufs.v_smem.index(half))
    for j in range(item.steps):
        c = Counter(j, cfg.NUM_STAGES)
        stage = c.slot()
        mbarrier.wait(bufs.q_empty.index(stage), c.free_phase())
        a0, a1, a2 = item.query_origin(j, cfg)
        bar = bufs.q_ready.index(stage)
        # first the small copies and their deferred arrive (it raises the pending count at once), then the
        # expect: the phase cannot complete between the two
        tok = _tokens((a0, a1, a2), r, io.N1, io.N2, cfg.H1, cfg.H2)
        async_copy.async_copy_global_to_shared(bufs.stats.index(2 * stage), io.lse_ptr + head + tok)
        async_copy.async_copy_global_to_shared(bufs.stats.index(2 * stage + 1), io.delta_ptr + head + tok)
        async_copy.mbarrier_arrive(bar)
        mbarrier.expect(bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [item.bh, a0, a1, a2, 0], bar, bufs.q_smem.index(stage))
        tma.async_copy_global_to_shared(do_desc, [item.bh, a0, a1, a2, 0], bar, bufs.do_smem.index(stage))
    # the epilogue: both consumers' dK, dV from their K and V buffers (the loader holds the coordinates
    # and descriptors; in a consumer they would sit in registers through the main loop and spill)
    mbarrier.wait(bufs.kv_bar.index(1), 0)
    for half in gl.static_range(2):
        a0, a1, a2 = item.key_origin(half, cfg)
        tma.async_copy_shared_to_global(io.dk_desc, [item.bh, a0, a1, a2, 0], bufs.k_smem.index(half))
        tma.async_copy_shared_to_global(io.dv_desc, [item.bh, a0, a1, a2, 0], bufs.v_smem.index(half))
    tma.store_wait(0)


@gluon.jit
def _consumer(io, bufs, item, cfg, CID: gl.constexpr):
    """Consumer CID: key rows CID * 64.. of the tile, every step, then its dK, dV."""
    k_sub = bufs.k_smem.index(CID).reshape([cfg.SUB_N, cfg.HEAD_D])
    v_sub = bufs.v_smem.index(CID).reshape([cfg.SUB_N, cfg.HEAD_D])
    p_buf = bufs.p_smem.index(CID)
    ds_buf = bufs.ds_smem.index(CID)
    dk = gl.zeros([cfg.SUB_N, cfg.HEAD_D], gl.float32, cfg.d_layout)
    dv = gl.zeros([cfg.SUB_N, cfg.HEAD_D], gl.float32, cfg.d_layout)
    mbarrier.wait(bufs.kv_bar.index(0), 0)
    for j in range(item.steps):
        c = Counter(j, cfg.NUM_STAGES)
        stage = c.slot()
        q_sub = bufs.q_smem.index(stage).reshape([cfg.SUB_M, cfg.HEAD_D])
        do_sub = bufs.do_smem.index(stage).reshape([cfg.SUB_M, cfg.HEAD_D])
        mbarrier.wait(bufs.q_ready.index(stage), c.phase())
        if cfg.PINGPONG:
            bufs.wait_turn(2 * j, CID)
        s = warpgroup_mma(q_sub, k_sub.permute((1, 0)), gl.zeros([cfg.SUB_M, cfg.SUB_N], gl.float32, cfg.s_layout),
                          use_acc=False, is_async=True)
        dp = warpgroup_mma(do_sub, v_sub.permute((1, 0)), gl.zeros([cfg.SUB_M, cfg.SUB_N], gl.float32, cfg.s_layout),
                           use_acc=False, is_async=True)
        if cfg.PINGPONG:
            bufs.pass_turn(CID)
        # a row that sees no key (LSE -inf) gets P = 0: subtract +inf instead
        lse = bufs.stats.index(2 * stage).load(cfg.s_row)
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        s = warpgroup_mma_wait(1, deps=(s, ))
        p = gl.exp2(s * io.qk_scale - gl.expand_dims(lse2, 1))
        p_buf.store(p.to(cfg.dtype))  # P [queries, keys]; dV = P^T dO reads it transposed
        dp = warpgroup_mma_wait(0, deps=(dp, ))
        delta = bufs.stats.index(2 * stage + 1).load(cfg.s_row)
        ds = (p * (dp - gl.expand_dims(delta, 1))).to(cfg.dtype)
        ds_buf.store(ds)  # dK = dS^T Q reads it transposed
        fence_async_shared()
        if cfg.PINGPONG:
            bufs.wait_turn(2 * j + 1, CID)
        dv = warpgroup_mma(p_buf.permute((1, 0)), do_sub, dv, is_async=True)
        dk = warpgroup_mma(ds_buf.permute((1, 0)), q_sub, dk, is_async=True)
        ds_op = gl.convert_layout(ds, cfg.op_layout)  # dQ part = dS K from registers
        dq = warpgroup_mma(ds_op, k_sub, gl.zeros([cfg.SUB_M, cfg.HEAD_D], gl.float32, cfg.d_layout), use_acc=False,
                           is_async=True)
        if cfg.PINGPONG:
            bufs.pass_turn(CID)
        dv, dk, dq, ds_op = warpgroup_mma_wait(0, deps=(dv, dk, dq, ds_op))
        mbarrier.arrive(bufs.q_empty.index(stage))  # Q and dO of this stage are read
        turn = Counter(j, 1)
        mbarrier.wait(bufs.dq_empty.index(CID), turn.free_phase())  # the writer has read the last step's
        bufs.dq_smem.index(CID).store(dq)
        mbarrier.arrive(bufs.dq_ready.index(CID))

    # dK, dV go to this consumer's K and V buffers (read for the last time); the loader stores them
    k_sub.store((dk * io.scale).to(cfg.dtype))
    v_sub.store(dv.to(cfg.dtype))
    fence_async_shared()
    mbarrier.arrive(bufs.kv_bar.index(1))


@gluon.jit
def _dq_writer(io, bufs, item, cfg):
    """Each step's two dQ parts (one per consumer's 64 keys) summed and added to the fp32 dQ buffer,
    times the scale, by relaxed atomic adds of 4 floats a thread: a chunk of rows at a time, one
    row a warp at head_dim 128 (few registers)."""
    ROWS: gl.constexpr = cfg.WRITER_WARPS * 32 * 4 // cfg.HEAD_D
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // cfg.HEAD_D, cfg.HEAD_D // 4], [cfg.WRITER_WARPS, 1],
                                            [1, 0])
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    cols = gl.expand_dims(gl.arange(0, cfg.HEAD_D, layout=gl.SliceLayout(0, layout)), 0)
    base = io.dq_ptr + item.bh.to(gl.int64) * io.L * cfg.HEAD_D
    # the two parts as chunks of ROWS rows (the same bytes: the layout is unswizzled and row-major)
    CHUNKS: gl.constexpr = cfg.SUB_M // ROWS
    # the chunks unrolled at head_dim 128 (one row a warp), 8 at a time below: with two rows a warp
    # the fully unrolled loop spills the writer's 24 registers, and a loop at 128 makes ptxas spill
    # in a consumer
    UNROLL: gl.constexpr = CHUNKS if cfg.HEAD_D >= 128 else 8
    chunks = bufs.dq_smem._reinterpret(gl.float32, [2 * CHUNKS, ROWS, cfg.HEAD_D], bufs.dq_smem.layout)
    for j in range(item.steps):
        turn = Counter(j, 1)
        origin = item.query_origin(j, cfg)
        mbarrier.wait(bufs.dq_ready.index(0), turn.phase())
        mbarrier.wait(bufs.dq_ready.index(1), turn.phase())
        if UNROLL == CHUNKS:
            for chunk in gl.static_range(CHUNKS):
                _add_chunk(chunks, chunk, CHUNKS, origin, r, cols, base, layout, io, cfg)
        else:
            for outer in range(CHUNKS // UNROLL):
                for inner in gl.static_range(UNROLL):
                    _add_chunk(chunks, outer * UNROLL + inner, CHUNKS, origin, r, cols, base, layout, io, cfg)
        mbarrier.arrive(bufs.dq_empty.index(0))
        mbarrier.arrive(bufs.dq_empty.index(1))


@gluon.jit
def _add_chunk(chunks, chunk, CHUNKS: gl.constexpr, origin, r, cols, base, layout: gl.constexpr, io, cfg):
    """Chunk `chunk` of both consumers' dQ parts, summed, times the scale, added to its rows of dQ."""
    part = chunks.index(chunk).load(layout) + chunks.index(CHUNKS + chunk).load(layout)
    tok = _tokens(origin, chunk * (cfg.SUB_M // CHUNKS) + r, io.N1, io.N2, cfg.H1, cfg.H2)
    gl.atomic_add(base + gl.expand_dims(tok * cfg.HEAD_D, 1) + cols, part * io.scale, sem="relaxed")


@aggregate
class BwdLaunch:
    """What the consumers read and write besides shared memory: LSE and delta [B x H x L] fp32, the dQ
    buffer [B x H x L x D] fp32, dK and dV ([B x H x L x D]: the outputs, or the GQA partials), the
    grid's L tokens and the extents N1, N2 of its last two dimensions, the scales."""
    lse_ptr: gl.tensor
    delta_ptr: gl.tensor
    dq_ptr: gl.tensor
    dk_desc: tma.tensor_descriptor
    dv_desc: tma.tensor_descriptor
    L: _INT
    N1: _INT
    N2: _INT
    qk_scale: gl.tensor
    scale: gl.tensor

    @gluon.constexpr_function
    def __init__(self, lse_ptr, delta_ptr, dq_ptr, dk_desc, dv_desc, L, N1, N2, qk_scale, scale):
        self.lse_ptr, self.delta_ptr, self.dq_ptr, self.dk_desc, self.dv_desc = lse_ptr, delta_ptr, dq_ptr, dk_desc, dv_desc
        self.L, self.N1, self.N2 = _value(L), _value(N1), _value(N2)
        self.qk_scale, self.scale = qk_scale, scale


@gluon.jit
def attention_bwd(q_desc, k_desc, v_desc, do_desc, lse_ptr, delta_ptr, dq_ptr, dk_desc, dv_desc, keys_ptr,
                  visits_ptr, count, GROUP, L, N1, N2, qk_scale, scale, Q_TILE: gl.constexpr,
                  KV_TILE: gl.constexpr, NUM_STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                  WRITER_WARPS: gl.constexpr,
                  LOADER_REGS: gl.constexpr, WRITER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                  num_warps: gl.constexpr):
    """q/do descriptors address [batch x heads, n0, n1, n2, HEAD_D] in half query tiles, k/v the kv heads'
    in half key tiles; program p runs key row p % count of `keys_ptr` (codegen.gluon_bwd_plan) for
    batch x head p // count."""
    cfg = BwdConfig(Q_TILE, KV_TILE, q_desc, k_desc, NUM_STAGES, PINGPONG, WRITER_WARPS, num_warps)
    item = KeyItem.of(keys_ptr, visits_ptr, count)
    bufs = BwdBuffers.allocate(q_desc, k_desc, cfg)
    io = BwdLaunch(lse_ptr, delta_ptr, dq_ptr, dk_desc, dv_desc, L, N1, N2, qk_scale, scale)
    gl.warp_specialize([
        (_consumer, (io, bufs, item, cfg, 0)),
        (_consumer, (io, bufs, item, cfg, 1)),
        (_loader, (q_desc, k_desc, v_desc, do_desc, bufs, item, GROUP, io, cfg)),
        (_dq_writer, (io, bufs, item, cfg)),
    ], [num_warps, 1, WRITER_WARPS], [CONSUMER_REGS, LOADER_REGS, WRITER_REGS])


@gluon.jit
def attention_bwd_delta(out_ptr, do_ptr, delta_ptr, rows, HEAD_D: gl.constexpr, BLOCK: gl.constexpr,
                        num_warps: gl.constexpr):
    """delta[r] = sum_d dO[r, d] O[r, d] in fp32, rows of [rows, HEAD_D] contiguous tensors."""
    cols_per_thread: gl.constexpr = 8
    col_threads: gl.constexpr = HEAD_D // cols_per_thread
    layout: gl.constexpr = gl.BlockedLayout([1, cols_per_thread], [32 // col_threads, col_threads],
                                            [num_warps, 1], [1, 0])
    r = gl.program_id(0) * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, layout))
    c = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, layout))
    live = r < rows
    offs = gl.expand_dims(r.to(gl.int64), 1) * HEAD_D + gl.expand_dims(c, 0)
    m = gl.expand_dims(live, 1)
    o = gl.load(out_ptr + offs, mask=m, other=0.0).to(gl.float32)
    d = gl.load(do_ptr + offs, mask=m, other=0.0).to(gl.float32)
    gl.store(delta_ptr + r, gl.sum(o * d, axis=1), mask=live)


@functools.lru_cache(maxsize=None)
def _smem_layout(box: tuple[int, ...], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(box), gl.float16 if dtype == torch.float16 else gl.bfloat16)


def half_tile(tile: tuple[int, ...]) -> tuple[int, ...]:
    """Rows 0-63 of a 128-token box, row-major: the lower half of its first dimension longer than 1
    (the forward's split, codegen.gluon_fwd.half_tile)."""
    d = next(i for i, t in enumerate(tile) if t > 1)
    return tile[:d] + (tile[d] // 2,) + tile[d + 1:]


def _descriptor(t: torch.Tensor, grid: tuple[int, ...], box: tuple[int, ...]) -> TensorDescriptor:
    batch, heads, _, head_dim = t.shape
    block = [1, *box, head_dim]
    return TensorDescriptor(t, [batch * heads, *grid, head_dim], box_strides(t, grid), block,
                            _smem_layout(tuple(block), t.dtype))


def kernel_args(q, k, v, dout, lse, delta, dq_acc, dk_out, dv_out, scale: float, keys: torch.Tensor,
                visits: torch.Tensor, grid: tuple[int, ...], q_tile: tuple[int, ...], kv_tile: tuple[int, ...],
                stages: int = NUM_STAGES, writer_warps: int = WRITER_WARPS, pingpong: bool = PINGPONG):
    """(grid, args, keyword args) of the backward over every row of `keys` for every (batch, head); grid
    and tiles 3-dimensional (the schedule's). Separate from `launch` so a test can bind and compile the
    kernel for sm_90 without a GPU."""
    batch, heads, tokens, head_dim = q.shape
    kv_half = half_tile(kv_tile)
    args = (_descriptor(q, grid, half_tile(q_tile)), _descriptor(k, grid, kv_half), _descriptor(v, grid, kv_half),
            _descriptor(dout, grid, half_tile(q_tile)), lse, delta, dq_acc, _descriptor(dk_out, grid, kv_half),
            _descriptor(dv_out, grid, kv_half), keys, visits, len(keys), heads // k.shape[1], tokens,
            grid[1], grid[2], scale * LOG2E, scale)
    kwargs = dict(Q_TILE=tuple(q_tile), KV_TILE=tuple(kv_tile), NUM_STAGES=stages, PINGPONG=pingpong, WRITER_WARPS=writer_warps,
                  LOADER_REGS=LOADER_REGS, WRITER_REGS=WRITER_REGS, CONSUMER_REGS=CONSUMER_REGS, num_warps=CONSUMER_WARPS, maxnreg=MAXNREG)
    return (len(keys) * batch * heads,), args, kwargs


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous [B, H, L, D] (a copy only where it is not)."""
    return t if t.is_contiguous() else t.contiguous()


def gluon_backward(q, k, v, out, lse, dout, scale: float, dq, dk, dv, schedule: GluonBackwardSchedule,
                   stages: int = NUM_STAGES, writer_warps: int = WRITER_WARPS, pingpong: bool = PINGPONG) -> None:
    """dq, dk, dv <- the gradients of softmax attention for dout (lse: the forward's natural-log LSE),
    for a whole-tile schedule; the caller checked eligibility (codegen.dispatch.can_run_gluon_backward).

    Extra memory: delta [B, H, L] and the dQ buffer [B, H, L, D] fp32 (4 L D bytes a head), and for
    GQA the dK, dV partials, fp32 [B, H, L, D] each.
    """
    batch, heads, tokens, head_dim = q.shape
    group = heads // k.shape[1]
    r = schedule.ranges
    keys, visits, idle = schedule.on(q.device)
    out, dout, lse = _rows_view(out), _rows_view(dout), lse.contiguous()
    delta = torch.empty((batch, heads, tokens), device=q.device, dtype=torch.float32)
    rows = batch * heads * tokens
    attention_bwd_delta[(-(-rows // DELTA_BLOCK),)](out, dout, delta, rows, HEAD_D=head_dim, BLOCK=DELTA_BLOCK,
                                                    num_warps=4)
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    direct = group == 1 and box_strides(dk, r.shape) is not None and box_strides(dv, r.shape) is not None
    if direct:
        dk_out, dv_out = dk, dv
    else:  # per query head, in the inputs' dtype (the TMA store's), summed over the group in fp32 below
        dk_out, dv_out = torch.empty_like(q), torch.empty_like(q)
    if len(keys):
        launch_grid, args, kwargs = kernel_args(q, k, v, dout, lse, delta, dq_acc, dk_out, dv_out, scale, keys,
                                                visits, r.shape, r.q_tile, r.kv_tile, stages, writer_warps,
                                                pingpong)
        attention_bwd[launch_grid](*args, **kwargs)
    dq.copy_(dq_acc)  # the writer added dQ times the scale
    if not direct:  # the group's query heads summed in a fixed order: deterministic
        shape = (batch, k.shape[1], group, tokens, head_dim)
        dk.copy_(dk_out.view(shape).sum(2, dtype=torch.float32))
        dv.copy_(dv_out.view(shape).sum(2, dtype=torch.float32))
    if len(idle):  # key tiles no query tile visits: no program wrote them
        dk.index_fill_(2, idle, 0.0)
        dv.index_fill_(2, idle, 0.0)
