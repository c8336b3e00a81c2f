"""Exact per-tile counts of attended pairs, from the closed-form analysis (never [L, L]).

The mask is a signed sum of product terms (``maskdsl.analysis.counts.signed_terms``: the union of
products by inclusion-exclusion). For one product term and tile-major tiles, the count of a
(query tile, key tile) pair factors over the dimensions:

    count(q, k) = prod_d C_d[q_d, k_d],   C_d = that dimension's [query tiles, key tiles] counts,

so a pair is visited iff visited in every dimension and full iff full in every dimension, and
every total is a product of per-dimension totals (the "single product" fast path: O(sum_d band_d)
whatever the number of tiles; the tables are bands, `simulator.band`). A union needs the real
count, a sum over terms of such Kronecker products. Where the terms' nonzero tile pairs are few
against the dense map (windows with a sink: a band plus a row and a column) they are listed,
summed per pair and classified (`_union_pairs`); otherwise the dense map is assembled for a chunk
of query tiles at a time to bound memory. Row-major tiles are unions of boxes; their counts are
box-pair counts summed per tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from maskdsl.spec import ir
from maskdsl.analysis.counts import layout_dilation, mask_box_counts, num_products
from maskdsl.simulator.band import BandTable
from maskdsl.simulator.tables import dim_tables, term_rels
from maskdsl.analysis.boxes import row_major_tiles
from maskdsl.simulator.tiles import dim_intervals

CHUNK_ELEMENTS = 1 << 22  # tile pairs assembled at once on the general path (~32 MiB of int64)
SPARSE_RATIO = 8  # a union lists its terms' tile pairs when they are under 1/8 of the dense map


@dataclass(frozen=True, eq=False)
class TileStats:
    """Per query tile: key tiles visited and full; plus tile sizes and the exact attended pairs."""

    q_sizes: np.ndarray  # [NQ] tokens in each query tile (edge tiles are smaller)
    k_sizes: np.ndarray  # [NK]
    visits: np.ndarray  # [NQ] key tiles with at least one attended pair
    full: np.ndarray  # [NQ] key tiles whose every pair is attended
    pairs: np.ndarray  # [NQ] attended (query, key) pairs of each query tile
    kernel_full: np.ndarray | None = None  # [NQ] full key tiles the kernel's fully-seen box runs (None: = full)

    @property
    def attended(self) -> int:
        """Attended pairs over the whole grid."""
        return int(self.pairs.sum())

    @property
    def q_tiles(self) -> int:
        return len(self.q_sizes)

    @property
    def k_tiles(self) -> int:
        return len(self.k_sizes)


@dataclass(frozen=True, eq=False)
class TileLayout:
    """Where the tiles are: per-dimension intervals (tile-major) or boxes per flat range (row-major)."""

    shape: tuple[int, ...]
    permute: bool
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    q_dims: tuple[np.ndarray, ...] = ()  # tile-major: [T_d, 2] per dimension
    k_dims: tuple[np.ndarray, ...] = ()
    q_volume: int = 0  # row-major: tokens per tile
    k_volume: int = 0

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        if self.permute:
            return _outer_sizes(self.q_dims), _outer_sizes(self.k_dims)
        total = math.prod(self.shape)
        return _flat_sizes(total, self.q_volume), _flat_sizes(total, self.k_volume)


def _outer_sizes(dims) -> np.ndarray:
    out = np.ones(1, dtype=np.int64)
    for iv in dims:
        out = np.multiply.outer(out, iv[:, 1] - iv[:, 0]).reshape(-1)
    return out


def _flat_sizes(total: int, volume: int) -> np.ndarray:
    starts = np.arange(0, total, volume, dtype=np.int64)
    return np.minimum(starts + volume, total) - starts


def layout_for(expr: ir.MaskExpr, shape, q_tile, kv_tile, permute: bool) -> TileLayout:
    shape = tuple(shape)
    if not permute and len(shape) == 1 and _undilated(expr, shape):
        permute = True  # one undilated dimension: tile-major and row-major tiles are the same ranges
    if not permute:
        return TileLayout(shape, False, tuple(q_tile), tuple(kv_tile), q_volume=math.prod(q_tile),
                          k_volume=math.prod(kv_tile))
    dil = layout_dilation(num_products(expr, shape), len(shape))
    q_dims = tuple(dim_intervals(n, t, d) for n, t, d in zip(shape, q_tile, dil))
    k_dims = tuple(dim_intervals(n, t, d) for n, t, d in zip(shape, kv_tile, dil))
    return TileLayout(shape, True, tuple(q_tile), tuple(kv_tile), q_dims, k_dims)


def _undilated(expr, shape) -> bool:
    try:
        return all(d == 1 for d in layout_dilation(num_products(expr, shape), len(shape)))
    except ValueError:
        return False


def _dim_tables(expr, layout: TileLayout) -> list[tuple[int, list[BandTable]]]:
    """(sign, [C_d per dimension]) for every inclusion-exclusion term, in tile-major coordinates."""
    shape = layout.shape
    per_dim = [dim_tables(expr, shape, d, layout.q_tile[d], layout.kv_tile[d]) for d in range(len(shape))]
    signs = [sign for sign, _ in term_rels(expr, shape, "signed")]
    return [(sign, [per_dim[d][j] for d in range(len(shape))]) for j, sign in enumerate(signs)]


def _kron(tables: list[np.ndarray]) -> np.ndarray:
    """Kronecker product of per-dimension [q_d, k_d] tables, row-major over tile indices."""
    acc = tables[0]
    for t in tables[1:]:
        a, b = acc.shape
        c, e = t.shape
        acc = (acc[:, None, :, None] * t[None, :, None, :]).reshape(a * c, b * e)
    return acc


def pair_count_chunks(expr: ir.MaskExpr, layout: TileLayout) -> Iterator[tuple[slice, np.ndarray]]:
    """(query-tile rows, [rows, NK] attended pairs) chunks covering every tile pair, exactly."""
    if layout.permute:
        yield from _permuted_chunks(expr, layout)
    else:
        yield from _row_major_chunks(expr, layout)


def _permuted_chunks(expr, layout: TileLayout):
    terms = [(sign, tables[0], [t.whole() for t in tables[1:]]) for sign, tables in _dim_tables(expr, layout)]
    q_counts = [len(iv) for iv in layout.q_dims]
    k_counts = [len(iv) for iv in layout.k_dims]
    nk = math.prod(k_counts)
    inner = math.prod(q_counts[1:])  # query tiles per index of dimension 0
    step = max(1, CHUNK_ELEMENTS // max(1, inner * nk))
    for r0 in range(0, q_counts[0], step):
        r1 = min(q_counts[0], r0 + step)
        block = np.zeros(((r1 - r0) * inner, nk), dtype=np.int64)
        for sign, first, rest in terms:
            _add_term(block, sign, [first.dense(r0, r1)] + rest)
        yield slice(r0 * inner, r1 * inner), block


def _add_term(block: np.ndarray, sign: int, tables: list[np.ndarray]) -> None:
    """block += sign * kron(tables), computed only on the rows and columns the term can reach.

    Sink and causal pieces reach a few query or key tiles: their Kronecker product is
    assembled over those alone and scattered, so a union costs about what its largest term does.
    """
    rows = [np.flatnonzero(t.any(axis=1)) for t in tables]
    cols = [np.flatnonzero(t.any(axis=0)) for t in tables]
    if any(len(r) == 0 for r in rows) or any(len(c) == 0 for c in cols):
        return
    sub = _kron([t[np.ix_(r, c)] for t, r, c in zip(tables, rows, cols)])
    whole_rows = all(len(r) == t.shape[0] for r, t in zip(rows, tables))
    whole_cols = all(len(c) == t.shape[1] for c, t in zip(cols, tables))
    if whole_rows and whole_cols:
        block += sign * sub
        return
    ri = np.ravel_multi_index(np.meshgrid(*rows, indexing="ij"), [t.shape[0] for t in tables]).reshape(-1)
    ci = np.ravel_multi_index(np.meshgrid(*cols, indexing="ij"), [t.shape[1] for t in tables]).reshape(-1)
    block[np.ix_(ri, ci)] += sign * sub


def _row_major_chunks(expr, layout: TileLayout):
    qboxes, qstarts = row_major_tiles(layout.shape, layout.q_volume)
    kboxes, kstarts = row_major_tiles(layout.shape, layout.k_volume)
    nq = len(qstarts) - 1
    boxes_per_tile = max(1, len(qboxes) // max(1, nq))
    step = max(1, CHUNK_ELEMENTS // max(1, len(kboxes) * boxes_per_tile))
    for t0 in range(0, nq, step):
        t1 = min(nq, t0 + step)
        b0, b1 = qstarts[t0], qstarts[t1]
        counts = mask_box_counts(expr, layout.shape, qboxes[b0:b1], kboxes)
        counts = np.add.reduceat(counts, qstarts[t0:t1] - b0, axis=0)
        yield slice(t0, t1), np.add.reduceat(counts, kstarts[:-1], axis=1)


def tile_pair_counts(expr: ir.MaskExpr, shape, q_tile, kv_tile, permute: bool = True) -> np.ndarray:
    """[NQ, NK] attended pairs per (query tile, key tile): the tile map, for small problems and tests."""
    layout = layout_for(expr, shape, q_tile, kv_tile, permute)
    nq, nk = (len(s) for s in layout.sizes())
    out = np.zeros((nq, nk), dtype=np.int64)
    for rows, block in pair_count_chunks(expr, layout):
        out[rows] = block
    return out


def tile_stats(expr: ir.MaskExpr | None, shape, q_tile, kv_tile, permute: bool = True) -> TileStats:
    """Visited and full key tiles per query tile, exactly. `expr=None` is the empty mask."""
    shape = tuple(shape)
    if expr is None:
        layout = layout_for(ir.Full(), shape, q_tile, kv_tile, permute)
        qs, ks = layout.sizes()
        zero = np.zeros(len(qs), dtype=np.int64)
        return TileStats(qs, ks, zero, zero.copy(), zero.copy())
    layout = layout_for(expr, shape, q_tile, kv_tile, permute)
    qs, ks = layout.sizes()
    visits = np.zeros(len(qs), dtype=np.int64)
    full = np.zeros(len(qs), dtype=np.int64)
    pairs = np.zeros(len(qs), dtype=np.int64)
    if layout.permute:
        terms = _dim_tables(expr, layout)
        if len(terms) <= 1:
            return _single_product(terms, layout, qs, ks)
        if _few_pairs(terms, len(qs), len(ks)):
            for rows, cols, counts in _union_pairs(terms, layout):
                visits += np.bincount(rows, minlength=len(qs))
                full += np.bincount(rows[counts == qs[rows] * ks[cols]], minlength=len(qs))
                pairs += _sums_by_row(rows, counts, len(qs))
            return TileStats(qs, ks, visits, full, pairs)
    for rows, block in pair_count_chunks(expr, layout):
        visits[rows] = np.count_nonzero(block, axis=1)
        full[rows] = np.count_nonzero(block == np.multiply.outer(qs[rows], ks), axis=1)
        pairs[rows] = block.sum(axis=1)
    return TileStats(qs, ks, visits, full, pairs)


def _dim_stats(table: BandTable, q: np.ndarray, k: np.ndarray, tk: int):
    """Per stored entry of one dimension's table: (visited, full, full and in a whole key tile)."""
    rows = table.rows()
    cols = table.cols(rows)
    k_size = k[:, 1] - k[:, 0]
    full = table.values == (q[:, 1] - q[:, 0])[rows] * k_size[cols]
    whole = k_size == tk  # the kernel's fully-seen box stops before a ragged key tile
    return table.values != 0, full, full & whole[cols]


def _single_product(terms, layout: TileLayout, qs, ks) -> TileStats:
    """One product term: every statistic is a product of per-dimension statistics (GNA's closed form)."""
    if not terms:
        zero = np.zeros(len(qs), dtype=np.int64)
        return TileStats(qs, ks, zero, zero.copy(), zero.copy())
    (sign, tables), = terms
    assert sign == 1
    visits = full = pairs = kernel_full = np.ones(1, dtype=np.int64)
    for table, q, k, tk in zip(tables, layout.q_dims, layout.k_dims, layout.kv_tile):
        seen, full_d, kernel = _dim_stats(table, q, k, tk)
        visits = np.multiply.outer(visits, table.row_sums(seen)).reshape(-1)
        full = np.multiply.outer(full, table.row_sums(full_d)).reshape(-1)
        kernel_full = np.multiply.outer(kernel_full, table.row_sums(kernel)).reshape(-1)
        pairs = np.multiply.outer(pairs, table.row_sums()).reshape(-1)
    return TileStats(qs, ks, visits, full, pairs, kernel_full)


def _few_pairs(terms, nq: int, nk: int) -> bool:
    """Whether listing every term's nonzero tile pairs is cheaper than the dense [NQ, NK] map."""
    listed = sum(math.prod(t.nnz for t in tables) for _, tables in terms)
    return listed * SPARSE_RATIO < nq * nk


def _union_pairs(terms, layout: TileLayout) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(query tile, key tile, attended pairs) of every visited tile pair of a union, row-major, exactly.

    Each term's nonzero pairs are the Kronecker product of its per-dimension nonzero entries; the
    signed counts of all terms are summed per pair (sorted keys). Chunks of dimension-0 rows bound
    the entries listed at once.
    """
    q_counts = [len(iv) for iv in layout.q_dims]
    k_counts = [len(iv) for iv in layout.k_dims]
    nk = math.prod(k_counts)
    listed = [(sign, [t.nonzero() for t in tables]) for sign, tables in terms]
    per_row0 = np.zeros(q_counts[0], dtype=np.int64)
    for _, parts in listed:
        per_row0 += np.bincount(parts[0][0], minlength=q_counts[0]) * math.prod(len(p[0]) for p in parts[1:])
    done = np.concatenate([[0], np.cumsum(per_row0)])  # entries listed before each row
    r0 = 0
    while r0 < q_counts[0]:
        r1 = int(np.searchsorted(done, done[r0] + CHUNK_ELEMENTS, side="right")) - 1  # rows that fit
        r1 = min(max(r1, r0 + 1), q_counts[0])
        keys, values = [], []
        for sign, parts in listed:
            a, b = np.searchsorted(parts[0][0], [r0, r1])
            rows, cols, vals = (x[a:b] for x in parts[0])
            for (r, c, v), nq_d, nk_d in zip(parts[1:], q_counts[1:], k_counts[1:]):
                rows = (rows[:, None] * nq_d + r[None, :]).reshape(-1)
                cols = (cols[:, None] * nk_d + c[None, :]).reshape(-1)
                vals = (vals[:, None] * v[None, :]).reshape(-1)
            keys.append(rows * nk + cols)
            values.append(sign * vals)
        key = np.concatenate(keys)
        order = np.argsort(key, kind="stable")
        key, value = key[order], np.concatenate(values)[order]
        starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if len(key) else np.zeros(0, np.int64)
        counts = np.add.reduceat(value, starts) if len(key) else value
        key = key[starts]
        keep = counts != 0
        yield key[keep] // nk, key[keep] % nk, counts[keep]
        r0 = r1


def _sums_by_row(rows: np.ndarray, values: np.ndarray, nq: int) -> np.ndarray:
    """[nq] exact int64 sums of `values` per row (`rows` sorted)."""
    acc = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return acc[np.searchsorted(rows, np.arange(1, nq + 1), side="left")] - \
        acc[np.searchsorted(rows, np.arange(nq), side="left")]


def key_tile_visits(expr: ir.MaskExpr, shape, q_tile, kv_tile, permute: bool = True) -> np.ndarray:
    """[NK] query tiles visiting each key tile: the transposed schedule a dK/dV backward kernel runs."""
    return key_tile_stats(expr, shape, q_tile, kv_tile, permute)[0]


def key_tile_stats(expr: ir.MaskExpr, shape, q_tile, kv_tile, permute: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """([NK] query tiles visiting each key tile, [NK] of them seeing all of it): the dK/dV kernel's walk.

    A ragged key tile is never full, as in the forward: the kernel's fully-seen box is built from
    whole key tiles (`maskdsl.analysis.transpose.query_tile_ranges`). One product term: outer products of
    per-dimension column counts, as for the query side; a union: column counts of the exact
    tile pairs (listed or in dense chunks, as `tile_stats`).
    """
    layout = layout_for(expr, tuple(shape), q_tile, kv_tile, permute)
    qs, ks = layout.sizes()
    visits = np.zeros(len(ks), dtype=np.int64)
    full = np.zeros(len(ks), dtype=np.int64)
    whole = ks == math.prod(layout.kv_tile)
    if layout.permute:
        terms = _dim_tables(expr, layout)
        if len(terms) == 1:
            visits = full = np.ones(1, dtype=np.int64)
            for table, q, k, tk in zip(terms[0][1], layout.q_dims, layout.k_dims, layout.kv_tile):
                seen, _, kernel = _dim_stats(table, q, k, tk)
                visits = np.multiply.outer(visits, table.col_sums(seen)).reshape(-1)
                full = np.multiply.outer(full, table.col_sums(kernel)).reshape(-1)
            return visits, full
        if terms and _few_pairs(terms, len(qs), len(ks)):
            for rows, cols, counts in _union_pairs(terms, layout):
                visits += np.bincount(cols, minlength=len(ks))
                full += np.bincount(cols[(counts == qs[rows] * ks[cols]) & whole[cols]], minlength=len(ks))
            return visits, full
    for rows, block in pair_count_chunks(expr, layout):
        visits += np.count_nonzero(block, axis=0)
        full += np.count_nonzero(block == np.multiply.outer(qs[rows], ks), axis=0) * whole
    return visits, full
