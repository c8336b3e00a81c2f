"""Brute force for the simulator's tests: tile membership and tile-pair counts from the reference mask.

Every expected number is computed independently of the simulator: tile membership of each token from
the layout rules written out directly (not from maskdsl.simulator.tiles), counts by summing
`maskdsl.reference_mask` over tile pairs. Also the hypothesis strategies that draw masks and tiles.
"""

import math

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import maskdsl
from maskdsl.spec import ir
from maskdsl.analysis.counts import layout_dilation, products
from maskdsl.simulator import simulate
from maskdsl.simulator.counting import tile_pair_counts


def make_spec(shape, expr, heads=None):
    lay = ir.Layout("g", tuple(shape))
    atts = (ir.Attention("a", "m", heads, heads, 64, "bf16", 1),) if heads else ()
    return ir.Spec((lay,), (ir.MaskDef("m", expr, lay),), atts)


def token_tiles(shape, tile, dilation, permute):
    """Tile index of every row-major token, from the layout rules (docs/SIMULATOR.md) written out."""
    total = math.prod(shape)
    if not permute:
        return np.arange(total) // math.prod(tile), None
    flat = np.arange(total)
    idx = np.zeros(total, dtype=np.int64)
    sizes = np.ones(1, dtype=np.int64)
    for axis, (n, t, d) in enumerate(zip(shape, tile, dilation)):
        c = (flat // math.prod(shape[axis + 1:])) % n
        group_len = [len(range(g, n, d)) for g in range(d)]
        tiles_per_group = [-(-gl // t) for gl in group_len]
        first = np.cumsum([0] + tiles_per_group)
        idx = idx * first[-1] + first[c % d] + (c // d) // t
        dim_sizes = [min(t, gl - k * t) for gl, tg in zip(group_len, tiles_per_group) for k in range(tg)]
        sizes = np.multiply.outer(sizes, dim_sizes).reshape(-1)
    return idx, sizes


def brute_counts(spec, q_tile, kv_tile, permute):
    """[NQ, NK] attended pairs per tile pair, and the tile sizes, by summing the reference mask."""
    m = spec.mask("m")
    shape = m.layout.shape
    dense = maskdsl.reference_mask(spec, "m").numpy().astype(np.int64)
    # the layout convention shared with the kernels: each dimension's dilation is layout_dilation's
    dil = layout_dilation(products(m.expr, shape), len(shape)) if permute else None
    qi, qs = token_tiles(shape, q_tile, dil, permute)
    ki, ks = token_tiles(shape, kv_tile, dil, permute)
    nq, nk = qi.max() + 1, ki.max() + 1
    counts = np.zeros((nq, nk), dtype=np.int64)
    np.add.at(counts, (qi[:, None], ki[None, :]), dense)
    qs = np.bincount(qi) if qs is None else qs
    ks = np.bincount(ki) if ks is None else ks
    return counts, qs, ks


def check_against_brute(spec, q_tile, kv_tile, permute):
    r = simulate(spec, "m", q_tile, kv_tile, permute=permute)
    counts, qs, ks = brute_counts(spec, q_tile, kv_tile, permute)
    visited = counts > 0
    full = counts == np.multiply.outer(qs, ks)
    tokens = math.prod(spec.mask("m").layout.shape)
    assert (r.q_tiles, r.kv_tiles, r.dense_tiles) == (*counts.shape, counts.size)
    assert r.visited_tiles == visited.sum()
    assert r.full_tiles == full.sum()
    assert r.partial_tiles == (visited & ~full).sum()
    assert r.attended_pairs == counts.sum()
    assert r.density == counts.sum() / tokens**2
    np.testing.assert_array_equal(r.visits_per_query_tile, visited.sum(1))
    np.testing.assert_array_equal(r.full_per_query_tile, full.sum(1))
    assert r.max_visits == visited.sum(1).max() and math.isclose(r.mean_visits, visited.sum(1).mean())
    assert r.perfectly_block_sparse == (not (visited & ~full).any())
    if visited.any():
        assert math.isclose(r.upper_bound_speedup, counts.size / visited.sum())
        assert math.isclose(r.flop_ideal_speedup, tokens**2 / counts.sum())
    np.testing.assert_array_equal(tile_pair_counts(spec.mask("m").expr, spec.mask("m").layout.shape, q_tile,
                                                   kv_tile, permute), counts)
    return r, counts


def video_spec(expr_text):
    return maskdsl.parse(f"layout v = grid(30, 48, 80)\nmask m = {expr_text}\n"
                         "attention a(mask=m, heads=24, head_dim=128, dtype=bf16)")


# --- strategies ----------------------------------------------------------------------------------

@st.composite
def neighborhoods(draw, shape, allow_dilation=True):
    ws, ds, ss, cs = [], [], [], []
    for n in shape:
        w = draw(st.integers(1, n))
        d = draw(st.integers(1, n // w)) if allow_dilation else 1
        ws.append(w)
        ds.append(d)
        ss.append(draw(st.integers(1, w)))
        cs.append(draw(st.booleans()))
    return ir.Neighborhood(tuple(ws), tuple(ds), tuple(ss), tuple(cs))


@st.composite
def masks(draw, shape):
    """A neighborhood alone, or combined with sink / causal / full / another neighborhood."""
    base = draw(neighborhoods(shape))
    kind = draw(st.sampled_from(["alone", "sink", "causal", "full", "pair"]))
    if kind == "alone":
        return base
    plain = ir.Neighborhood(base.window, (1,) * len(shape), base.stride, base.causal)
    if kind == "pair":  # a (maybe dilated) neighborhood with an undilated one
        other = draw(neighborhoods(shape, allow_dilation=False))
        return ir.union(base, other) if draw(st.booleans()) else ir.intersection(base, other)
    other = {"sink": ir.Sink(draw(st.integers(1, math.prod(shape)))), "causal": ir.Causal(), "full": ir.Full()}[kind]
    first = plain if kind == "sink" else base  # a sink's boxes are undilated: keep the dimension plain
    return ir.union(first, other) if draw(st.booleans()) else ir.intersection(first, other)


def tiles_for(shape):
    return st.tuples(*[st.integers(1, n + 2) for n in shape])


@st.composite
def cases(draw, max_rank=3, max_tokens=160):
    rank = draw(st.integers(1, max_rank))
    limit = {1: 40, 2: 12, 3: 6}[rank]
    shape = tuple(draw(st.lists(st.integers(1, limit), min_size=rank, max_size=rank)))
    assume(math.prod(shape) <= max_tokens)
    return shape, draw(masks(shape)), draw(tiles_for(shape)), draw(tiles_for(shape)), draw(st.booleans())
