"""The simulator's exact counts against brute force over the reference mask, and the numbers docs/DESIGN.md names.

Counted tile pairs, full/partial classes, bounds, the cached tables and the closed-form pieces they rest on
(prefix counts, integer-exact term bounds); expected values come from tests/sim_brute.py.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import maskdsl
from maskdsl.analysis import counts as analysis
from maskdsl.spec import ir
from maskdsl.analysis.counts import NotAnalyzable, Rel1D, attended_pairs, layout_dilation, products
from maskdsl.simulator import simulate
from maskdsl.simulator import tables
from maskdsl.simulator.counting import tile_pair_counts
from maskdsl.simulator.support import SupportCounter

from sim_brute import brute_counts, cases, check_against_brute, make_spec, neighborhoods, tiles_for, video_spec


@settings(max_examples=250, deadline=None)
@given(cases())
def test_counts_equal_brute_force(case):
    shape, expr, q_tile, kv_tile, permute = case
    spec = make_spec(shape, expr)
    try:
        check_against_brute(spec, q_tile, kv_tile, permute)
    except NotAnalyzable as exc:  # tile-major needs one dilation per dimension
        assert permute and "dilation" in str(exc) and "permute=False" in str(exc)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3).flatmap(lambda r: st.tuples(*[st.integers(2, 9)] * r)).flatmap(
    lambda shape: st.tuples(st.just(shape), neighborhoods(shape), tiles_for(shape), tiles_for(shape))))
def test_single_neighborhood_tile_major_and_row_major(case):
    """The closed-form product path (one term) against brute force, both layouts, ragged tiles."""
    shape, expr, q_tile, kv_tile = case
    for permute in (True, False):
        check_against_brute(make_spec(shape, expr), q_tile, kv_tile, permute)


@pytest.mark.parametrize("text, q_tile, kv_tile", [
    ("neighborhood(window=(5, 7), stride=(2, 3))", (4, 4), (2, 8)),  # 2-D GNA, ragged tiles
    ("neighborhood(window=(4, 6))", (3, 5), (3, 5)),  # even windows
    ("neighborhood(window=(3, 3), dilation=(2, 3))", (2, 4), (4, 2)),  # dilation permutation
    ("neighborhood(window=(3, 4, 5), causal=(true, false, true)) | sink(9)", (2, 2, 4), (1, 4, 4)),
    ("causal & neighborhood(window=(3, 4, 5)) | sink(40)", (2, 2, 4), (1, 4, 4)),
    ("sliding_window(6, causal=true) | sink(3)", (8,), (4,)),
    ("dilated(4, 3) & causal", (5,), (3,)),
    ("(sliding_window(5, causal=true) | sink(4)) & causal", (16,), (8,)),
    ("sliding_window(2) & sliding_window(1) & dilated(1, 3)", (4,), (2,)),  # floor((x - g) / 3) in integers
    ("dilated(2, 2) & sliding_window(3) & causal", (4,), (3,)),  # the window's right-edge clamp in groups
])
@pytest.mark.parametrize("permute", [True, False])
def test_named_cases_equal_brute_force(text, q_tile, kv_tile, permute):
    rank = len(q_tile)
    shape = {1: (37,), 2: (10, 12), 3: (5, 6, 7)}[rank]
    spec = maskdsl.parse(f"layout g = grid({', '.join(map(str, shape))})\nmask m = {text}")
    check_against_brute(spec, q_tile, kv_tile, permute)


@settings(max_examples=25, deadline=None)
@given(cases(max_rank=2, max_tokens=120))
def test_tables_derived_from_finer_ones_are_exact(case):
    """Coarse per-dimension tables summed from cached fine ones (simulator.tables) equal brute force."""
    shape, expr, q_tile, kv_tile, _ = case
    spec = make_spec(shape, expr)
    fine_q = tuple(max(1, t // 2) if t % 2 == 0 else 1 for t in q_tile)
    fine_k = tuple(max(1, t // 2) if t % 2 == 0 else 1 for t in kv_tile)
    tables.clear()
    try:
        tile_pair_counts(expr, shape, fine_q, fine_k, True)
        counts = tile_pair_counts(expr, shape, q_tile, kv_tile, True)
    except NotAnalyzable:
        return
    np.testing.assert_array_equal(counts, brute_counts(spec, q_tile, kv_tile, True)[0])


@settings(max_examples=40, deadline=None)
@given(cases(max_tokens=120))
def test_support_counter_equals_brute_force_visited(case):
    shape, expr, q_tile, kv_tile, _ = case
    try:
        visited, dense = SupportCounter(expr, shape).visited(q_tile, kv_tile)
    except NotAnalyzable:
        return
    counts = brute_counts(make_spec(shape, expr), q_tile, kv_tile, True)[0]
    assert (visited, dense) == (np.count_nonzero(counts), counts.size)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 4), st.data())
def test_prefix_counts_equal_counts_below(n, d, data):
    """analysis.Rel1D.prefix_counts (sorted prefix sums) against the direct [n, E] table."""
    g = np.arange(n) % d
    glen = (n - g + d - 1) // d
    lo = np.array([data.draw(st.integers(0, int(x) - 1)) for x in glen], dtype=np.int64)
    hi = np.minimum(lo + np.array(data.draw(st.lists(st.integers(-3, 8), min_size=n, max_size=n))), glen - 1)
    rel = Rel1D(n, d, lo, hi)
    edges = np.unique(np.array(data.draw(st.lists(st.integers(0, n), min_size=1, max_size=6))))
    bounds = np.unique(np.array([0, n] + data.draw(st.lists(st.integers(0, n), max_size=5))))
    want = np.concatenate([np.zeros((1, len(edges)), np.int64), np.cumsum(rel.counts_below(edges), axis=0)])
    np.testing.assert_array_equal(rel.prefix_counts(bounds, edges), want[bounds])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 14).flatmap(lambda n: st.tuples(st.just(n), neighborhoods((n,)), neighborhoods((n,), False))))
def test_term_bounds_are_integer_exact(case):
    """intervals.evaluate against sympy's exact substitution, on dilated intersections."""
    from maskdsl.analysis.intervals import evaluate
    from maskdsl.analysis.intervals import G, I, N
    n, a, b = case
    for term in products(ir.intersection(a, b), (n,)):
        rel = term.sym[0]
        lo, hi = evaluate(rel, n)
        for c in range(n):
            d = rel.dilation
            env = {I: c // d, G: c % d, N: len(range(c % d, n, d))}
            if lo[c] <= hi[c]:  # xreplace substitutes all at once (sequential subs can take floor(1) for 1/3)
                assert lo[c] == max(0, int(rel.lo.xreplace(env)))
                assert hi[c] == min(env[N] - 1, int(rel.hi.xreplace(env)))


def test_products_cache_hands_out_fresh_lists():
    shape = (6, 6)
    expr = ir.union(ir.Neighborhood((3, 3), (1, 1), (1, 1), (False, False)), ir.Sink(2))
    first = products(expr, shape)
    first.clear()
    assert len(products(expr, shape)) > 0


@pytest.mark.parametrize("text", ["neighborhood(window=3) | dilated(3, 3)",
                                  "neighborhood(window=(3, 5), dilation=(2, 1)) | neighborhood(window=(12, 3))"])
def test_mixed_dilation_keeps_the_dimension_in_order(text):
    """Terms with different dilations along a dimension: the tile-major layout leaves it undilated there
    (the kernels' layout too), and the counts stay exact in both layouts."""
    spec = maskdsl.parse(f"layout g = grid(12, 10)\nmask m = {text}")
    m = spec.mask("m")
    assert layout_dilation(products(m.expr, m.layout.shape), 2)[0] == 1
    for permute in (True, False):
        check_against_brute(make_spec((12, 10), m.expr), (4, 4), (2, 8), permute)


# --- the numbers the issue names -------------------------------------------------------------------

def test_block_equal_to_tile_is_perfectly_block_sparse():
    r = simulate(video_spec("block((2, 8, 8))"), "m", (2, 8, 8), (2, 8, 8))
    assert r.perfectly_block_sparse and r.partial_tiles == 0
    assert math.isclose(r.upper_bound_speedup, r.flop_ideal_speedup)
    tokens = 30 * 48 * 80
    assert r.attended_pairs == attended_pairs(ir.Neighborhood((2, 8, 8), (1,) * 3, (2, 8, 8), (False,) * 3),
                                              (30, 48, 80)) == tokens * 128
    # misaligned blocks are not: a 3-frame block straddles 2-frame tiles
    assert not simulate(video_spec("block((3, 8, 8))"), "m", (2, 8, 8)).perfectly_block_sparse


def test_small_blocked_case_against_brute_force():
    spec = maskdsl.parse("layout g = grid(4, 8, 8)\nmask m = block((2, 4, 4))")
    r, _ = check_against_brute(spec, (2, 4, 4), (2, 4, 4), True)
    assert r.perfectly_block_sparse and math.isclose(r.upper_bound_speedup, r.flop_ideal_speedup)


def test_3d_case_warm_simulation_only_counts(monkeypatch):
    """DESIGN §7: 115,200 tokens at 2x8x8 tiles, well under 100 ms warm. What makes it so: a warm simulation
    builds no sympy expression and counts no per-dimension table again (a speed, not a unit, property)."""
    for text in ("neighborhood(window=(15, 24, 40))", "neighborhood(window=(15, 24, 40), stride=(2, 8, 8))"):
        spec = video_spec(text)
        simulate(spec, "m", (2, 8, 8))  # warm: sympy expressions built, tables cached
        misses = (analysis._products.cache_info().misses, analysis._signed_terms.cache_info().misses)
        counted = []
        with monkeypatch.context() as m:
            m.setattr(tables, "_store", lambda key, found: counted.append(key))
            r = simulate(spec, "m", (2, 8, 8))
        assert counted == [], "a warm simulation counted tables again"
        assert (analysis._products.cache_info().misses, analysis._signed_terms.cache_info().misses) == misses
        assert r.q_tiles == 15 * 6 * 10 and r.dense_tiles == 900 * 900


def test_gna_3d_upper_bound_is_per_dimension_product():
    """GNA 3-D (stride 2x8x8): the visited tiles per dimension, counted on 1-D brute force, multiply."""
    r = simulate(video_spec("neighborhood(window=(15, 24, 40), stride=(2, 8, 8))"), "m", (2, 8, 8))
    per_dim = []
    for n, w, s, t in zip((30, 48, 80), (15, 24, 40), (2, 8, 8), (2, 8, 8)):
        spec = maskdsl.parse(f"layout g = grid({n})\nmask m = neighborhood(window={w}, stride={s})")
        counts = brute_counts(spec, (t,), (t,), True)[0]
        per_dim.append((np.count_nonzero(counts), counts.size))
    assert r.visited_tiles == math.prod(v for v, _ in per_dim)
    assert math.isclose(r.upper_bound_speedup, math.prod(d / v for v, d in per_dim))
