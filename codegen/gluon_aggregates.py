"""The parts of the Gluon forward (codegen.gluon_fwd), as Triton aggregates: what a launch compiles
for (`Config`), the table it reads (`RowTable`, columns by maskdsl.analysis.tile_table's names), the work items
a program runs (`Dispatch`, `WorkItem`), shared memory and its mbarriers (`Buffers`; `Counter`: the
slot and parity of a barrier's n-th use) and what the consumers read and write (`Launch`).

An aggregate is a class whose annotated fields the JIT passes as one value; its `__init__` is a
constexpr function and its methods are jitted, so a kernel function takes a few of them instead of
dozens of scalars, and they compile to the same instructions as the scalars would.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.language.core import _aggregate as aggregate
from triton.language.core import base_value

from maskdsl.analysis import tile_table

# The kernel's modes (maskdsl.analysis.tile_table.MODES), a constexpr the host passes: whole tiles, predicated
# 1-D runs (gluon_rule's "runs" mode), per-dimension boxes (gluon_rule's "boxes" mode).
WHOLE, RUNS, BOXES = (gl.constexpr(mode) for mode in tile_table.MODES)
# The row tables' columns by their names in maskdsl.analysis.tile_table, per dimension d where they have one
# (COORD[d], BOX_LO[d], ...; RUN2 = the second run's [lo, hi)), and WIDTH[mode]: constexpr globals, whose
# values the JIT hashes into the kernel's cache key, so a changed table layout compiles anew.
_DIMS = range(tile_table.RANK)
COORD = gl.constexpr(tuple(tile_table.COORD + d for d in _DIMS))
BOX_LO = gl.constexpr(tuple(map(tile_table.box_lo, _DIMS)))
BOX_HI = gl.constexpr(tuple(map(tile_table.box_hi, _DIMS)))
FULL_LO = gl.constexpr(tuple(map(tile_table.full_lo, _DIMS)))
FULL_HI = gl.constexpr(tuple(map(tile_table.full_hi, _DIMS)))
RUN2 = gl.constexpr((tile_table.RUN2, tile_table.RUN2 + 1))
FLAG = gl.constexpr(tile_table.FLAG)
WIDTH = gl.constexpr(dict(tile_table.WIDTH))

# a runtime int argument, or the constant the JIT specialised it to (e.g. 1), or a counter's first 0
_INT = gl.tensor | gl.constexpr


@gluon.constexpr_function
def _value(x):
    """An aggregate's field from a constexpr function's argument: constants come unwrapped, wrap them again."""
    return x if isinstance(x, base_value) else gl.constexpr(x)


@aggregate
class Config:
    """What the kernel is compiled for (constexprs only): the query tile T, a consumer's half of it H
    and the key tile K (3-D boxes of the grid: the descriptors' boxes), the mode, the pipeline and the
    register layouts of a consumer's wgmma results."""
    T0: gl.constexpr
    T1: gl.constexpr
    T2: gl.constexpr
    H0: gl.constexpr
    H1: gl.constexpr
    H2: gl.constexpr
    K0: gl.constexpr
    K1: gl.constexpr
    K2: gl.constexpr
    HEAD_D: gl.constexpr
    SUB_M: gl.constexpr  # a consumer's rows: half the query tile
    BLOCK_N: gl.constexpr
    dtype: gl.constexpr
    MODE: gl.constexpr
    TERMS: gl.constexpr  # "runs": key intervals per row in the bounds table
    NUM_STAGES: gl.constexpr
    QBUF: gl.constexpr  # Q buffers: 2 when a program runs several items
    PINGPONG: gl.constexpr
    s_layout: gl.constexpr
    o_layout: gl.constexpr
    p_layout: gl.constexpr
    s_row: gl.constexpr
    s_col: gl.constexpr
    o_row: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, q_tile, o_desc, k_desc, MODE, TERMS, NUM_STAGES, QBUF, PINGPONG, WARPS):
        self.T0, self.T1, self.T2 = (gl.constexpr(t) for t in q_tile)
        self.H0, self.H1, self.H2 = (gl.constexpr(h) for h in o_desc.block_shape[1:4])
        self.K0, self.K1, self.K2 = (gl.constexpr(k) for k in k_desc.block_shape[1:4])
        self.HEAD_D = gl.constexpr(o_desc.block_shape[4])
        self.SUB_M = gl.constexpr(self.H0 * self.H1 * self.H2)
        self.BLOCK_N = gl.constexpr(self.K0 * self.K1 * self.K2)
        self.dtype = gl.constexpr(o_desc.dtype)
        self.MODE = gl.constexpr(MODE)
        self.TERMS = gl.constexpr(TERMS)
        self.NUM_STAGES = gl.constexpr(NUM_STAGES)
        self.QBUF = gl.constexpr(QBUF)
        self.PINGPONG = gl.constexpr(PINGPONG)
        s_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                             instr_shape=[16, self.BLOCK_N, 16])
        o_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                             instr_shape=[16, self.HEAD_D, 16])
        self.s_layout = gl.constexpr(s_layout)
        self.o_layout = gl.constexpr(o_layout)
        # P feeds the PV wgmma straight from registers: converting from S's layout moves no data through smem
        self.p_layout = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
        self.s_row = gl.constexpr(gl.SliceLayout(1, s_layout))
        self.s_col = gl.constexpr(gl.SliceLayout(0, s_layout))
        self.o_row = gl.constexpr(gl.SliceLayout(1, o_layout))


@aggregate
class Counter:
    """The count-th use (from 0) of a ring of NUM barriers and the buffers they guard: slot
    count % NUM, phase (count // NUM) & 1 (a barrier used by turns: NUM == 1, phase count & 1).
    A fresh mbarrier counts as "phase 1 complete", so a producer waits for the phase before the
    consumers' (`free_phase`): its first use of each slot does not wait."""
    count: _INT
    NUM: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, count, NUM):
        self.count = _value(count)
        self.NUM = gl.constexpr(NUM)

    @gluon.jit
    def slot(self):
        return self.count % self.NUM

    @gluon.jit
    def phase(self):
        if self.NUM == 1:
            return self.count & 1
        else:
            return (self.count // self.NUM) & 1

    @gluon.jit
    def free_phase(self):
        return self.phase() ^ 1

    @gluon.jit
    def advance(self, k):
        return Counter(self.count + k, self.NUM)


@aggregate
class RowTable:
    """One launch's rows of a mode's tile table (maskdsl.analysis.tile_table: read by column name, WIDTH[mode] int32
    a row) from row `first` on."""
    ptr: gl.tensor
    first: _INT
    MODE: gl.constexpr
    WIDTH: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, ptr, first, MODE):
        self.ptr = ptr
        self.first = _value(first)
        self.MODE = gl.constexpr(MODE)
        self.WIDTH = gl.constexpr(WIDTH.value[MODE])

    @gluon.jit
    def row(self, x):
        """The address of row x."""
        return self.ptr + (self.first + x) * self.WIDTH


@aggregate
class WorkItem:
    """A work item decoded (`Dispatch.item`): one (batch x head) `bh`, the first grid coordinate of
    each half of its query tile per dimension (q0, q1, q2: pairs; the half box splits one dimension),
    the key-tile box lo per dimension, its extents e1, e2 in the last two and its size n; "runs": the
    first run's size na, the second run's first tile lo2b, the mask-every-tile flag; "boxes": the key
    tiles [lo, hi) per dimension every row sees whole (`full`, lo_0, hi_0, lo_1, ...)."""
    bh: gl.tensor
    q0: gl.tuple
    q1: gl.tuple
    q2: gl.tuple
    lo0: gl.tensor
    lo1: gl.tensor
    lo2: gl.tensor
    e1: gl.tensor
    e2: gl.tensor
    n: gl.tensor
    na: gl.tensor
    lo2b: gl.tensor
    every: _INT
    full: gl.tuple
    MODE: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, bh, q0, q1, q2, lo0, lo1, lo2, e1, e2, n, na, lo2b, every, full, MODE):
        self.bh, self.q0, self.q1, self.q2 = bh, q0, q1, q2
        self.lo0, self.lo1, self.lo2, self.e1, self.e2 = lo0, lo1, lo2, e1, e2
        self.n, self.na, self.lo2b = n, na, lo2b
        self.every = _value(every)
        self.full = full
        self.MODE = gl.constexpr(MODE)

    @gluon.jit
    def origin(self, half: gl.constexpr):
        """The grid coordinates of the first token of this half of the query tile."""
        return self.q0[half], self.q1[half], self.q2[half]

    @gluon.jit
    def key_tile(self, i):
        """The last-dimension key tile of step i: the box's (one run) or, "runs", the first run's na
        tiles from lo2, then the second's from lo2b."""
        if self.MODE == RUNS:
            return gl.where(i < self.na, self.lo2 + i, self.lo2b + (i - self.na))
        else:
            return self.lo2 + i

    @gluon.jit
    def key_tile_at(self, i):
        """The key tile of step i per dimension: the box walked row-major (last dimension fastest);
        "runs" (a 1-D order): every leading coordinate is 0."""
        if self.MODE == RUNS:
            return 0, 0, self.key_tile(i)
        else:
            j = i // self.e2
            return self.lo0 + j // self.e1, self.lo1 + j % self.e1, self.lo2 + i % self.e2


@aggregate
class Dispatch:
    """The work items of the launch in dispatch order and this program's share of them: the count x BH
    (table row, batch x head) pairs, the first LONG rows head-major (each (row, head) in turn: the
    longest tiles start first on every head, not when the hardware reaches that head), the rest
    row-major within each head (neighbouring items share K/V in L2); program w0 of `stride` runs
    items w0, w0 + stride, ... (`items` of them)."""
    table: RowTable
    count: _INT
    BH: _INT
    LONG: _INT
    w0: gl.tensor
    stride: gl.tensor
    items: gl.tensor

    @gluon.constexpr_function
    def __init__(self, table, count, BH, LONG, w0, stride, items):
        self.table, self.count, self.BH, self.LONG = table, _value(count), _value(BH), _value(LONG)
        self.w0, self.stride, self.items = w0, stride, items

    @gluon.jit
    def item(self, w, cfg):
        """Work item w, decoded from its table row."""
        rest = gl.maximum(self.count - self.LONG, 1)
        late = w - self.LONG * self.BH
        head_major = late < 0
        x = gl.where(head_major, w // self.BH, self.LONG + late % rest)
        bh = gl.where(head_major, w % self.BH, late // rest)
        entry = self.table.row(x)
        c0 = gl.load(entry + COORD[0])
        c1 = gl.load(entry + COORD[1])
        c2 = gl.load(entry + COORD[2])
        lo0 = gl.load(entry + BOX_LO[0])
        lo1 = gl.load(entry + BOX_LO[1])
        lo2 = gl.load(entry + BOX_LO[2])
        e1 = gl.load(entry + BOX_HI[1]) - lo1
        e2 = gl.load(entry + BOX_HI[2]) - lo2
        n = (gl.load(entry + BOX_HI[0]) - lo0) * e1 * e2
        na = n
        lo2b = lo2
        every = 0
        if cfg.MODE == RUNS:  # a second run of key tiles after the first, and the mask-every-tile flag
            lo2b = gl.load(entry + RUN2[0])
            n = na + gl.load(entry + RUN2[1]) - lo2b
            every = gl.load(entry + FLAG)
        full = (lo0, lo0, lo0, lo0, lo0, lo0)
        if cfg.MODE == BOXES:
            full = (gl.load(entry + FULL_LO[0]), gl.load(entry + FULL_HI[0]), gl.load(entry + FULL_LO[1]),
                    gl.load(entry + FULL_HI[1]), gl.load(entry + FULL_LO[2]), gl.load(entry + FULL_HI[2]))
        q0 = (c0 * cfg.T0, c0 * cfg.T0 + (cfg.T0 - cfg.H0))
        q1 = (c1 * cfg.T1, c1 * cfg.T1 + (cfg.T1 - cfg.H1))
        q2 = (c2 * cfg.T2, c2 * cfg.T2 + (cfg.T2 - cfg.H2))
        return WorkItem(bh, q0, q1, q2, lo0, lo1, lo2, e1, e2, n, na, lo2b, every, full, cfg.MODE)


@aggregate
class Buffers:
    """Shared memory and its mbarriers: Q (two half boxes per buffer), the ring of K and V stages;
    Q and each stage's K and V have their own `ready` barriers (transaction counts), `q_empty` and
    `kv_empty` (count 2) are arrived by both consumers, `turn` passes the ping-pong turn."""
    q_smem: gl.shared_memory_descriptor
    k_bufs: gl.shared_memory_descriptor
    v_bufs: gl.shared_memory_descriptor
    q_bar: gl.shared_memory_descriptor
    q_empty: gl.shared_memory_descriptor
    k_ready: gl.shared_memory_descriptor
    v_ready: gl.shared_memory_descriptor
    kv_empty: gl.shared_memory_descriptor
    turn: gl.shared_memory_descriptor

    @gluon.constexpr_function
    def __init__(self, q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty, turn):
        self.q_smem, self.k_bufs, self.v_bufs = q_smem, k_bufs, v_bufs
        self.q_bar, self.q_empty, self.k_ready, self.v_ready, self.kv_empty = q_bar, q_empty, k_ready, v_ready, kv_empty
        self.turn = turn

    @gluon.jit
    def allocate(o_desc, k_desc, v_desc, cfg):
        """Allocated and initialised (the order fixes the shared-memory offsets)."""
        q_smem = gl.allocate_shared_memory(cfg.dtype, [2 * cfg.QBUF, 1, cfg.H0, cfg.H1, cfg.H2, cfg.HEAD_D],
                                           o_desc.layout)
        k_bufs = gl.allocate_shared_memory(cfg.dtype, [cfg.NUM_STAGES, 1, cfg.K0, cfg.K1, cfg.K2, cfg.HEAD_D],
                                           k_desc.layout)
        v_bufs = gl.allocate_shared_memory(cfg.dtype, [cfg.NUM_STAGES, 1, cfg.K0, cfg.K1, cfg.K2, cfg.HEAD_D],
                                           v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [cfg.QBUF, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [cfg.QBUF, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [cfg.NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [cfg.NUM_STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [cfg.NUM_STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(cfg.QBUF):
            mbarrier.init(q_bar.index(b), count=1)
            mbarrier.init(q_empty.index(b), count=2)
        for st in gl.static_range(cfg.NUM_STAGES):
            mbarrier.init(k_ready.index(st), count=1)
            mbarrier.init(v_ready.index(st), count=1)
            mbarrier.init(kv_empty.index(st), count=2)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        return Buffers(q_smem, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, kv_empty, turn)

    @gluon.jit
    def k_tile(self, c, cfg):
        """Stage c's K as the wgmma's B operand, [head_dim, key tile]."""
        return self.k_bufs.index(c.slot()).reshape([cfg.BLOCK_N, cfg.HEAD_D]).permute((1, 0))

    @gluon.jit
    def v_tile(self, c, cfg):
        """Stage c's V, [key tile, head_dim]."""
        return self.v_bufs.index(c.slot()).reshape([cfg.BLOCK_N, cfg.HEAD_D])

    @gluon.jit
    def wait_k(self, c):
        mbarrier.wait(self.k_ready.index(c.slot()), c.phase())

    @gluon.jit
    def wait_v(self, c):
        mbarrier.wait(self.v_ready.index(c.slot()), c.phase())

    @gluon.jit
    def release_kv(self, c):
        mbarrier.arrive(self.kv_empty.index(c.slot()))

    @gluon.jit
    def wait_turn(self, c, CID: gl.constexpr):
        """Consumer CID waits for its turn c (a Counter with NUM 1): consumer 0 goes first (it waits for
        the phase before, which a fresh barrier has completed), consumer 1 after it."""
        mbarrier.wait(self.turn.index(CID), c.phase() ^ (1 - CID))

    @gluon.jit
    def pass_turn(self, CID: gl.constexpr):
        """Consumer CID hands the turn to the other (right after issuing its MMAs)."""
        mbarrier.arrive(self.turn.index(1 - CID))


@aggregate
class Launch:
    """What the consumers read and write besides shared memory: O's descriptor, LSE [batch x heads x
    tokens], the predicated modes' row bounds, the query grid (L tokens, extents N1, N2 of its last
    two dimensions), the key extent LK (a segment's buffer may be shorter than the rows), the scale."""
    o_desc: tma.tensor_descriptor
    lse_ptr: gl.tensor
    bounds_ptr: gl.tensor
    qk_scale: gl.tensor
    L: _INT
    N1: _INT
    N2: _INT
    LK: _INT

    @gluon.constexpr_function
    def __init__(self, o_desc, lse_ptr, bounds_ptr, qk_scale, L, N1, N2, LK):
        self.o_desc, self.lse_ptr, self.bounds_ptr, self.qk_scale = o_desc, lse_ptr, bounds_ptr, qk_scale
        self.L, self.N1, self.N2, self.LK = _value(L), _value(N1), _value(N2), _value(LK)
