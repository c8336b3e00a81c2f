"""Per-dimension tile count tables, cached, and derived from finer ones when a sweep asks again.

A table is one dimension of one product term, in tile-major coordinates: entry [t, u] counts the
attended (query, key) coordinate pairs of that dimension between query tile t and key tile u
(``box_pair_counts`` on 1-D boxes). Every count the simulator reports is built from these.

Tables are additive over tiles: a tile of extent 2T (cut per dilation group) is the union of two
consecutive tiles of extent T of the same group. So once a fine table is known, any coarser one
whose extents it divides is a block sum (``np.add.reduceat``) instead of a new O(n log n + T^2)
count. That is what makes a sweep over 1-D tiles of 16..256 tokens on 32k tokens practical: the
16x16 table is counted once, every other config is summed from it. The cache is an LRU bounded
by the number of stored entries (elements), not by the number of tables.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from maskdsl import ir
from maskdsl.analysis import box_pair_counts, layout_dilation, num_products, permuted_rels, signed_terms
from maskdsl.simulator.tiles import dim_intervals

BUDGET_ELEMENTS = 1 << 24  # ~128 MiB of int64 across all cached tables

_cache: OrderedDict[tuple, list[np.ndarray]] = OrderedDict()
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
               kind: str = "signed") -> list[np.ndarray]:
    """[query tiles of d, key tiles of d] count tables of dimension d, one per term of `term_rels`."""
    key = (expr, shape, kind, d, tq, tk)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    dil = layout_dilation(num_products(expr, shape), len(shape))[d]
    n = shape[d]
    q, k = dim_intervals(n, tq, dil), dim_intervals(n, tk, dil)
    finer = _finest_divisor(key)
    if finer is not None:
        fq, fk = dim_intervals(n, finer[4], dil), dim_intervals(n, finer[5], dil)
        rows = np.searchsorted(fq[:, 0], q[:, 0])
        cols = np.searchsorted(fk[:, 0], k[:, 0])
        tables = [np.add.reduceat(np.add.reduceat(t, rows, axis=0), cols, axis=1) for t in _cache[finer]]
    else:
        tables = [box_pair_counts((rels[d],), q[:, None, :], k[:, None, :])
                  for _, rels in term_rels(expr, shape, kind)]
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


def _store(key: tuple, tables: list[np.ndarray]) -> None:
    global _size
    size = sum(t.size for t in tables)
    _cache[key] = tables
    _size += size
    while _size > BUDGET_ELEMENTS and len(_cache) > 1:
        _, old = _cache.popitem(last=False)
        _size -= sum(t.size for t in old)


def clear() -> None:
    """Drop every cached table (tests use it to check that derived tables equal counted ones)."""
    global _size
    _cache.clear()
    _rels.clear()
    _size = 0
