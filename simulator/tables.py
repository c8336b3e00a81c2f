"""Per-dimension tile count tables, cached, and derived from finer ones when that is cheaper.

A table is one dimension of one product term, in tile-major coordinates: entry [t, u] counts the
attended (query, key) coordinate pairs of that dimension between query tile t and key tile u.
Every count the simulator reports is built from these. They are `simulator.band.BandTable`s: each
query tile keeps only the window of key tiles its queries can reach, so a table costs
O(n log n + band) to count and O(band) to keep, where the dense table was O(tiles²) in both.

Tables are additive over tiles: a tile of extent 2T (cut per dilation group) is the union of two
consecutive tiles of extent T of the same group. So a coarser table whose extents a cached one's
divide is a block sum of it (`BandTable.block_sum`), which is one pass over the fine table's
entries; counting anew sorts the dimension's n rows. The cached table is summed when it holds
at most about twice as many entries as the dimension has coordinates (small grids, coarse steps
of a sweep), else the table is counted. The cache is an LRU bounded by the number of stored
entries (elements), not by the number of tables.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from maskdsl.spec import ir
from maskdsl.analysis.counts import layout_dilation, num_products, permuted_rels, signed_terms
from maskdsl.simulator.band import BandTable, band_table
from maskdsl.simulator.tiles import dim_intervals

BUDGET_ELEMENTS = 1 << 24  # ~128 MiB of int64 across all cached tables
# a cached finer table is summed when it holds at most SUM_LIMIT * n + SUM_FLOOR entries: one pass
# over its entries costs about what sorting and searching the dimension's n rows does (measured)
SUM_LIMIT, SUM_FLOOR = 2, 4096

_cache: OrderedDict[tuple, list[BandTable]] = OrderedDict()
_rels: dict[tuple, list] = {}
_size = 0


def term_rels(expr: ir.MaskExpr, shape: tuple[int, ...], kind: str) -> list[tuple[int, tuple]]:
    """(sign, permuted per-dimension relations) of the mask's terms.

    kind "signed": the inclusion-exclusion expansion (counts); "products": the union's own
    product terms, all with sign +1 (their supports, for `simulator.support`).
    """
    key = (expr, shape, kind)
    if key not in _rels:
        dil = layout_dilation(num_products(expr, shape), len(shape))
        terms = signed_terms(expr, shape) if kind == "signed" else [(1, t) for t in num_products(expr, shape)]
        if len(_rels) > 64:
            _rels.clear()
        _rels[key] = [(sign, permuted_rels(t, dil)) for sign, t in terms]
    return _rels[key]


def dim_tables(expr: ir.MaskExpr, shape: tuple[int, ...], d: int, tq: int, tk: int,
               kind: str = "signed") -> list[BandTable]:
    """[query tiles of d, key tiles of d] count tables of dimension d, one per term of `term_rels`."""
    if kind == "products" and len(num_products(expr, shape)) == 1:
        kind = "signed"  # one product is its own inclusion-exclusion: the same tables, counted once
    key = (expr, shape, kind, d, tq, tk)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    dil = layout_dilation(num_products(expr, shape), len(shape))[d]
    n = shape[d]
    q, k = dim_intervals(n, tq, dil), dim_intervals(n, tk, dil)
    finer = _finest_divisor(key)
    if finer is not None and sum(t.size for t in _cache[finer]) <= SUM_LIMIT * n + SUM_FLOOR:
        fq, fk = dim_intervals(n, finer[4], dil), dim_intervals(n, finer[5], dil)
        rows = np.searchsorted(fq[:, 0], q[:, 0])
        cols = np.searchsorted(fk[:, 0], k[:, 0])
        tables = [t.block_sum(rows, cols) for t in _cache[finer]]
    else:
        tables = [band_table(rels[d], q, k) for _, rels in term_rels(expr, shape, kind)]
    _store(key, tables)
    return tables


def _finest_divisor(key: tuple):
    """A cached table of the same dimension whose tile extents divide the requested ones."""
    expr, shape, kind, d, tq, tk = key
    best = None
    for other in _cache:
        if other[:4] == (expr, shape, kind, d) and tq % other[4] == 0 and tk % other[5] == 0:
            if best is None or other[4] * other[5] > best[4] * best[5]:
                best = other  # the coarsest usable one is the cheapest to sum
    return best


def _store(key: tuple, tables: list[BandTable]) -> None:
    global _size
    size = sum(t.size for t in tables)
    _cache[key] = tables
    _size += size
    while _size > BUDGET_ELEMENTS and len(_cache) > 1:
        _, old = _cache.popitem(last=False)
        _size -= sum(t.size for t in old)


def cached_elements() -> int:
    """Entries the cached tables hold: the work and memory a simulation's tables cost (tests bound it)."""
    return _size


def clear() -> None:
    """Drop every cached table (tests use it to check that derived tables equal counted ones)."""
    global _size
    _cache.clear()
    _rels.clear()
    _size = 0
