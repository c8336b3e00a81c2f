"""The backward of a static mask's attention: FlashAttention-2's three kernels rendered from the plan.

`attention_bwd.py.jinja` holds a preprocess (delta = rowsum(dO * O)), a dK/dV kernel (one program
per key tile and kv head, walking the query tiles that see the tile) and a dQ kernel (one program
per query tile and head, walking its key tiles). Both walks read per-dimension tile ranges from a
small int32 table built here from the exact row bounds (`maskdsl.analysis.transpose`): [terms, rank, tiles
in the dimension, RANGE], O(extent) entries per dimension, never [L, L] and no block mask.

Two ways to get dQ (BackwardConfig.atomic, chosen by the user's `deterministic`):
  * split (deterministic): the dQ kernel recomputes S and dP for its query tile: seven products per
    tile pair. A GQA group's query heads are summed inside the dK/dV program, so no kernel uses
    atomics: the same inputs give the same bits.
  * atomic: each dK/dV program adds dS K into a float32 dQ buffer (4 x L x D bytes per head), five
    products per pair and no dQ kernel, as FlashAttention-2/3 do; a GQA group's heads get programs of
    their own (adding into float32 dK, dV), so a group no longer runs on one program. The float32 sums'
    order varies with the schedule, so the last bits of the gradients vary run to run.

The tables follow the table contract of maskdsl.analysis.tile_table, the one the forward's Gluon tables
follow too: its per-dimension range tables, whose columns A, B, FA, FB are written here by name
and read by the kernels by the same names (constants of the rendered module, codegen.backward_text).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from maskdsl.spec import ir
from maskdsl.codegen.backward_text import backward_context, kv_tiles_per_group as _kv_tiles_per_group, strided
from maskdsl.codegen.config import BackwardConfig
from maskdsl.spec.limits import padded_head_dim
from maskdsl.codegen.dispatch import interpreting
from maskdsl.codegen.plan import KernelPlan, build_plan
from maskdsl.codegen.cache import load_module
from maskdsl.codegen.render import kernel_key, render_template
from maskdsl.codegen.segment import Segment, tile_run, whole
from maskdsl.analysis.intervals import SymRel, evaluate
from maskdsl.analysis.tile_table import A, B, FA, FB, RANGE
from maskdsl.analysis.transpose import key_tile_ranges, query_tile_ranges

TEMPLATE = "attention_bwd.py.jinja"
LOG2E = 1.4426950408889634
PREPROCESS_BLOCK = 64


def _rows(plan: KernelPlan, term, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-row key bounds of one term in dimension d (the predicate's numbers, evaluated).

    A strided term (its dilation is not the layout's, which then is 1) gets its first and last key
    in the dimension's own coordinates: a bounding range whose tiles are all partial (`backward_text.strided`).
    """
    td, dim = term[d], plan.dims[d]
    if td.dilation == dim.dilation:
        return evaluate(SymRel(dim.dilation, td.lo, td.hi, td.qa, td.qb), dim.extent)
    e = td.dilation
    lo, hi = evaluate(SymRel(e, td.lo, td.hi, td.qa, td.qb), dim.extent)
    phase = np.arange(dim.extent) % e
    empty = lo > hi
    return np.where(empty, 0, phase + e * lo), np.where(empty, -1, phase + e * hi)


def _columns(ranges: np.ndarray) -> np.ndarray:
    """maskdsl.analysis.transpose's rows ([a, b, fa, fb] per tile) in the range table's named columns."""
    out = np.empty((len(ranges), RANGE), dtype=np.int32)
    out[:, A], out[:, B], out[:, FA], out[:, FB] = ranges[:, 0], ranges[:, 1], ranges[:, 2], ranges[:, 3]
    return out


def _no_full(table: np.ndarray) -> np.ndarray:
    """A strided term's keys are every dilation-th of its range: no tile pair of it is full."""
    table[:, FA], table[:, FB] = 0, -1
    return table


def schedule_tables(plan_kv: KernelPlan, plan_q: KernelPlan) -> tuple[np.ndarray, np.ndarray]:
    """(dK/dV table, dQ table), each [terms, rank, max tiles in a dimension, RANGE] int32: the
    per-dimension range tables of maskdsl.analysis.tile_table, columns A, B (visited) and FA, FB (seen whole).

    dK/dV rows are key tiles of `plan_kv` (group-major per dimension) holding the query tiles that
    visit the key tile and those that see all of it. dQ rows are query tiles of `plan_q` holding key
    tiles, the forward's way round. Indices are local to the dilation group.
    """
    rank = plan_q.rank
    kv_rows = [[None] * rank for _ in plan_q.terms]
    q_rows = [[None] * rank for _ in plan_q.terms]
    for t, term in enumerate(plan_q.terms):
        for d in range(rank):
            lo, hi = _rows(plan_q, term, d)
            dq_dim, kv_dim = plan_q.dims[d], plan_kv.dims[d]
            q_rows[t][d] = _columns(query_tile_ranges(lo, hi, dq_dim.dilation, dq_dim.q_tile, dq_dim.kv_tile))
            walk = query_tile_ranges(lo, hi, kv_dim.dilation, kv_dim.q_tile, kv_dim.kv_tile)
            kv_rows[t][d] = _columns(key_tile_ranges(walk, kv_dim.dilation, _kv_tiles_per_group(kv_dim)))
            if strided(plan_q, term, d):
                q_rows[t][d], kv_rows[t][d] = _no_full(q_rows[t][d]), _no_full(kv_rows[t][d])
    return _pack(kv_rows), _pack(q_rows)


def _pack(rows) -> np.ndarray:
    maxt = max(len(r) for term in rows for r in term)
    empty = np.zeros(RANGE, dtype=np.int32)
    empty[[A, B, FA, FB]] = 0, -1, 0, -1  # no tile visited, none seen whole
    out = np.tile(empty, (len(rows), len(rows[0]), maxt, 1))
    for t, term in enumerate(rows):
        for d, r in enumerate(term):
            out[t, d, :len(r)] = r
    return out


def _shell_free(table: np.ndarray) -> bool:
    """One term whose every visited pair is full in every dimension: the kernel drops its predicate loops."""
    if table.shape[0] != 1:
        return False
    t = table[0].reshape(-1, RANGE)
    seen = t[:, A] <= t[:, B]
    return bool(np.all(t[seen, A] == t[seen, FA]) and np.all(t[seen, B] == t[seen, FB]))


def render_backward(plan_kv: KernelPlan, plan_q: KernelPlan, tables: tuple[np.ndarray, np.ndarray]) -> str:
    """The backward module's source for the two plans and their range tables (codegen.backward_text)."""
    context = backward_context(plan_kv, plan_q, (tables[0].shape[2], tables[1].shape[2]),
                               (_shell_free(tables[0]), _shell_free(tables[1])))
    return render_template(TEMPLATE, **context)


class BackwardKernels:
    """The rendered backward of one mask and BackwardConfig, with its schedule tables."""

    def __init__(self, mask: ir.MaskDef, config: BackwardConfig):
        self.mask, self.config = mask, config
        self.plan_kv = build_plan(mask, config.dkdv)
        self.plan_q = build_plan(mask, config.dq)
        self.tables = schedule_tables(self.plan_kv, self.plan_q)
        self.kv_tiles = math.prod(d.dilation * _kv_tiles_per_group(d) for d in self.plan_kv.dims)
        key = kernel_key(mask.content_hash(), config.key(), TEMPLATE)
        self.module, self.source_path = load_module(
            key, lambda: render_backward(self.plan_kv, self.plan_q, self.tables))
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables_on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables as int32 tensors on `device`, copied there once (a few KB)."""
        device = torch.device(device)
        if device not in self._device_tables:
            self._device_tables[device] = tuple(torch.from_numpy(t).to(device) for t in self.tables)
        return self._device_tables[device]

    @property
    def frame_tiles(self) -> tuple[int, int]:
        """(query, key) frame alignment of a segment: its chunk must start on a multiple of every query
        tile along dimension 0 (the dQ program's and the one dK/dV walks), its buffer on a multiple
        of every key tile (the dK/dV program's and the one dQ walks)."""
        dkdv, dq = self.config.dkdv, self.config.dq
        return math.lcm(dkdv.q_tile[0], dq.q_tile[0]), math.lcm(dkdv.kv_tile[0], dq.kv_tile[0])

    def launch(self, q, k, v, out, lse, dout, scale: float, dq, dk, dv, seg: Segment | None = None) -> None:
        """dq, dk, dv <- the gradients of softmax attention given dout; lse is the forward's (natural log).

        With a segment (codegen.segment, checked by the caller): q, out, lse, dout and dq hold its query
        chunk, k, v, dk and dv its key buffer; out and lse are the chunk's final ones (merged over every
        buffer), dq gets this buffer's part of dQ and dk, dv the chunk's part of dK, dV.
        """
        for name, t, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v), ("out", out, q), ("dout", dout, q)):
            if t.shape != like.shape or t.stride(-1) != 1:
                raise ValueError(f"{name} must be {tuple(like.shape)} with a contiguous last dimension; "
                                 f"got {tuple(t.shape)} with strides {t.stride()}")
        seg = seg or whole(self.plan_q.shape)
        batch, heads, tokens, head_dim = q.shape
        pad = padded_head_dim(head_dim)
        lse = lse.contiguous()
        delta = torch.empty((batch, heads, tokens), device=q.device, dtype=torch.float32)
        m = self.module
        m.attention_bwd_preprocess[(_cdiv(tokens, PREPROCESS_BLOCK), batch * heads)](
            out, dout, delta, *out.stride()[:3], *dout.stride()[:3], heads, tokens,
            BLOCK=PREPROCESS_BLOCK, HEAD_DIM=head_dim, HEAD_DIM_PAD=pad)
        t_kv, t_q = self.tables_on(q.device)
        dot_f32 = q.dtype == torch.bfloat16 and interpreting()
        group = heads // k.shape[1]
        atomic = self.config.atomic
        per_head = atomic and group > 1
        # the atomic path's float32 accumulators: dQ [B, H, rows, D] (4 x L x D bytes per head), and with
        # a GQA group on separate programs dK, dV too; each is cast into the caller's tensor at the end
        dq_acc = torch.zeros((batch, heads, tokens, head_dim), device=q.device, dtype=torch.float32) if atomic else dq
        dk_out, dv_out = ((torch.zeros(t.shape, device=t.device, dtype=torch.float32) for t in (dk, dv)) if per_head
                          else (dk, dv))
        common = (q.stride()[:3], k.stride()[:3], v.stride()[:3], dout.stride()[:3])
        n0, dim0 = self.plan_q.shape[0], self.plan_kv.dims[0]
        cfg = self.config.dkdv
        kv_tiles = tile_run(seg.k_frames, cfg.kv_tile[0], dim0.dilation * _kv_tiles_per_group(dim0), self.kv_tiles, n0)
        m.attention_bwd_dkdv[(len(kv_tiles), batch * (heads if per_head else k.shape[1]))](
            q, k, v, dout, dk_out, dv_out, lse, delta, t_kv, dq_acc, scale * LOG2E, scale,
            *(s for st in common for s in st), *dk_out.stride()[:3], *dv_out.stride()[:3], heads, group,
            kv_tiles.start, *seg.args,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, DOT_F32=dot_f32, ATOMIC_DQ=atomic, PER_HEAD=per_head,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if per_head:
            dk.copy_(dk_out)
            dv.copy_(dv_out)
        if atomic:
            dq.copy_(dq_acc)
            return
        cfg = self.config.dq
        q_tiles = tile_run(seg.q_frames, cfg.q_tile[0], self.plan_q.dims[0].q_tiles, self.plan_q.q_tiles, n0)
        m.attention_bwd_dq[(len(q_tiles), batch * heads)](
            q, k, v, dout, dq, lse, delta, t_q, scale * LOG2E, scale,
            *(s for st in common for s in st), *dq.stride()[:3], heads, group,
            q_tiles.start, *seg.args,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, DOT_F32=dot_f32, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
