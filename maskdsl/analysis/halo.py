"""Which key rows a rank needs from each other rank when a grid is sharded along its outermost dimension.

Context parallelism for local masks exchanges only halos: each rank holds a slab of frames (a range
of the outermost coordinate, so a contiguous range of row-major token rows) and needs, from each
other rank, just the key rows its queries attend. The analysis already has, per product term and
dimension, the exact key bounds of every query coordinate; the keys a slab's queries attend are the
product over dimensions of the per-dimension key sets, so the first and last needed row of every
(rank, source) pair follow in closed form, O(extent) per dimension, with no [L, L] anywhere.

`needed_frames` is the per-chunk form the exchange plan (`maskdsl.analysis.shard_plan`) is built from; the
exchange itself is `maskdsl.distributed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from maskdsl.spec import ir
from maskdsl.analysis.counts import Rel1D, num_products


@dataclass(frozen=True)
class HaloPlan:
    """`ranges[r][s]`: (first, last) flat key rows of rank s's slab that rank r's queries attend, or None."""

    shape: tuple[int, ...]
    bounds: tuple[int, ...]  # frame boundaries along dimension 0: rank r holds frames [bounds[r], bounds[r+1])
    ranges: tuple[tuple[tuple[int, int] | None, ...], ...]

    @property
    def ranks(self) -> int:
        return len(self.bounds) - 1

    def rows(self, r: int) -> tuple[int, int]:
        """Rank r's own token rows [first, end)."""
        inner = math.prod(self.shape[1:])
        return self.bounds[r] * inner, self.bounds[r + 1] * inner

    def halo_rows(self, r: int) -> int:
        """Key rows rank r receives from the others (each source's needed range, whole)."""
        return sum(last - first + 1 for s, rng in enumerate(self.ranges[r]) if s != r and rng
                   for first, last in [rng])

    def halo_bytes(self, r: int, head_dim: int, kv_heads: int, batch: int = 1, dtype_bytes: int = 2) -> int:
        """Bytes rank r receives for its forward: K and V rows of every kv head."""
        return 2 * self.halo_rows(r) * head_dim * kv_heads * batch * dtype_bytes


def even_bounds(n0: int, ranks: int) -> tuple[int, ...]:
    """Frame boundaries of `ranks` slabs as equal as the extent allows (the first ranks take the extra frame)."""
    if not 1 <= ranks <= n0:
        raise ValueError(f"cannot shard {n0} frames over {ranks} ranks; use 1 to {n0} ranks")
    base, extra = divmod(n0, ranks)
    out = [0]
    for r in range(ranks):
        out.append(out[-1] + base + (r < extra))
    return tuple(out)


def _key_set(rel: Rel1D, queries: slice | None = None) -> np.ndarray:
    """Boolean [n]: the keys of this dimension that the given query coordinates (all if None) attend."""
    n, d = rel.n, rel.dilation
    i = np.arange(n, dtype=np.int64)
    pick = np.zeros(n, dtype=bool)
    pick[queries if queries is not None else slice(None)] = True
    pick &= rel.lo <= rel.hi
    keys = np.zeros(n, dtype=bool)
    if not pick.any():
        return keys
    # per dilation group: a difference array over group coordinates marks the union of [lo, hi]
    for g in range(d):
        rows = pick & (i % d == g)
        if not rows.any():
            continue
        glen = (n - g + d - 1) // d
        diff = np.zeros(glen + 1, dtype=np.int64)
        np.add.at(diff, rel.lo[rows], 1)
        np.add.at(diff, rel.hi[rows] + 1, -1)
        keys[g + d * np.nonzero(np.cumsum(diff[:glen]) > 0)[0]] = True
    return keys


@lru_cache(maxsize=8)
def _live_dim0(expr: ir.MaskExpr, shape: tuple[int, ...]) -> tuple[Rel1D, ...]:
    """Dimension 0's relation of every product term whose inner dimensions attend some key: a shard plan
    asks once per chunk and per segment, so the terms are evaluated once."""
    return tuple(term.num[0] for term in num_products(expr, shape)
                 if all(_key_set(rel).any() for rel in term.num[1:]))


def needed_frames(expr: ir.MaskExpr, shape: tuple[int, ...], frames: tuple[int, int]) -> list[int]:
    """The key frames (dimension-0 coordinates) that the queries of frames [first, end) attend, exactly.

    A chunk holds every inner coordinate, so a term's keys are the frames its dimension-0 rule gives the
    chunk's frames, provided every inner dimension has some attended key at all.
    """
    if ir.is_dynamic(expr):
        raise ValueError("top-k masks pick keys from the data: every frame may be needed")
    need = np.zeros(int(shape[0]), dtype=bool)
    for rel in _live_dim0(expr, tuple(int(n) for n in shape)):
        need |= _key_set(rel, slice(frames[0], frames[1]))
    return [int(f) for f in np.nonzero(need)[0]]


def query_frames(expr: ir.MaskExpr, shape: tuple[int, ...], keys: tuple[int, int],
                 within: tuple[int, int]) -> tuple[int, int] | None:
    """The first and last+1 query frame of [within) that attends some key of frames [keys), exactly (None
    if none does): a segment of keys then runs only the query tiles that reach it."""
    ka, kb = keys
    hit = np.zeros(int(shape[0]), dtype=bool)
    for rel in _live_dim0(expr, tuple(int(n) for n in shape)):
        d = rel.dilation
        g = np.arange(rel.n, dtype=np.int64) % d
        # group coordinates j with ka <= g + d*j < kb, against the row's [lo, hi]
        first = -((g - ka) // d)  # ceil((ka - g) / d)
        last = (kb - 1 - g) // d
        hit |= (np.maximum(first, rel.lo) <= np.minimum(last, rel.hi)) & (rel.lo <= rel.hi)
    rows = np.nonzero(hit[within[0]:within[1]])[0]
    return None if len(rows) == 0 else (within[0] + int(rows[0]), within[0] + int(rows[-1]) + 1)


def halo_plan(expr: ir.MaskExpr, shape: tuple[int, ...], bounds: tuple[int, ...]) -> HaloPlan:
    """The exact first and last key row every rank needs from every rank (itself included).

    Exact for each product term (its attended keys are a product of per-dimension key sets); a union
    takes the hull of its terms' ranges, which is what one contiguous transfer per source sends.
    """
    shape = tuple(int(n) for n in shape)
    if bounds[0] != 0 or bounds[-1] != shape[0] or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"bounds {bounds} must rise strictly from 0 to the outermost extent {shape[0]}")
    if ir.is_dynamic(expr):
        raise ValueError("top-k masks pick keys from the data: their halo is the whole sequence (ring pass)")
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    terms = num_products(expr, shape)
    inner_sets = [[_key_set(rel) for rel in term.num[1:]] for term in terms]
    ranks = len(bounds) - 1
    ranges = []
    for r in range(ranks):
        row = []
        first_sets = [_key_set(term.num[0], slice(bounds[r], bounds[r + 1])) for term in terms]
        for s in range(ranks):
            lo, hi = None, None
            for k0, inner in zip(first_sets, inner_sets):
                frames = np.nonzero(k0[bounds[s]:bounds[s + 1]])[0]
                if len(frames) == 0 or any(not k.any() for k in inner):
                    continue
                first = (bounds[s] + frames[0]) * strides[0] + sum(
                    int(np.argmax(k)) * st for k, st in zip(inner, strides[1:]))
                last = (bounds[s] + frames[-1]) * strides[0] + sum(
                    int(len(k) - 1 - np.argmax(k[::-1])) * st for k, st in zip(inner, strides[1:]))
                lo = first if lo is None else min(lo, first)
                hi = last if hi is None else max(hi, last)
            row.append(None if lo is None else (int(lo), int(hi)))
        ranges.append(tuple(row))
    return HaloPlan(shape, tuple(bounds), tuple(ranges))
