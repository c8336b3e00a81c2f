"""The backward of a static mask's attention: FlashAttention-2's three kernels rendered from the plan.

`attention_bwd.py.jinja` holds a preprocess (delta = rowsum(dO * O)), a dK/dV kernel (one program
per key tile and kv head, walking the query tiles that see the tile) and a dQ kernel (one program
per query tile and head, walking its key tiles). Both walks read per-dimension tile ranges from a
small int32 table built here from the exact row bounds (`maskdsl.transpose`): [terms, rank, tiles
in the dimension, 4], O(extent) entries per dimension, never [L, L] and no block mask. A GQA
group's query heads are summed inside the dK/dV program, so no kernel uses atomics: the same
inputs give the same bits.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import torch

from maskdsl import ir
from maskdsl.codegen.config import BackwardConfig
from maskdsl.codegen.bounds import strided_bounds
from maskdsl.codegen.checks import padded_head_dim
from maskdsl.codegen.context import minus_box
from maskdsl.codegen.printer import symbol
from maskdsl.codegen.plan import KernelPlan, build_plan
from maskdsl.codegen.render import comment_safe, kernel_key, load_module, render_template
from maskdsl.codegen.segment import Segment, tile_run, whole
from maskdsl.intervals import SymRel, evaluate
from maskdsl.transpose import key_tile_ranges, query_tile_ranges

TEMPLATE = "attention_bwd.py.jinja"
LOG2E = 1.4426950408889634
PREPROCESS_BLOCK = 64


def _kv_tiles_per_group(dim) -> int:
    return -(-dim.group_len_max // dim.kv_tile)


def _rows(plan: KernelPlan, term, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-row key bounds of one term in dimension d (the predicate's numbers, evaluated).

    A strided term (its dilation is not the layout's, which then is 1) gets its first and last key
    in the dimension's own coordinates: a bounding range whose tiles are all partial (`_strided`).
    """
    td, dim = term[d], plan.dims[d]
    if td.dilation == dim.dilation:
        return evaluate(SymRel(dim.dilation, td.lo, td.hi, td.qa, td.qb), dim.extent)
    e = td.dilation
    lo, hi = evaluate(SymRel(e, td.lo, td.hi, td.qa, td.qb), dim.extent)
    phase = np.arange(dim.extent) % e
    empty = lo > hi
    return np.where(empty, 0, phase + e * lo), np.where(empty, -1, phase + e * hi)


def _strided(plan: KernelPlan, term, d: int) -> bool:
    return term[d].dilation != plan.dims[d].dilation


def _no_full(table: np.ndarray) -> np.ndarray:
    """A strided term's keys are every dilation-th of its range: no tile pair of it is full."""
    table[:, 2], table[:, 3] = 0, -1
    return table


def schedule_tables(plan_kv: KernelPlan, plan_q: KernelPlan) -> tuple[np.ndarray, np.ndarray]:
    """(dK/dV table, dQ table), each [terms, rank, max tiles in a dimension, 4] int32.

    dK/dV rows are key tiles of `plan_kv` (group-major per dimension) holding [qa, qb, fa, fb]:
    the query tiles that visit the key tile and those that see all of it. dQ rows are query tiles
    of `plan_q` holding [a, b, fa, fb] in key tiles. Indices are local to the dilation group.
    """
    rank = plan_q.rank
    kv_rows = [[None] * rank for _ in plan_q.terms]
    q_rows = [[None] * rank for _ in plan_q.terms]
    for t, term in enumerate(plan_q.terms):
        for d in range(rank):
            lo, hi = _rows(plan_q, term, d)
            dq_dim, kv_dim = plan_q.dims[d], plan_kv.dims[d]
            q_rows[t][d] = query_tile_ranges(lo, hi, dq_dim.dilation, dq_dim.q_tile, dq_dim.kv_tile)
            walk = query_tile_ranges(lo, hi, kv_dim.dilation, kv_dim.q_tile, kv_dim.kv_tile)
            kv_rows[t][d] = key_tile_ranges(walk, kv_dim.dilation, _kv_tiles_per_group(kv_dim))
            if _strided(plan_q, term, d):
                q_rows[t][d], kv_rows[t][d] = _no_full(q_rows[t][d]), _no_full(kv_rows[t][d])
    return _pack(kv_rows), _pack(q_rows)


def _pack(rows) -> np.ndarray:
    maxt = max(len(r) for term in rows for r in term)
    out = np.tile(np.array([0, -1, 0, -1], dtype=np.int32), (len(rows), len(rows[0]), maxt, 1))
    for t, term in enumerate(rows):
        for d, r in enumerate(term):
            out[t, d, :len(r)] = r
    return out


def _shell_free(table: np.ndarray) -> bool:
    """One term whose every visited pair is full in every dimension: the kernel drops its predicate loops."""
    if table.shape[0] != 1:
        return False
    t = table[0].reshape(-1, 4)
    seen = t[:, 0] <= t[:, 1]
    return bool(np.all(t[seen, 0] == t[seen, 2]) and np.all(t[seen, 1] == t[seen, 3]))


def _dims(plan: KernelPlan) -> list[dict]:
    cfg, rank = plan.config, plan.rank
    out = []
    for d, dp in enumerate(plan.dims):
        q_inner = math.prod(cfg.q_tile[d + 1:])
        kv_inner = math.prod(cfg.kv_tile[d + 1:])
        kpg = _kv_tiles_per_group(dp)
        out.append(dict(i=d, extent=dp.extent, stride=dp.stride, dilation=dp.dilation, q_tile=dp.q_tile,
                        kv_tile=dp.kv_tile, q_tiles=dp.q_tiles, q_tiles_per_group=dp.q_tiles_per_group,
                        kv_tiles=dp.dilation * kpg, kv_tiles_per_group=kpg, q_inner=q_inner, kv_inner=kv_inner))
    assert len(out) == rank
    return out


def _context(plan: KernelPlan) -> dict:
    """What the backward template reads of one kernel's plan: per-dimension facts (`_dims`) and the
    2 x rank slabs that cut the partial shell around the fully-seen box (origin and size per dimension)."""
    rank = plan.rank
    slabs = []
    for d in range(rank):
        for side in ("left", "right"):
            origin, size = [], []
            for k in range(rank):
                if k < d:
                    origin.append(f"fa_0_{k}")
                    size.append(f"nf_{k}")
                elif k > d:
                    origin.append(f"a_0_{k}")
                    size.append(f"nb_0_{k}")
                elif side == "left":
                    origin.append(f"a_0_{k}")
                    size.append(f"(fa_0_{k} - a_0_{k})")
                else:
                    origin.append(f"(fb_0_{k} + 1)")
                    size.append(f"(a_0_{k} + nb_0_{k} - 1 - fb_0_{k})")
            slabs.append({"name": f"partial tiles, {side} of the full box in dimension {d}",
                          "origin": origin, "size": size})
    return {"plan": plan, "cfg": plan.config, "dims": _dims(plan), "slabs": slabs,
            "dilations": tuple(d.dilation for d in plan.dims),
            "fa_list": [f"fa_0_{d}" for d in range(rank)], "nf_list": [f"nf_{d}" for d in range(rank)]}


def _outside_dominant(t: int, rank: int) -> tuple[list[str], list[dict]]:
    """(lines, pieces): term t's box of tiles minus term 0's, as at most 2 x rank boxes (origin and
    size per dimension), the forward's `minus_box` on the table's [a, a + nb) ranges."""
    dims = [SimpleNamespace(i=d) for d in range(rank)]
    lines, boxes = minus_box(dims, str(t), "a", "e", "0")
    size_of = {}
    for d in range(rank):
        x = f"{t}_{d}"
        size_of[(f"a_{x}", f"e_{x}")] = f"nb_{x}"
        ranges = [(f"a_{x}", f"left_hi_{x}", f"left_n_{x}"), (f"right_lo_{x}", f"e_{x}", f"right_n_{x}")]
        if d < rank - 1:  # minus_box intersects every dimension but the last
            ranges.append((f"in_lo_{x}", f"in_hi_{x}", f"in_n_{x}"))
        for lo, hi, n in ranges:
            lines.append(f"{n} = tl.maximum({hi} - {lo} + 1, 0)")
            size_of[(lo, hi)] = n
    pieces = [{"name": f"term {t}, {('left', 'right')[k % 2]} of term 0's box in dimension {k // 2}",
               "origin": [lo for lo, _ in box], "size": [size_of[r] for r in box]} for k, box in enumerate(boxes)]
    return lines, pieces


def render_backward(plan_kv: KernelPlan, plan_q: KernelPlan, tables: tuple[np.ndarray, np.ndarray]) -> str:
    from maskdsl.version import __version__

    kv, qd = _context(plan_kv), _context(plan_q)
    rank = plan_q.rank
    terms = []
    for t, term in enumerate(plan_q.terms):
        lines, pieces = _outside_dominant(t, rank) if t else ([], [])
        bounds = []
        for d, td in enumerate(term):
            if _strided(plan_q, term, d):  # own coordinates; the predicate checks the phase
                lo, hi = strided_bounds(td, plan_q.dims[d].extent, symbol("i"))
                bounds.append({"lo": lo, "hi": hi, "phase": td.dilation, "clamped": True})
            else:
                bounds.append({"lo": td.lo, "hi": td.hi, "phase": None, "clamped": False})
        terms.append({"i": t, "dims": list(term), "bounds": bounds, "minus_lines": lines, "pieces": pieces})
    return render_template(
        TEMPLATE, version=__version__, mask_text=comment_safe(plan_q.mask_text), kv=kv, qd=qd, terms=terms,
        tokens=math.prod(plan_q.shape), inner=math.prod(plan_q.shape[1:]),
        kv_tiles=math.prod(d["kv_tiles"] for d in kv["dims"]),
        kv_maxt=tables[0].shape[2], q_maxt=tables[1].shape[2],
        kv_shell_free=_shell_free(tables[0]), q_shell_free=_shell_free(tables[1]), full_box=plan_q.full_box)


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
        dot_f32 = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
        group = heads // k.shape[1]
        common = (q.stride()[:3], k.stride()[:3], v.stride()[:3], dout.stride()[:3])
        n0, dim0 = self.plan_q.shape[0], self.plan_kv.dims[0]
        cfg = self.config.dkdv
        kv_tiles = tile_run(seg.k_frames, cfg.kv_tile[0], dim0.dilation * _kv_tiles_per_group(dim0), self.kv_tiles, n0)
        m.attention_bwd_dkdv[(len(kv_tiles), batch * k.shape[1])](
            q, k, v, dout, dk, dv, lse, delta, t_kv, scale * LOG2E, scale,
            *(s for st in common for s in st), *dk.stride()[:3], *dv.stride()[:3], heads, group,
            kv_tiles.start, *seg.args,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, DOT_F32=dot_f32, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
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
