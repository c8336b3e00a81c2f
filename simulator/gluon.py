"""Whether Hopper's warp-specialized Gluon forward runs a mask, decided from the simulator's own tables.

The Gluon kernel (codegen.gluon_fwd; its rule lives in codegen.gluon_plan, which the simulator may
not import: the two are peers) has no mask predicate: each query tile of 128 tokens walks one box
of 128-token key tiles, every one seen entirely. The simulator restates that rule analytically, on
the per-dimension count tables it already keeps (`simulator.tables`), so a prediction can say which
kernel it is for:

* an undilated grid of at most 3 dimensions, head_dim 64 or 128, fp16 / bf16, a static mask (top-k
  runs the template);
* the tiles: on a 1-D token order (every dimension but the last of extent 1) the kernel's own
  128-token tiles whatever the config; otherwise the config's, when each holds 128 tokens, and
  tile-major (the kernel's tiles are boxes of the grid);
* every dimension divisible by both tiles;
* for every product term of the union, every tile pair it visits is full for that term (per
  dimension: a query tile's visited key tiles are all full there), and per query tile the terms'
  key-tile boxes cover exactly their bounding box (visited tiles == box volume: one box).

On a 1-D token order a mask that fails those checks may still run in the kernel's predicated mode
(codegen.gluon_runs): each row's keys at most two intervals and each query tile's key tiles at most
two runs, ragged ends allowed (`maskdsl.row_runs`, shared with codegen: the same rule, not a copy).
Its tiles are costed as the kernel's full ones: the predicate is a few integer compares on a run's
edge tiles. On a grid, a mask of one product term (any neighborhood, ragged extents too) at head_dim
128 runs the per-dimension predicate (codegen.gluon_boxes: a box of keys per row); its partial tiles pay the
template's predicate premium on top of the Gluon tile (`simulator.cost`).

The last check is slightly wider than codegen's merge (which also wants the terms' boxes to agree
on every dimension but the last): two terms tiling a box side by side in a leading dimension pass
here and are refused there. The suite has no such mask; the rule's tests pin the cases it does have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from maskdsl import ir
from maskdsl.analysis import layout_dilation, num_products
from maskdsl.row_runs import row_intervals, tile_runs
from maskdsl.simulator.counting import tile_stats
from maskdsl.simulator.tables import dim_tables

TILE = 128  # tokens in the kernel's query and key tiles
HEAD_DIMS = (64, 128)
DTYPES = ("fp16", "bf16", "float16", "bfloat16")
MAX_RANK = 3
BOX_HEAD_DIM = 128  # the per-dimension predicate's one head_dim (codegen.gluon_boxes.HEAD_DIM says why)


@dataclass(frozen=True)
class GluonPlan:
    """The kernel's tiles when it runs the mask, else why not (`reason`)."""

    q_tile: tuple[int, ...] = ()
    kv_tile: tuple[int, ...] = ()
    reason: str | None = None
    predicated: bool = False  # a mode with a predicate: 1-D runs (codegen.gluon_runs) or boxes (codegen.gluon_boxes)

    @property
    def eligible(self) -> bool:
        return self.reason is None


def gluon_tiles(shape: tuple[int, ...], q_tile: tuple[int, ...], kv_tile: tuple[int, ...]):
    """(query tile, key tile) the Gluon kernel would use for this config, or why none."""
    if all(n == 1 for n in shape[:-1]):
        one = (1,) * (len(shape) - 1) + (TILE,)
        return one, one
    if math.prod(q_tile) != TILE or math.prod(kv_tile) != TILE:
        return f"the kernel's tiles hold {TILE} tokens; config q{q_tile} k{kv_tile} does not"
    return tuple(q_tile), tuple(kv_tile)


def gluon_plan(expr: ir.MaskExpr, shape, q_tile, kv_tile, permute: bool = True, head_dim: int = 128,
               dtype: str = "bf16", dynamic: bool = False) -> GluonPlan:
    """Whether the Gluon forward runs `expr` on `shape` with this config (module docstring)."""
    shape = tuple(shape)
    if dynamic:
        return GluonPlan(reason="a top-k mask runs the template's predicate loop")
    if len(shape) > MAX_RANK:
        return GluonPlan(reason=f"grid {shape}: the kernel takes at most {MAX_RANK} dimensions")
    if head_dim not in HEAD_DIMS:
        return GluonPlan(reason=f"head_dim {head_dim}; the kernel takes {HEAD_DIMS}")
    if str(dtype).lower() not in DTYPES:
        return GluonPlan(reason=f"dtype {dtype}; the kernel takes fp16 and bf16")
    tiles = gluon_tiles(shape, tuple(q_tile), tuple(kv_tile))
    if isinstance(tiles, str):
        return GluonPlan(reason=tiles)
    qt, kt = tiles
    if not permute and any(n > 1 for n in shape[:-1]):
        return GluonPlan(reason="row-major tiles (--no-permute) are not boxes of the grid")
    terms = num_products(expr, shape)
    if any(d != 1 for d in layout_dilation(terms, len(shape))):
        return GluonPlan(reason="dilated layout: a tile is not a box of memory")
    if any(n % a or n % b for n, a, b in zip(shape, qt, kt)):
        reason = f"grid {shape} is not a multiple of the tiles {qt} x {kt}"
    else:
        reason = _one_full_box(expr, shape, qt, kt)
    if reason is not None and all(n == 1 for n in shape[:-1]):
        why = _runs_reason(terms, shape[-1])
        return GluonPlan(qt, kt, None, True) if why is None else GluonPlan(qt, kt, f"{reason}; predicated: {why}")
    if reason is not None and len(terms) == 1 and head_dim == BOX_HEAD_DIM:  # a box of keys per row (gluon_boxes)
        return GluonPlan(qt, kt, None, True)
    if reason is not None and len(terms) == 1:
        reason = f"{reason}; predicated: the per-dimension predicate runs head_dim {BOX_HEAD_DIM} only"
    if reason is not None and len(terms) > 1:
        reason = f"{reason}; predicated: a union of {len(terms)} product terms is not one box of keys per row"
    return GluonPlan(qt, kt, reason)


def _runs_reason(terms, n: int) -> str | None:
    """None when the predicated 1-D mode takes the mask (maskdsl.row_runs), else why not."""
    if any(rel.dilation != 1 for t in terms for rel in t.num):
        return "a dilated term: its keys are not an interval per row"
    iv = row_intervals([t.num[-1].lo for t in terms], [t.num[-1].hi for t in terms], n)
    if isinstance(iv, str):
        return iv
    runs = tile_runs(iv)
    return runs if isinstance(runs, str) else None


def _one_full_box(expr, shape, qt, kt) -> str | None:
    """None when every query tile's visited key tiles are full for their term and form one box."""
    rank = len(shape)
    per_dim = [dim_tables(expr, shape, d, qt[d], kt[d], kind="products") for d in range(rank)]
    nq = [shape[d] // qt[d] for d in range(rank)]
    size = [qt[d] * kt[d] for d in range(rank)]
    lo = hi = None
    busy_any = np.zeros(math.prod(nq), bool)
    for j in range(len(per_dim[0])):
        rows = [_row_box(per_dim[d][j], size[d]) for d in range(rank)]
        busy = _outer_all([r[0] for r in rows])
        ok = _outer_all([r[1] for r in rows])
        if (busy & ~ok).any():
            t = int(np.flatnonzero(busy & ~ok)[0])
            return f"query tile {t} visits partially seen key tiles (the kernel has no predicate)"
        t_lo = np.stack(_outer_each([r[2] for r in rows]), axis=1)
        t_hi = np.stack(_outer_each([r[3] for r in rows]), axis=1)
        if lo is None:
            lo, hi = np.where(busy[:, None], t_lo, np.iinfo(np.int64).max), np.where(busy[:, None], t_hi, -1)
        else:
            lo = np.where(busy[:, None], np.minimum(lo, t_lo), lo)
            hi = np.where(busy[:, None], np.maximum(hi, t_hi), hi)
        busy_any |= busy
    if lo is None:
        return None
    visits = tile_stats(expr, shape, qt, kt, True).visits
    box = np.where(busy_any, np.prod(np.maximum(hi - lo, 0), axis=1), 0)
    bad = np.flatnonzero(box != visits)
    if len(bad):
        return f"query tile {int(bad[0])}: its visited key tiles are not one box"
    return None


def _row_box(table, size: int):
    """Per query tile of one dimension's table: (visits any key tile, every visited one is full,
    first visited key tile, last + 1; both 0 where none)."""
    rows = table.rows()
    seen = table.values > 0
    busy = table.row_sums(seen) > 0
    ok = table.row_sums(seen != (table.values == size)) == 0
    seen_rows, seen_cols = rows[seen], table.cols(rows)[seen]  # sorted by row, then column
    first = np.zeros(table.nq, dtype=np.int64)
    last = np.zeros(table.nq, dtype=np.int64)
    runs = np.flatnonzero(np.diff(seen_rows, prepend=-1))  # each busy row's first entry
    ends = np.append(runs[1:], len(seen_rows)) - 1
    first[seen_rows[runs]] = seen_cols[runs]
    last[seen_rows[runs]] = seen_cols[ends] + 1
    return busy, ok, first, last


def _outer_all(parts: list[np.ndarray]) -> np.ndarray:
    """Row-major over the query-tile grid: True where every dimension's entry is."""
    acc = np.ones(1, bool)
    for p in parts:
        acc = np.logical_and.outer(acc, p).reshape(-1)
    return acc


def _outer_each(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Each dimension's per-tile values broadcast over the row-major query-tile grid."""
    grids = np.meshgrid(*parts, indexing="ij")
    return [g.reshape(-1) for g in grids]
