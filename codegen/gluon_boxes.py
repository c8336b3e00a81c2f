"""Which multi-dimensional masks the Gluon forward runs with a per-dimension predicate, and the
tables it reads for them.

`codegen.gluon_plan` admits masks whose visited tiles are all full, on grids the tiles divide. The
masks video and image users run most are neither: a neighborhood window without a stride
(NATTEN's NA) cuts tiles at every window edge, and a GNA window on a latent whose extent the tile
does not divide (HunyuanVideo at 720p is 30 x 45 x 80; Cosmos 16 x 44 x 80) shifts its last
group off the tiles and leaves a ragged tile. One product term of the mask is a box per row: in
every dimension d a row at coordinate x sees keys [lo_d(x), hi_d(x)] (`maskdsl.intervals`), so
its keys are the product of those intervals, and a query tile's visited key tiles are the product
of its per-dimension runs: one box, as the whole-tile mode wants. The predicate is then three
interval tests per score, read from 2 x (n0 + n1 + n2) integers, not from an [L, L] mask.

Which tiles get it: a key tile is full for a query tile when it is in every dimension (every row
of the query tile sees every key of the key tile there: `maskdsl.transpose.query_tile_ranges`' full
range), and only the others are masked; a key tile that overhangs the grid is never full (keys
past the extent are outside every row's interval, so the same test masks them). Rows past the
grid see nothing on masked tiles and nothing of theirs is stored.

Refused: head_dim other than 128 (`HEAD_DIM`), unions of several product terms (their keys per row are not one box; a union whose
tiles are all full runs the whole-tile mode), dilated layouts, more than 3 dimensions, and 1-D
token orders (`codegen.gluon_runs` has their predicate: intervals per row, no box needed).
Nothing here imports Gluon.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from maskdsl.codegen.gluon_plan import RANK, TileRanges, layout_tiles, pad_rank
from maskdsl.codegen.plan import KernelPlan
from maskdsl.intervals import SymRel, evaluate
from maskdsl.transpose import query_tile_ranges

ROW = 15  # table columns: c0..c2, [lo, hi) of key tiles per dimension, [full_lo, full_hi) per dimension
# The predicate's compares do not shrink with head_dim while the tile's MMAs halve: at 64 a mask whose
# tiles are mostly masked ran slower than the template at the same config (H100, 8x24x24 window
# (5, 9, 9), 32 heads: 0.191 against 0.170 ms), at 128 it won on all seven cases measured.
HEAD_DIM = 128


def head_dim_blocker(head_dim: int) -> str | None:
    """Why the per-dimension predicate does not run this head_dim (see HEAD_DIM), or None."""
    if head_dim != HEAD_DIM:
        return (f"head_dim {head_dim}: the per-dimension predicate runs head_dim {HEAD_DIM} only (at 64 its "
                "masked tiles cost more than the template's)")
    return None


@dataclass(frozen=True)
class BoxRanges(TileRanges):
    """The whole-tile mode's boxes plus, per query tile and dimension, the key tiles that need no
    predicate [full_lo, full_hi), and each coordinate's key interval per dimension.

    `bounds`: int32, per dimension d (of the padded grid) the rows' lo_d then hi_d (inclusive; 1, 0
    where a coordinate sees nothing), concatenated: 2 x (n0 + n1 + n2) values, the kernel's layout.
    """

    full_lo: np.ndarray = field(default_factory=lambda: np.zeros((0, RANK), np.int32))
    full_hi: np.ndarray = field(default_factory=lambda: np.zeros((0, RANK), np.int32))
    bounds: np.ndarray | None = None
    mode = "boxes"  # as gluon_plan.TileRanges.mode

    @property
    def table(self) -> np.ndarray:
        """int32 [busy query tiles, ROW] in tile order: coordinates, the box, the full box."""
        busy = self.busy
        box = np.stack([self.lo[busy], self.hi[busy]], axis=2).reshape(len(busy), 2 * RANK)
        full = np.stack([self.full_lo[busy], self.full_hi[busy]], axis=2).reshape(len(busy), 2 * RANK)
        return np.concatenate([self.coords(busy), box, full], axis=1).astype(np.int32)

    def applied(self, tile: int) -> np.ndarray:
        """[rows of the grid, keys of the grid] bool: what the kernel attends for query tile `tile`
        (its rows inside the grid), rebuilt from the tables as the kernel reads them; for tests."""
        shape, kv_tile = np.array(self.shape), np.array(self.kv_tile)
        keys = np.stack(np.unravel_index(np.arange(int(np.prod(shape))), self.shape), axis=1)
        rows = self.rows(np.array([tile]))
        out = np.zeros((len(rows), len(keys)), bool)
        if not (self.hi[tile] > self.lo[tile]).all():
            return out
        kt = keys // kv_tile
        in_box = ((kt >= self.lo[tile]) & (kt < self.hi[tile])).all(1)
        full = ((kt >= self.full_lo[tile]) & (kt < self.full_hi[tile])).all(1)
        row_xy = np.stack(np.unravel_index(rows, self.shape), axis=1)
        offs = np.concatenate([[0], np.cumsum(2 * shape)])
        lo = np.stack([self.bounds[offs[d] + row_xy[:, d]] for d in range(RANK)], axis=1)
        hi = np.stack([self.bounds[offs[d] + shape[d] + row_xy[:, d]] for d in range(RANK)], axis=1)
        sees = ((keys[None] >= lo[:, None]) & (keys[None] <= hi[:, None])).all(2)
        out[:] = in_box[None] & (full[None] | sees)
        return out


def _refused(reason: str) -> BoxRanges:
    empty = np.zeros((0, RANK), np.int32)
    return BoxRanges(empty, empty, reason)


def box_ranges(plan: KernelPlan, q_tile=None, kv_tile=None) -> BoxRanges:
    """The predicated box schedule of the plan's mask (module docstring); tiles default to
    `gluon_plan.kernel_tiles`, a test passes its own."""
    tiles = layout_tiles(plan, q_tile, kv_tile)
    if isinstance(tiles, str):
        return _refused(tiles)
    q_tile, kv_tile = tiles
    if all(e == 1 for e in plan.shape[:-1]):
        return _refused("a 1-D token order: its predicate is codegen.gluon_runs'")
    if len(plan.terms) != 1:
        return _refused(f"a union of {len(plan.terms)} product terms: a row's keys are not one box")
    shape, q_tile, kv_tile = pad_rank(plan.shape), pad_rank(q_tile), pad_rank(kv_tile)
    term = (None,) * (RANK - len(plan.terms[0])) + tuple(plan.terms[0])
    per_dim, bounds = [], [[], []]
    for td, n, qt, kt in zip(term, shape, q_tile, kv_tile):
        if td is None:  # a padding dimension: one tile, seen entirely
            lo, hi = np.zeros(1, np.int64), np.zeros(1, np.int64)
        else:
            if td.dilation != 1:
                return _refused("a dilated (strided) term: a row's keys are not an interval")
            lo, hi = evaluate(SymRel(1, td.lo, td.hi, td.qa, td.qb), n)
        empty = lo > hi
        bounds[0].append(np.where(empty, 1, lo)), bounds[1].append(np.where(empty, 0, hi))
        tab = query_tile_ranges(lo, hi, 1, qt, kt)  # inclusive [a, b] visited, [fa, fb] full
        seen, full = tab[:, 0] <= tab[:, 1], tab[:, 2] <= tab[:, 3]
        per_dim.append((np.where(seen, tab[:, 0], 0), np.where(seen, tab[:, 1] + 1, 0),
                        np.where(full, tab[:, 2], 0), np.where(full, tab[:, 3] + 1, 0)))
    grid = np.meshgrid(*[np.arange(len(p[0])) for p in per_dim], indexing="ij")
    cols = [np.stack([per_dim[d][k][grid[d]].reshape(-1) for d in range(RANK)], axis=1) for k in range(4)]
    lo, hi, f_lo, f_hi = cols
    busy = (hi > lo).all(1)
    lo, hi = np.where(busy[:, None], lo, 0), np.where(busy[:, None], hi, 0)
    flat = np.concatenate([np.concatenate([bounds[0][d], bounds[1][d]]) for d in range(RANK)])
    return BoxRanges(lo.astype(np.int32), hi.astype(np.int32), None, shape, q_tile, kv_tile,
                     f_lo.astype(np.int32), f_hi.astype(np.int32), flat.astype(np.int32))
