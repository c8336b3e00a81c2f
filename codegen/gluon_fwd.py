"""A warp-specialized Hopper (sm_90) attention forward in Gluon: whole tiles, with predicated modes.

Why a second forward: on dense and perfectly block-sparse masks the Triton template stays short of
cuDNN: it leaves the overlap of softmax and tensor-core work to Triton's scheduler. Gluon is Triton's
lower level (same compiler, explicit layouts, shared memory, mbarriers and warp specialization),
which lets this kernel schedule it by hand as FlashAttention-3 does, and so match cuDNN on dense
masks (docs/BENCHMARKS.md). Full tiles run with no mask arithmetic: it
runs the masks `codegen.gluon_plan` accepts (every visited 128 x 128 tile full, one box of key tiles
per query tile) unmasked, 1-D masks with partial tiles in a predicated mode (the rule's "runs" mode:
intervals per row), one-term masks on grids with partial tiles or ragged extents in another
(the rule's "boxes" mode: an interval per row and dimension), and `CompiledAttention.launch` falls
back to the template for everything else.

A work item = one 128-token query tile (a box of the grid: a run of 128 tokens on a 1-D order, e.g.
2 x 8 x 8 on a video) of one (batch, head); the items are a table of the query tiles that visit
anything (so neighbouring items share K/V in L2) times the heads, each row holding the tile's
coordinates and its box of key tiles [lo_d, hi_d) per dimension. A CTA runs one item, or PER items of
a short-item schedule (codegen.gluon_plan.GluonSchedule.items_per_program: program p of G runs items
p, p + G, ...; two Q buffers let the loader fetch the next item's Q and K/V under the current one).
Every grid is padded to 3 dimensions, so one kernel serves 1-D, 2-D and 3-D masks: Q, K, V and O are
5-D TMA boxes [1, t0, t1, t2, head_dim] whose shared memory the wgmma reads as [128 or 64 rows,
head_dim] (same bytes, same swizzle).
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

The parts are Triton aggregates (codegen.gluon_aggregates, and `Rows` here): `Config` (what a launch
compiles for: tiles, mode, layouts), `Dispatch` and `WorkItem` (which items a program runs, each decoded
from its row of the `RowTable`, whose columns are read by maskdsl.analysis.tile_table's names), `Buffers` and
`Counter` (shared memory and its mbarriers; the slot and parity of a barrier's n-th use), `Launch` and
`Rows` (what a consumer reads and writes, and its rows' predicate).

Designs tried and dropped because they ran slower on dense masks (docs/BENCHMARKS.md): one 8-warp
consumer, 64-key tiles, three stages (no faster), FlashAttention-3's intra-warpgroup overlap (QK(i)
before PV(i-1), the softmax under PV(i-1)). Ping-pong vs not is within noise on dense; it is kept as a
knob.
"""

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

from maskdsl.analysis import tile_table
from maskdsl.codegen.dispatch import box_strides
from maskdsl.codegen.gluon_aggregates import BOXES, RUNS, Buffers, Config, Counter, Dispatch, Launch, RowTable

LOG2E = 1.4426950408889634
NUM_STAGES = 2  # 160 KB of shared memory at head_dim 128; a third stage is no faster
CONSUMER_WARPS = 4
LOADER_REGS = 24
CONSUMER_REGS = 240
# 12 warps (the loader's one is padded to a warpgroup) share 64K registers: 168 a thread at launch;
# setmaxnreg then hands the loader's to the consumers (240 + 240 + 24 <= 3 x 168).
MAXNREG = 65536 // (32 * 12) // 8 * 8
PINGPONG = True


@aggregate
class Rows:
    """A consumer's rows of the query tile: their tokens of the grid (`live`: inside it) and, in the
    predicated modes, their keys: "runs", TERMS intervals [lo, hi] of the token order (lo_a, hi_a,
    lo_b, hi_b); "boxes", an interval per dimension (`bnd`: lo_0, hi_0, lo_1, ...)."""
    token: gl.tensor
    live: gl.tensor
    bnd: gl.tuple
    lo_a: gl.tensor
    hi_a: gl.tensor
    lo_b: gl.tensor
    hi_b: gl.tensor

    @gluon.constexpr_function
    def __init__(self, token, live, bnd, lo_a, hi_a, lo_b, hi_b):
        self.token, self.live, self.bnd = token, live, bnd
        self.lo_a, self.hi_a, self.lo_b, self.hi_b = lo_a, hi_a, lo_b, hi_b

    @gluon.jit
    def of(item, io, cfg, CID: gl.constexpr):
        """Consumer CID's rows of the item's query tile (rows CID * SUB_M.. of the row-major box)."""
        r = CID * cfg.SUB_M + gl.arange(0, cfg.SUB_M, layout=cfg.s_row)  # row of the query tile -> token
        x1 = item.q1[0] + (r // cfg.T2) % cfg.T1
        x2 = item.q2[0] + r % cfg.T2
        token = ((item.q0[0] + r // (cfg.T1 * cfg.T2)) * io.N1 + x1) * io.N2 + x2
        live = (token < io.L) & (x1 < io.N1) & (x2 < io.N2)  # a ragged tile's rows past the grid write nothing
        bnd = (token, token, token, token, token, token)
        if cfg.MODE == BOXES:  # the rows' key interval per dimension (gluon_rule's "boxes" mode: lo_d then hi_d, per d)
            x0 = item.q0[0] + r // (cfg.T1 * cfg.T2)
            N0 = io.L // (io.N1 * io.N2)
            b1 = 2 * N0
            b2 = b1 + 2 * io.N1
            bounds = io.bounds_ptr
            bnd = (gl.load(bounds + x0, mask=live, other=1), gl.load(bounds + N0 + x0, mask=live, other=0),
                   gl.load(bounds + b1 + x1, mask=live, other=1), gl.load(bounds + b1 + io.N1 + x1, mask=live, other=0),
                   gl.load(bounds + b2 + x2, mask=live, other=1), gl.load(bounds + b2 + io.N2 + x2, mask=live, other=0))
        lo_a = token
        hi_a = token
        lo_b = token
        hi_b = token
        if cfg.TERMS > 0:  # the rows' key intervals, per term ([TERMS, 2, L] int32; none past the end)
            lo_a = gl.load(io.bounds_ptr + token, mask=live, other=1)
            hi_a = gl.load(io.bounds_ptr + io.L + token, mask=live, other=0)
            if cfg.TERMS == 2:
                lo_b = gl.load(io.bounds_ptr + 2 * io.L + token, mask=live, other=1)
                hi_b = gl.load(io.bounds_ptr + 3 * io.L + token, mask=live, other=0)
        return Rows(token, live, bnd, lo_a, hi_a, lo_b, hi_b)

    @gluon.jit
    def mask(self, s, i, item, LK, cfg):
        """S of step i with -inf where a row does not attend the key, in the predicated modes."""
        if cfg.TERMS > 0:
            s = self.mask_edge(s, i, item, LK, cfg)
        if cfg.MODE == BOXES:
            s = self.mask_box(s, i, item, cfg)
        return s

    @gluon.jit
    def mask_edge(self, s, i, item, LK, cfg):
        """"runs": on the tiles that may be partial, the first and last of each run, or every tile of
        a query tile whose table row says so (gluon_rule's "runs" mode sets that flag where a run has a
        partial tile inside). A row attends key j when one of its intervals [lo, hi] holds it; keys
        past the grid's end (a ragged last tile, zero-filled by the copy engine) never, nor past LK."""
        edge = (i == 0) | (i == item.n - 1) | (item.every != 0)
        if cfg.MODE == RUNS:
            edge = edge | (i == item.na - 1) | (i == item.na)
        if edge:
            cols = item.key_tile(i) * cfg.BLOCK_N + gl.arange(0, cfg.BLOCK_N, layout=cfg.s_col)
            c = gl.expand_dims(cols, 0)
            ok = (c >= gl.expand_dims(self.lo_a, 1)) & (c <= gl.expand_dims(self.hi_a, 1))
            if cfg.TERMS == 2:
                ok = ok | ((c >= gl.expand_dims(self.lo_b, 1)) & (c <= gl.expand_dims(self.hi_b, 1)))
            ok = ok & (c < LK)
            s = gl.where(ok, s, float("-inf"))
        return s

    @gluon.jit
    def mask_box(self, s, i, item, cfg):
        """"boxes": on the key tiles of step i that are not full for this query tile in some dimension
        (gluon_rule's "boxes" mode), a row sees a key when each of its coordinates lies in the row's
        interval [lo_d, hi_d] there. A key past the grid (a tile overhanging a ragged extent; the
        copy engine loaded zeros) lies outside every interval."""
        fa0, fb0, fa1, fb1, fa2, fb2 = item.full
        t0, t1, t2 = item.key_tile_at(i)
        if (t0 < fa0) | (t0 >= fb0) | (t1 < fa1) | (t1 >= fb1) | (t2 < fa2) | (t2 >= fb2):
            b0l, b0h, b1l, b1h, b2l, b2h = self.bnd
            c = gl.arange(0, cfg.BLOCK_N, layout=cfg.s_col)
            k0 = gl.expand_dims(t0 * cfg.K0 + c // (cfg.K1 * cfg.K2), 0)
            k1 = gl.expand_dims(t1 * cfg.K1 + (c // cfg.K2) % cfg.K1, 0)
            k2 = gl.expand_dims(t2 * cfg.K2 + c % cfg.K2, 0)
            ok = (k0 >= gl.expand_dims(b0l, 1)) & (k0 <= gl.expand_dims(b0h, 1))
            ok = ok & (k1 >= gl.expand_dims(b1l, 1)) & (k1 <= gl.expand_dims(b1h, 1))
            ok = ok & (k2 >= gl.expand_dims(b2l, 1)) & (k2 <= gl.expand_dims(b2h, 1))
            s = gl.where(ok, s, float("-inf"))
        return s


@gluon.jit
def _load_item(q_desc, k_desc, v_desc, bufs, item, bh_kv, kv, qc, cfg):
    """One item's loads: Q's two halves into Q buffer qc (a Counter over the program's items), then
    the key-tile box row-major (last dimension fastest) into the ring from stage kv (a Counter over the
    program's key tiles), so the next item's Q and K/V load while the consumers finish this one."""
    qb = qc.slot()
    if cfg.QBUF > 1:
        mbarrier.wait(bufs.q_empty.index(qb), qc.free_phase())
    qbar = bufs.q_bar.index(qb)
    mbarrier.expect(qbar, 2 * q_desc.block_type.nbytes)
    a0, a1, a2 = item.origin(0)
    tma.async_copy_global_to_shared(q_desc, [item.bh, a0, a1, a2, 0], qbar, bufs.q_smem.index(2 * qb))
    b0, b1, b2 = item.origin(1)
    tma.async_copy_global_to_shared(q_desc, [item.bh, b0, b1, b2, 0], qbar, bufs.q_smem.index(2 * qb + 1))
    for i in range(item.n):
        c = kv.advance(i)
        stage = c.slot()
        mbarrier.wait(bufs.kv_empty.index(stage), c.free_phase())
        t0, t1, t2 = item.key_tile_at(i)
        coord = [bh_kv, t0 * cfg.K0, t1 * cfg.K1, t2 * cfg.K2, 0]
        kb = bufs.k_ready.index(stage)
        mbarrier.expect(kb, k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, coord, kb, bufs.k_bufs.index(stage))
        vb = bufs.v_ready.index(stage)
        mbarrier.expect(vb, v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, coord, vb, bufs.v_bufs.index(stage))


@gluon.jit
def _loader(q_desc, k_desc, v_desc, bufs, item, dispatch, GROUP, cfg):
    """The program's items in turn (the first decoded by the caller)."""
    _load_item(q_desc, k_desc, v_desc, bufs, item, item.bh // GROUP, Counter(0, cfg.NUM_STAGES), Counter(0, cfg.QBUF),
               cfg)
    if cfg.QBUF > 1:
        g = item.n
        for j in range(1, dispatch.items):
            later = dispatch.item(dispatch.w0 + j * dispatch.stride, cfg)
            _load_item(q_desc, k_desc, v_desc, bufs, later, later.bh // GROUP, Counter(g, cfg.NUM_STAGES),
                       Counter(j, cfg.QBUF), cfg)
            g += later.n


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, cfg):
    """One online-softmax update in the log2 domain (qk_scale = scale * log2 e).

    A row whose scores are all -inf (only -inf inputs make them) keeps P = 0 instead of NaN, as the
    template and SDPA do: the subtracted maximum is 0 then.
    """
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return m_new, l_i, gl.convert_layout(p.to(cfg.dtype), cfg.p_layout), gl.convert_layout(alpha, cfg.o_row)


@gluon.jit
def _consume_item(io, bufs, item, kv, turns, qc, cfg, CID: gl.constexpr):
    """Consumer CID's half of one item: kv counts the program's key tiles before it (the ring's stages
    and parities), turns its ping-pong turns, qc its items (its Q is in buffer qc.slot())."""
    rows = Rows.of(item, io, cfg, CID)
    qb = qc.slot()
    q_box = bufs.q_smem.index(2 * qb + CID)  # this consumer's half of the query tile, a box of the grid
    q_sub = q_box.reshape([cfg.SUB_M, cfg.HEAD_D])
    m_i = gl.full([cfg.SUB_M], float("-inf"), gl.float32, cfg.s_row)
    l_i = gl.full([cfg.SUB_M], 0.0, gl.float32, cfg.s_row)
    acc = gl.zeros([cfg.SUB_M, cfg.HEAD_D], gl.float32, cfg.o_layout)
    # n >= 1: the host launches only tiles that visit something (the loop peels tile 0)

    mbarrier.wait(bufs.q_bar.index(qb), qc.phase())
    bufs.wait_k(kv)
    s = warpgroup_mma(q_sub, bufs.k_tile(kv, cfg), gl.zeros([cfg.SUB_M, cfg.BLOCK_N], gl.float32, cfg.s_layout),
                      use_acc=False, is_async=True)
    if cfg.QBUF > 1:  # noqa: SIM102 - a constexpr test, then a runtime one
        if qc.count > 0:  # the previous item's O has left its Q buffer (the store overlapped this QK): free it
            tma.store_wait(0)
            mbarrier.arrive(bufs.q_empty.index(qc.advance(-1).slot()))
    s = warpgroup_mma_wait(0, deps=(s, ))
    s = rows.mask(s, 0, item, io.LK, cfg)
    m_i, l_i, p, alpha = _softmax_step(s, m_i, l_i, io.qk_scale, cfg)

    for i in range(1, item.n):
        cur = kv.advance(i)
        prev = cur.advance(-1)
        if cfg.PINGPONG:  # consumer 0 goes first; each passes the turn right after issuing its MMAs
            bufs.wait_turn(turns.advance(i).advance(-1), CID)
        bufs.wait_v(prev)
        acc = warpgroup_mma(p, bufs.v_tile(prev, cfg), acc, is_async=True)
        bufs.wait_k(cur)
        s = warpgroup_mma(q_sub, bufs.k_tile(cur, cfg), gl.zeros([cfg.SUB_M, cfg.BLOCK_N], gl.float32, cfg.s_layout),
                          use_acc=False, is_async=True)
        if cfg.PINGPONG:
            bufs.pass_turn(CID)
        s, acc, p = warpgroup_mma_wait(0, deps=(s, acc, p))
        bufs.release_kv(prev)
        s = rows.mask(s, i, item, io.LK, cfg)
        m_i, l_i, p, alpha = _softmax_step(s, m_i, l_i, io.qk_scale, cfg)
        acc = acc * gl.expand_dims(alpha, 1)

    last = kv.advance(item.n).advance(-1)
    bufs.wait_v(last)
    acc = warpgroup_mma(p, bufs.v_tile(last, cfg), acc, is_async=True)
    acc, p = warpgroup_mma_wait(0, deps=(acc, p))
    bufs.release_kv(last)

    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    o = acc / gl.expand_dims(gl.convert_layout(l_safe, cfg.o_row), 1)
    q_sub.store(o.to(cfg.dtype))  # this consumer's Q rows are dead: stage O there for the TMA store
    fence_async_shared()
    x0, x1, x2 = item.origin(CID)
    tma.async_copy_shared_to_global(io.o_desc, [item.bh, x0, x1, x2, 0], q_box)
    lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    gl.store(io.lse_ptr + item.bh * io.L + rows.token, lse, mask=rows.live)
    if cfg.QBUF == 1:
        tma.store_wait(0)


@gluon.jit
def _consumer(io, bufs, item, dispatch, cfg, CID: gl.constexpr):
    """The program's items in turn (the first decoded by the caller). The next item's table row is read
    before this one runs, so its latency hides under this item's main loop."""
    last = dispatch.count * dispatch.BH - 1
    if cfg.QBUF > 1:
        nxt = dispatch.item(gl.minimum(dispatch.w0 + dispatch.stride, last), cfg)
    _consume_item(io, bufs, item, Counter(0, cfg.NUM_STAGES), Counter(0, 1), Counter(0, cfg.QBUF), cfg, CID)
    if cfg.QBUF > 1:
        g = item.n
        tt = item.n - 1
        for j in range(1, dispatch.items):
            item = nxt
            nxt = dispatch.item(gl.minimum(dispatch.w0 + (j + 1) * dispatch.stride, last), cfg)
            _consume_item(io, bufs, item, Counter(g, cfg.NUM_STAGES), Counter(tt, 1), Counter(j, cfg.QBUF), cfg,
                          CID)
            g += item.n
            tt += item.n - 1
        tma.store_wait(0)


@gluon.jit
def attention_fwd(q_desc, k_desc, v_desc, o_desc, lse_ptr, table_ptr, tile_base, qk_scale, L, N1, N2, GROUP,
                  bounds_ptr, count, BH, LONG, LK, PER, Q_TILE: gl.constexpr, MODE: gl.constexpr,
                  TERMS: gl.constexpr, NUM_STAGES: gl.constexpr, QBUF: gl.constexpr, PINGPONG: gl.constexpr,
                  LOADER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """q/k/v/o descriptors address [batch x heads, n0, n1, n2, HEAD_D] (q and o in half query tiles of
    the query tile Q_TILE, k and v in key tiles); `table_ptr` holds the MODE's rows
    (maskdsl.analysis.tile_table) per launched tile. The work items are the count x BH (row, head) pairs in
    dispatch order (`Dispatch`); row r runs table row tile_base + r. Program p of G runs items
    p, p + G, ... (PER at most; two Q buffers, QBUF = 2, when PER > 1): then the loader fetches the next
    item's Q and K/V while the consumers finish the current one, and a short item's launch and
    prologue are paid once per PER items. "runs": the rows' TERMS key intervals are in `bounds_ptr` and
    the runs' edge tiles are masked (gluon_rule's "runs" mode). "boxes": the rows end with the key tiles
    [lo, hi) per dimension that need no predicate; the others are masked with each row's key interval
    per dimension from `bounds_ptr` (gluon_rule's "boxes" mode), which also covers tiles overhanging a ragged
    grid (the copy engine zero-fills loads past it, clips stores)."""
    cfg = Config(Q_TILE, o_desc, k_desc, MODE, TERMS, NUM_STAGES, QBUF, PINGPONG, num_warps)
    # program p runs items p, p + G, p + 2G, ... (G programs): the items running at once stay neighbours
    w0 = gl.program_id(0)
    stride = gl.num_programs(0)
    dispatch = Dispatch(RowTable(table_ptr, tile_base, MODE), count, BH, LONG, w0, stride,
                        gl.minimum(PER, (count * BH - w0 + stride - 1) // stride))
    item = dispatch.item(w0, cfg)
    bufs = Buffers.allocate(o_desc, k_desc, v_desc, cfg)
    io = Launch(o_desc, lse_ptr, bounds_ptr, qk_scale, L, N1, N2, LK)

    gl.warp_specialize([
        (_consumer, (io, bufs, item, dispatch, cfg, 0)),
        (_consumer, (io, bufs, item, dispatch, cfg, 1)),
        (_loader, (q_desc, k_desc, v_desc, bufs, item, dispatch, GROUP, cfg)),
    ], [num_warps, 1], [CONSUMER_REGS, LOADER_REGS])


@functools.lru_cache(maxsize=None)
def _smem_layout(box: tuple[int, ...], dtype: torch.dtype):
    """The swizzled shared-memory layout of a box: computed once (it is not free, and a one-head
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


def _terms(mode: str, table: torch.Tensor, bounds: torch.Tensor | None) -> int:
    """Key intervals per row in `bounds` ("runs"), after checking the table and bounds fit the mode."""
    if table.shape[1] != tile_table.WIDTH[mode]:
        raise ValueError(f"a {mode!r} tile table has {tile_table.WIDTH[mode]} columns, this one {table.shape[1]}")
    if (bounds is None) != (mode == "whole"):
        raise ValueError(f"mode {mode!r} {'takes no' if mode == 'whole' else 'needs'} row bounds")
    return bounds.shape[0] if mode == "runs" else 0


def kernel_args(q, k, v, out, lse, scale: float, table: torch.Tensor, first: int, count: int,
                grid: tuple[int, ...], q_tile: tuple[int, ...], kv_tile: tuple[int, ...], mode: str,
                pingpong: bool = PINGPONG, bounds: torch.Tensor | None = None, long: int = 0,
                k_grid: tuple[int, ...] | None = None, per: int = 1):
    """(grid, args, keyword args) of one launch over rows [first, first + count) of `table`, a tile table
    of `mode` (maskdsl.analysis.tile_table.MODES: the schedule's `ranges.mode`); grid and tiles are
    RANK-dimensional (codegen.gluon_plan pads them). `bounds`: the predicated modes' per-row key
    intervals ("runs": [slots, 2, tokens] int32, gluon_rule's "runs" mode; "boxes": per dimension,
    gluon_rule's "boxes" mode). `per`: work items per program (codegen.gluon_plan.GluonSchedule.items_per_program).

    Separate from `launch` so a test can bind and compile the kernel for sm_90 without a GPU.
    """
    batch, heads, tokens, head_dim = q.shape
    terms = _terms(mode, table, bounds)
    half = half_tile(q_tile)
    k_grid = grid if k_grid is None else k_grid
    args = (_descriptor(q, grid, half), _descriptor(k, k_grid, kv_tile), _descriptor(v, k_grid, kv_tile),
            _descriptor(out, grid, half), lse, table, first, scale * LOG2E, tokens, grid[1], grid[2],
            heads // k.shape[1], table if bounds is None else bounds, count, batch * heads, min(long, count),
            k.shape[2], per)
    kwargs = dict(Q_TILE=tuple(q_tile), MODE=mode, TERMS=terms, NUM_STAGES=NUM_STAGES, QBUF=2 if per > 1 else 1,
                  PINGPONG=pingpong, LOADER_REGS=LOADER_REGS, CONSUMER_REGS=CONSUMER_REGS,
                  num_warps=CONSUMER_WARPS, maxnreg=MAXNREG)
    return (-(-count * batch * heads // per),), args, kwargs


def launch(q, k, v, out, lse, scale: float, table: torch.Tensor, first: int, count: int,
           grid: tuple[int, ...], q_tile: tuple[int, ...], kv_tile: tuple[int, ...], mode: str,
           pingpong: bool = PINGPONG, bounds: torch.Tensor | None = None, long: int = 0,
           k_grid: tuple[int, ...] | None = None, per: int = 1) -> None:
    """Run `count` query tiles (rows of `table`, a `mode` tile table) for every (batch, head); the caller
    checked eligibility."""
    if count:
        launch_grid, args, kwargs = kernel_args(q, k, v, out, lse, scale, table, first, count, grid, q_tile,
                                                kv_tile, mode, pingpong, bounds, long, k_grid, per)
        attention_fwd[launch_grid](*args, **kwargs)
