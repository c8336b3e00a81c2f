"""`suggest`: which window / stride near the user's is perfectly block-sparse for this tile?

GNA's advice: with tile-major tiles, choose the stride as a multiple of the query tile and the
window so that every window starts on a key-tile edge and spans whole key tiles; then no visited
tile needs the mask, and the upper bound equals the FLOP-ideal speedup.

For a neighborhood the tile schedule is a product over dimensions, so a config is perfectly
block-sparse iff every dimension is (visited implies full in each dimension). The search is
therefore per dimension, on a 1-D problem of that dimension's extent (same dilation and causal
flag), over windows near the user's that are multiples of the key-tile extent (plus the user's
window and the widest allowed) and strides that are multiples of the query-tile extent (plus the
user's stride and 1). Candidates are ranked by how far they move: (|dw| + |ds|) / w, summed over
dimensions; the best combinations are then checked by a full `simulate`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import product

from maskdsl.spec import ir
from maskdsl.simulator.counting import tile_stats
from maskdsl.simulator.simulation import SimResult, simulate
from maskdsl.simulator.tiles import check_tile
from maskdsl.lang.parser import as_spec

PER_DIM = 3  # best per-dimension choices combined
NEAR = 2  # multiples of the tile considered on each side of the user's value


def suggest(spec, mask: str, q_tile, kv_tile=None, limit: int = 5, gpu: str | None = None,
            costs=None) -> list[tuple[ir.Neighborhood, SimResult]]:
    """Perfectly block-sparse neighborhoods near `mask`'s, nearest first (empty if there is none)."""
    spec = as_spec(spec)
    mdef = spec.mask(mask)
    expr, shape = mdef.expr, mdef.layout.shape
    if not isinstance(expr, ir.Neighborhood):
        raise ValueError(f"suggest works on a mask that is one neighborhood; {mask!r} is {expr.fmt()}; "
                         "hint: suggest on its neighborhood part, then combine")
    q_tile = check_tile(q_tile, shape, "q_tile")
    kv_tile = q_tile if kv_tile is None else check_tile(kv_tile, shape, "kv_tile")
    per_dim = [_dim_choices(n, expr.window[d], expr.dilation[d], expr.stride[d], expr.causal[d], q_tile[d],
                            kv_tile[d]) for d, n in enumerate(shape)]
    if any(not c for c in per_dim):
        return []
    combos = sorted(product(*per_dim), key=lambda cs: (sum(c[0] for c in cs), -math.prod(c[3] for c in cs)))
    out = []
    for combo in combos[:limit]:
        nb = ir.Neighborhood(tuple(c[1] for c in combo), expr.dilation, tuple(c[2] for c in combo), expr.causal)
        candidate = replace(spec, masks=tuple(replace(m, expr=nb) if m.name == mask else m for m in spec.masks))
        result = simulate(candidate, mask, q_tile, kv_tile, permute=True, gpu=gpu, costs=costs)
        if result.perfectly_block_sparse:  # the per-dimension argument guarantees it; checked anyway
            out.append((nb, result))
    return out


def _dim_choices(n, w0, dil, s0, causal, tq, tk):
    """(distance, window, stride, 1-D upper bound) of perfectly block-sparse choices, best first."""
    wmax = n // dil
    windows = {w0, wmax} | {m * tk for m in range(max(1, w0 // tk - NEAR), w0 // tk + NEAR + 2)}
    windows = sorted(w for w in windows if 1 <= w <= wmax)
    found = []
    for w in windows:
        strides = {1, min(s0, w)} | {m * tq for m in range(max(1, s0 // tq - NEAR), s0 // tq + NEAR + 2)}
        for s in sorted(x for x in strides if 1 <= x <= w):
            stats = tile_stats(ir.Neighborhood((w,), (dil,), (s,), (causal,)), (n,), (tq,), (tk,), True)
            visited = int(stats.visits.sum())
            if visited and visited == int(stats.full.sum()):
                bound = stats.q_tiles * stats.k_tiles / visited
                found.append(((abs(w - w0) + abs(s - s0)) / w0, w, s, bound))
    found.sort(key=lambda c: (c[0], -c[3]))
    return found[:PER_DIM]
