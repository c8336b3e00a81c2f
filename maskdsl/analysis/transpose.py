"""Per-dimension tile schedules in both directions: which key tiles a query tile visits, and which
query tiles visit a key tile (the *transposed* schedule a dK/dV kernel walks).

Both come from the exact integer bounds of every query row (`maskdsl.analysis.intervals.evaluate`), in
dilation-group coordinates, at O(extent) cost per dimension: nothing is ever [L, L] and no block
mask is built. A product term's tile pair is visited (full) when it is in every dimension, so
per-dimension ranges are all a kernel needs.

Why the transposed ranges are contiguous: lo(i) and hi(i) are non-decreasing in i for every
primitive (maskdsl.analysis.intervals states it), so a query tile's first/last visited key tile and its
first/last fully seen key tile are non-decreasing in the tile index too; then the query tiles
whose visited range holds key tile t are a contiguous run, and so are the ones that see all of it.
This module checks that instead of trusting it: where a run is not contiguous it falls back to the
bounding range (visited) or to an empty full range, which only costs predicate work, never
correctness.
"""

from __future__ import annotations

import numpy as np

EMPTY = (0, -1, 0, -1)


def query_tile_ranges(lo: np.ndarray, hi: np.ndarray, dilation: int, q_tile: int, kv_tile: int) -> np.ndarray:
    """[dilation * q_tiles_per_group, 4]: per query tile (group-major: g * tiles_per_group + local) the
    key tiles it visits [a, b] and the ones every row of it sees entirely [fa, fb] (local indices
    within the same dilation group; (0, -1) when none).

    `lo`, `hi` are per original coordinate, in group coordinates, as `intervals.evaluate` returns them.
    """
    rows = _group_rows(lo, hi, dilation, q_tile)
    out = []
    for glo, ghi, valid in rows:
        active = valid & (glo <= ghi)
        big = np.iinfo(np.int64).max // 4
        any_active = active.any(1)
        a = np.where(active, glo, big).min(1) // kv_tile
        b = np.where(active, ghi, -1).max(1) // kv_tile
        every = any_active & (active | ~valid).all(1)
        maxlo = np.where(valid, glo, -big).max(1)
        minhi = np.where(valid, ghi, big).min(1)
        fa = np.maximum(-(-maxlo // kv_tile), a)
        fb = np.minimum((minhi + 1) // kv_tile - 1, b)
        full = every & (fa <= fb)
        tab = np.tile(np.array(EMPTY, dtype=np.int64), (len(a), 1))
        tab[any_active, 0], tab[any_active, 1] = a[any_active], b[any_active]
        tab[full, 2], tab[full, 3] = fa[full], fb[full]
        out.append(tab)
    return np.concatenate(out)


def key_tile_ranges(by_query: np.ndarray, dilation: int, kv_tiles_per_group: int) -> np.ndarray:
    """[dilation * kv_tiles_per_group, 4]: per key tile the query tiles that visit it [qa, qb] and the
    ones that see all of it [fa, fb] (local indices in the group), from `query_tile_ranges`' table.

    Every (query tile, key tile) pair that `by_query` visits lies in [qa, qb]; pairs in [fa, fb] are
    full there; the bounding range may add pairs `by_query` does not visit (the kernel's predicate
    gives them nothing), never drop one.
    """
    q_per_group = len(by_query) // dilation
    out = []
    for g in range(dilation):
        tab = by_query[g * q_per_group:(g + 1) * q_per_group]
        t = np.arange(kv_tiles_per_group)
        qa, qb = _runs(tab[:, 0], tab[:, 1], t, bounding=True)
        fa, fb = _runs(tab[:, 2], tab[:, 3], t, bounding=False)
        res = np.tile(np.array(EMPTY, dtype=np.int64), (kv_tiles_per_group, 1))
        seen = qa <= qb
        res[seen, 0], res[seen, 1] = qa[seen], qb[seen]
        full = fa <= fb
        res[full, 2], res[full, 3] = fa[full], fb[full]
        out.append(res)
    return np.concatenate(out)


def _runs(first: np.ndarray, last: np.ndarray, t: np.ndarray, bounding: bool) -> tuple[np.ndarray, np.ndarray]:
    """For each t: the first and last tile u with first[u] <= t <= last[u] (u with first > last take no part).

    With first/last non-decreasing over the taking-part tiles those u form one run, found by binary
    search. Otherwise: the bounding range when `bounding`, else the range only where it is a run.
    """
    part = np.nonzero(first <= last)[0]
    if len(part) == 0:
        return np.zeros(len(t), np.int64), np.full(len(t), -1, np.int64)
    f, l_ = first[part], last[part]
    if np.all(np.diff(f) >= 0) and np.all(np.diff(l_) >= 0):
        p_lo = np.searchsorted(l_, t, side="left")  # first with last >= t
        p_hi = np.searchsorted(f, t, side="right")  # past the last with first <= t
        ok = p_lo < p_hi
        lo_u = part[np.minimum(p_lo, len(part) - 1)]
        hi_u = part[np.maximum(p_hi - 1, 0)]
        if not bounding:  # the taking-part tiles between must be consecutive: a gap is not full
            ok &= (hi_u - lo_u) == (p_hi - 1 - p_lo)
        return np.where(ok, lo_u, 0), np.where(ok, hi_u, -1)
    hits = (f[:, None] <= t[None, :]) & (l_[:, None] >= t[None, :])  # [tiles in one group, tiles]: small
    any_hit = hits.any(0)
    lo_u = part[np.argmax(hits, axis=0)]
    hi_u = part[len(part) - 1 - np.argmax(hits[::-1], axis=0)]
    if not bounding:
        any_hit &= (hi_u - lo_u + 1) == hits.sum(0)  # every tile between hits (hits are distinct tiles)
    return np.where(any_hit, lo_u, 0), np.where(any_hit, hi_u, -1)


def _group_rows(lo, hi, dilation, tile):
    """Per dilation group: lo, hi and validity padded to whole tiles, shaped [tiles_per_group, tile]."""
    n = len(lo)
    glen_max = -(-n // dilation)
    per_group = -(-glen_max // tile)
    out = []
    for g in range(dilation):
        glo, ghi = lo[g::dilation], hi[g::dilation]
        pad = per_group * tile - len(glo)
        valid = np.concatenate([np.ones(len(glo), bool), np.zeros(pad, bool)])
        glo = np.concatenate([glo, np.zeros(pad, np.int64)])
        ghi = np.concatenate([ghi, np.full(pad, -1, np.int64)])
        out.append((glo.reshape(per_group, tile), ghi.reshape(per_group, tile), valid.reshape(per_group, tile)))
    return out
