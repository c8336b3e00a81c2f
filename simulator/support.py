"""Exact visited-tile totals from the supports of the product terms: ranking thousands of configs.

A static mask is a union of product terms P_1..P_m (``maskdsl.analysis.counts.products``). With tile-major
tiles, the (query tile, key tile) pairs P_j visits form a product set: V_j = V_j,0 x V_j,1 x ...
(visited iff visited in every dimension). The union visits V_1 ∪ ... ∪ V_m, and by
inclusion-exclusion

    |V_1 ∪ ... ∪ V_m| = sum over non-empty S of (-1)^(|S|+1) prod_d |AND_{j in S} V_j,d|

since an intersection of product sets is the product of the per-dimension intersections.
Every factor is a [query tiles of d, key tiles of d] boolean table, cached per (dimension, tile
extents), so one more config costs microseconds on small grids. A dimension whose table would be
much larger than its bands (`simulator.band`: each query tile's window of key tiles; a long 1-D
window) keeps the bands and meets them window by window: O(band), not O(tiles²). That is all `sweep` needs to
rank by the upper bound; full and partial tiles need the real counts (``simulator.counting``).
"""

from __future__ import annotations

import math

import numpy as np

from maskdsl.spec import ir
from maskdsl.analysis.counts import NotAnalyzable
from maskdsl.simulator.band import BandTable
from maskdsl.simulator.tables import dim_tables, term_rels

MAX_SUBSETS = 4096
BAND_GAIN = 16  # keep bands when the dense table is this many times larger (an AND of booleans is that much cheaper)
DENSE_FLOOR = 1 << 16  # tables of up to this many entries stay dense whatever their bands


class SupportCounter:
    """Visited tiles of one static mask for any tile-major config (per-dimension tables cached)."""

    def __init__(self, expr: ir.MaskExpr, shape: tuple[int, ...]):
        self.expr, self.shape = expr, tuple(shape)
        self.terms = len(term_rels(expr, self.shape, "products"))
        self._seen: dict[tuple[int, int, int], tuple[int, int, list[np.ndarray | BandTable], list[int]]] = {}

    def _dim(self, d: int, tq: int, tk: int):
        key = (d, tq, tk)
        if key not in self._seen:
            tables = dim_tables(self.expr, self.shape, d, tq, tk, kind="products")
            nq, nk = -(-self.shape[d] // tq), -(-self.shape[d] // tk)  # the empty mask has no tables
            shape = tables[0].shape if tables else (nq, nk)
            if shape[0] * shape[1] <= max(DENSE_FLOOR, BAND_GAIN * sum(t.size for t in tables)):
                supports = [t.dense() > 0 for t in tables]
            else:
                supports = [t.with_values(t.values > 0) for t in tables]
            counts = [int(np.count_nonzero(x.values if isinstance(x, BandTable) else x)) for x in supports]
            self._seen[key] = (shape[0], shape[1], supports, counts)
        return self._seen[key]

    def visited(self, q_tile, kv_tile) -> tuple[int, int]:
        """(visited tile pairs, dense tile pairs) for the config, exactly."""
        dims = [self._dim(d, q_tile[d], kv_tile[d]) for d in range(len(self.shape))]
        dense = math.prod(nq * nk for nq, nk, _, _ in dims)
        total = 0
        subsets = 0

        def rec(start, current, size):
            nonlocal total, subsets
            for j in range(start, self.terms):
                if current is None:  # one term: its supports and their counts are cached
                    nxt, counts = [dim[2][j] for dim in dims], [dim[3][j] for dim in dims]
                else:
                    nxt = [_meet(current[d], dims[d][2][j]) for d in range(len(dims))]
                    counts = [int(np.count_nonzero(x.values if isinstance(x, BandTable) else x)) for x in nxt]
                if 0 in counts:
                    continue  # empty: so is every superset
                subsets += 1
                if subsets > MAX_SUBSETS:
                    raise NotAnalyzable(f"more than {MAX_SUBSETS} overlapping term supports")
                total += (1 if size % 2 == 0 else -1) * math.prod(counts)
                rec(j + 1, nxt, size + 1)

        rec(0, None, 0)
        return total, dense


def _meet(a, b):
    """Tile pairs both supports visit (dense boolean tables or bands; one dimension keeps one kind)."""
    return a.meet(b) if isinstance(a, BandTable) else a & b
