"""Per-dimension tile count tables stored as one window of key tiles per query tile (a band).

A query tile of a windowed, strided or blocked relation attends a few key tiles in a row: the
dense [query tiles, key tiles] table is almost all zeros, and building it made a 1-D grid cost
O(tiles²) (a million tokens: 8k x 16k entries per table). Every relation is bounded per query
by its first and last key (`Rel1D.key_span`), so a query tile's keys lie between the smallest
first and the largest last of its queries: the key tiles there are the only ones its row can
hold. `band_table` counts only those, exactly (the same closed form as `Rel1D.prefix_counts`),
and `BandTable` keeps each row's window, so a table costs O(visited band), and a genuinely dense
relation (causal, a sink's rows) costs what its windows hold, never more than the dense table.

Everything the simulator reads from a table is a per-row or per-column reduction, an elementwise
meet of two tables (`meet`), or a block sum onto coarser tiles (`block_sum`): all of them work on
the windows' flat values without densifying. `dense` is there for small maps and the union path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from maskdsl.analysis.counts import Rel1D

GROUP_BLOCK = 1 << 20  # (dilation group, edge) pairs searched at once
MAX_BAND = 1 << 22  # tile pairs one dimension's table may hold: at the bound about 10 s and 0.5 GB per table


class TooManyTiles(ValueError):
    """A tile table the simulator would need is larger than MAX_BAND (docs/LIMITS.md): refused, not built."""
KEEP_DENSE = 1 << 16  # dense copies of at most this many entries are kept with their band


@dataclass(frozen=True, eq=False)
class BandTable:
    """An [nq, nk] table holding, for row r, columns start[r] .. start[r] + width(r) - 1 (zeros elsewhere)."""

    nq: int
    nk: int
    start: np.ndarray  # [nq] first column held by each row (0 where the row holds none)
    ptr: np.ndarray  # [nq + 1] row r's values are values[ptr[r]:ptr[r + 1]]
    values: np.ndarray  # flat, row after row
    _whole: np.ndarray | None = field(default=None, init=False, repr=False)  # see whole()

    @property
    def shape(self) -> tuple[int, int]:
        return self.nq, self.nk

    @property
    def size(self) -> int:
        """Entries stored: what a cache budget counts (the dense table would hold nq * nk)."""
        return len(self.values)

    @property
    def width(self) -> np.ndarray:
        return np.diff(self.ptr)

    def rows(self) -> np.ndarray:
        """Row of every stored entry."""
        return np.repeat(np.arange(self.nq, dtype=np.int64), self.width)

    def cols(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Column of every stored entry."""
        rows = self.rows() if rows is None else rows
        return self.start[rows] + np.arange(len(self.values), dtype=np.int64) - self.ptr[rows]

    @cached_property
    def nnz(self) -> int:
        """Nonzero entries (kept: deciding how to count a union asks for it again and again)."""
        return int(np.count_nonzero(self.values))

    def whole(self) -> np.ndarray:
        """The dense table, read-only; kept when it is small (a multi-dimensional union's inner
        dimensions, asked for by every walk of one simulation), else built anew."""
        if self._whole is not None:
            return self._whole
        out = self.dense()
        out.flags.writeable = False
        if out.size <= KEEP_DENSE:
            object.__setattr__(self, "_whole", out)
        return out

    def dense(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """Rows r0..r1 as a new dense [rows, nk] array."""
        r1 = self.nq if r1 is None else r1
        out = np.zeros((r1 - r0, self.nk), dtype=self.values.dtype)
        a, b = self.ptr[r0], self.ptr[r1]
        rows = np.repeat(np.arange(r0, r1, dtype=np.int64), self.width[r0:r1])
        cols = self.start[rows] + np.arange(a, b, dtype=np.int64) - self.ptr[rows]
        out[rows - r0, cols] = self.values[a:b]
        return out

    def row_sums(self, values: np.ndarray | None = None) -> np.ndarray:
        """[nq] sum of each row (of `values`, one per stored entry, if given), exact in int64."""
        values = self.values if values is None else values
        acc = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
        return acc[self.ptr[1:]] - acc[self.ptr[:-1]]

    def col_sums(self, values: np.ndarray | None = None) -> np.ndarray:
        """[nk] how many stored entries of each column are true (of `values` if given, else nonzero)."""
        values = self.values != 0 if values is None else values
        return np.bincount(self.cols()[values], minlength=self.nk).astype(np.int64)

    def with_values(self, values: np.ndarray) -> "BandTable":
        return BandTable(self.nq, self.nk, self.start, self.ptr, values)

    def nonzero(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, values) of the nonzero entries, sorted by row then column."""
        rows = self.rows()
        keep = self.values != 0
        return rows[keep], self.cols(rows)[keep], self.values[keep]

    def meet(self, other: "BandTable") -> "BandTable":
        """Elementwise product (`&` for booleans) over the two windows' overlap."""
        start = np.maximum(self.start, other.start)
        stop = np.minimum(self.start + self.width, other.start + other.width)
        width = np.maximum(stop - start, 0)
        ptr = np.concatenate([[0], np.cumsum(width)])
        rows = np.repeat(np.arange(self.nq, dtype=np.int64), width)
        col = start[rows] + np.arange(ptr[-1], dtype=np.int64) - ptr[rows]
        a = self.values[self.ptr[rows] + col - self.start[rows]]
        b = other.values[other.ptr[rows] + col - other.start[rows]]
        values = a & b if a.dtype == bool else a * b
        return BandTable(self.nq, self.nk, np.where(width > 0, start, 0), ptr, values)

    def block_sum(self, row_starts: np.ndarray, col_starts: np.ndarray) -> "BandTable":
        """The table of coarser tiles: row R sums rows row_starts[R].. (`np.add.reduceat` semantics), same for columns."""
        row_of = np.repeat(np.arange(len(row_starts)), np.diff(np.append(row_starts, self.nq)))
        col_of = np.repeat(np.arange(len(col_starts)), np.diff(np.append(col_starts, self.nk)))
        nq, nk = len(row_starts), len(col_starts)
        held = self.width > 0
        lo = np.full(nq, nk, dtype=np.int64)
        hi = np.full(nq, -1, dtype=np.int64)
        np.minimum.at(lo, row_of[held], col_of[self.start[held]])
        np.maximum.at(hi, row_of[held], col_of[self.start[held] + self.width[held] - 1])
        width = np.maximum(hi - lo + 1, 0)
        ptr = np.concatenate([[0], np.cumsum(width)])
        rows = self.rows()
        big = row_of[rows]
        slot = ptr[big] + col_of[self.cols(rows)] - lo[big]
        values = np.zeros(ptr[-1], dtype=self.values.dtype)
        np.add.at(values, slot, self.values)
        return BandTable(nq, nk, np.where(width > 0, lo, 0), ptr, values)


def band_table(rel: Rel1D, q: np.ndarray, k: np.ndarray) -> BandTable:
    """[query tiles, key tiles] attended pairs of one dimension, counted only inside each row's key window.

    `q`, `k`: [T, 2] tile intervals that cover [0, n) in order (`simulator.tiles.dim_intervals`).
    For each query tile the window is the key tiles between the smallest first key and the largest
    last key of its queries; inside it each entry is a difference of F(e), the attended pairs with
    key below edge e, summed over the tile's queries. F is `Rel1D.prefix_counts`'s closed form
    (rows sorted by (tile, dilation group, lo) and by (tile, group, hi + 1), three prefix sums found
    by binary search), asked at the window's edges only: O(n log n + band x dilation x log n).
    """
    n = rel.n
    nq, nk = len(q), len(k)
    if nq == 0 or nk == 0:
        return BandTable(nq, nk, np.zeros(nq, np.int64), np.zeros(nq + 1, np.int64), np.zeros(0, np.int64))
    bounds = np.append(q[:, 0], n).astype(np.int64)
    edges = np.append(k[:, 0], n).astype(np.int64)
    first, last = rel.key_span()
    kmin = np.minimum.reduceat(first, bounds[:-1])
    kmax = np.maximum.reduceat(last, bounds[:-1])
    c0 = np.clip(np.searchsorted(edges, kmin, side="right") - 1, 0, nk - 1)
    c1 = np.clip(np.searchsorted(edges, kmax, side="right") - 1, 0, nk - 1)
    width = np.where(kmin <= kmax, c1 - c0 + 1, 0)
    held = int(width.sum())
    if held > MAX_BAND:  # known before anything of that size is allocated
        raise TooManyTiles(f"{held:,} (query tile, key tile) pairs to count along one dimension ({nq:,} x {nk:,} "
                           f"tiles of {n:,} tokens), more than the simulator's {MAX_BAND:,}; simulate larger "
                           "tiles, or a shorter sequence of the same mask (docs/LIMITS.md)")
    start = np.where(width > 0, c0, 0)
    ptr = np.concatenate([[0], np.cumsum(width)])

    # F at the window's edges c0 .. c1 + 1 of every held row (width + 1 values each)
    npts = np.where(width > 0, width + 1, 0)
    seg = np.repeat(np.arange(nq, dtype=np.int64), npts)
    pstart = np.concatenate([[0], np.cumsum(npts)])
    e = edges[start[seg] + np.arange(pstart[-1], dtype=np.int64) - pstart[seg]]
    f = _pairs_below(rel, bounds, seg, e)
    inside = seg[1:] == seg[:-1]  # consecutive edges of one row
    values = (f[1:] - f[:-1])[inside]
    return BandTable(nq, nk, start, ptr, values)


def _pairs_below(rel: Rel1D, bounds: np.ndarray, seg: np.ndarray, e: np.ndarray) -> np.ndarray:
    """For each (query tile seg[x], edge e[x]): attended pairs with a query of the tile and a key below e.

    For a non-empty row, |[lo, hi] ∩ [0, t)| = sum_{lo<t}(hi+1-lo) - sum_{hi+1>t}(hi+1-t) + sum_{lo>=t}(hi+1-t),
    t the edge in the row's group coordinates; each sum is a prefix sum over the tile's rows of one
    group, sorted by lo or by hi + 1 (as in `Rel1D.prefix_counts`).
    """
    n, d = rel.n, rel.dilation
    tile = np.repeat(np.arange(len(bounds) - 1, dtype=np.int64), np.diff(bounds))
    big, key_lo, cum_w, cum_h, key_hi, cum_h2 = rel.sorted_sums(tile * d + np.arange(n, dtype=np.int64) % d
                                                                if d > 1 else tile)
    # both orders are by bucket first: a bucket's rows are the same run in each
    runs = np.searchsorted(key_lo, np.arange((len(bounds) - 1) * d + 1, dtype=np.int64) * big)
    out = np.zeros(len(e), dtype=np.int64)
    step = max(1, GROUP_BLOCK // max(1, len(e)))  # dilation groups evaluated together, memory bounded
    for g0 in range(0, d, step):
        g = np.arange(g0, min(d, g0 + step), dtype=np.int64)[:, None]
        t = np.clip((e - g + d - 1) // d, 0, None)
        b = seg * d + g
        start, stop = runs[b], runs[b + 1]
        query = b * big + t
        p = np.searchsorted(key_lo, query)  # rows with lo < t before p
        ph = np.searchsorted(key_hi, query, side="right")  # rows with hi + 1 > t from ph on
        below = cum_w[p] - cum_w[start]
        past_lo = (cum_h[stop] - cum_h[p]) - t * (stop - p)
        past_hi = (cum_h2[stop] - cum_h2[ph]) - t * (stop - ph)
        out += (below - past_hi + past_lo).sum(axis=0)
    return out
