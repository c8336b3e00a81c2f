"""The simulator against brute force over the reference mask: counts, bounds, sweep, suggest, costs, CLI.

Every expected number here is computed independently of the simulator: tile membership of each
token from the layout rules written out directly (not from maskdsl.simulator.tiles), counts by summing
`maskdsl.reference_mask` over tile pairs, greedy scheduling with a heap one job at a time.
"""

import heapq
import json
import math
import statistics
import time

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import maskdsl
from maskdsl import ir
from maskdsl.analysis import NotAnalyzable, Rel1D, attended_pairs, layout_dilation, products
from maskdsl.cli import main
from maskdsl.simulator import CostModel, default_config, simulate, suggest, sweep
from maskdsl.simulator import tables
from maskdsl.simulator.cost import lpt_makespan
from maskdsl.simulator.counting import tile_pair_counts
from maskdsl.simulator.figure import draw_tilemaps, tile_classes
from maskdsl.simulator.support import SupportCounter

from conftest import EXAMPLES


# --- brute force -------------------------------------------------------------------------------

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


# --- exactness -----------------------------------------------------------------------------------

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
    from maskdsl.intervals import evaluate
    from maskdsl.intervals import G, I, N
    n, a, b = case
    for term in products(ir.intersection(a, b), (n,)):
        rel = term.sym[0]
        lo, hi = evaluate(rel, n)
        for c in range(n):
            d = rel.dilation
            env = {I: c // d, G: c % d, N: len(range(c % d, n, d))}
            if lo[c] <= hi[c]:
                assert lo[c] == max(0, int(rel.lo.subs(env)))
                assert hi[c] == min(env[N] - 1, int(rel.hi.subs(env)))


def test_products_cache_hands_out_fresh_lists():
    shape = (6, 6)
    expr = ir.union(ir.Neighborhood((3, 3), (1, 1), (1, 1), (False, False)), ir.Sink(2))
    first = products(expr, shape)
    first.clear()
    assert len(products(expr, shape)) > 0


# --- the numbers the issue names -------------------------------------------------------------------

def video_spec(expr_text):
    return maskdsl.parse(f"layout v = grid(30, 48, 80)\nmask m = {expr_text}\n"
                         "attention a(mask=m, heads=24, head_dim=128, dtype=bf16)")


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


def test_3d_case_simulates_fast():
    """DESIGN §7: 115,200 tokens, 2x8x8 tiles, well under 100 ms warm (asserted with slack: 1 s)."""
    for text in ("neighborhood(window=(15, 24, 40))", "neighborhood(window=(15, 24, 40), stride=(2, 8, 8))"):
        spec = video_spec(text)
        simulate(spec, "m", (2, 8, 8))  # warm: sympy expressions built, tables cached
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            r = simulate(spec, "m", (2, 8, 8))
            runs.append(time.perf_counter() - start)
        assert statistics.median(runs) < 1.0, runs
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


# --- top-k ---------------------------------------------------------------------------------------

def test_topk_reports_expectations():
    spec = maskdsl.parse("layout s = grid(128)\nmask m = topk(k=2, block=16)")
    r = simulate(spec, "m", (16,), (16,))
    assert r.expected and any("EXPECTATION" in n for n in r.notes)
    key_blocks = 128 // 16
    assert r.visited_tiles == r.q_tiles * 2  # each query tile keeps k tiles
    assert math.isclose(r.density, 2 / key_blocks)


def test_topk_with_static_part_sits_between_static_and_envelope():
    text = "layout s = grid(256)\nmask m = (topk(k=3, block=32) | sliding_window(20, causal=true) | sink(4)) & causal"
    spec = maskdsl.parse(text)
    r = simulate(spec, "m", (32,), (32,))
    static = make_spec((256,), ir.intersection(ir.union(ir.Neighborhood((20,), (1,), (1,), (True,)), ir.Sink(4)),
                                                ir.Causal()))
    envelope = make_spec((256,), ir.Causal())
    low, _ = check_against_brute(static, (32,), (32,), True)
    high, _ = check_against_brute(envelope, (32,), (32,), True)
    assert r.expected
    assert low.visited_tiles < r.visited_tiles <= high.visited_tiles
    assert low.density < r.density <= high.density
    assert np.all(r.visits_per_query_tile >= low.visits_per_query_tile - 1e-9)
    assert np.all(r.visits_per_query_tile <= np.minimum(high.visits_per_query_tile,
                                                        low.visits_per_query_tile + 3) + 1e-9)


# --- sweep and suggest ---------------------------------------------------------------------------

def test_sweep_ranks_every_valid_config():
    spec = make_spec((12, 20), ir.union(ir.Neighborhood((5, 7), (1, 1), (1, 2), (False, False)), ir.Sink(3)))
    results = sweep(spec, "m", limit=None)
    configs = [c for c, _ in results]
    assert len(set(configs)) == len(configs)
    for c, r in results:
        for tile, n in [(t, n) for tile in (c.q_tile, c.kv_tile) for t, n in zip(tile, (12, 20))]:
            assert tile & (tile - 1) == 0 and tile <= 1 << (n - 1).bit_length()
        assert 16 <= c.q_tokens <= 256 and 16 <= c.kv_tokens <= 256
        counts, qs, ks = brute_counts(spec, c.q_tile, c.kv_tile, True)
        assert r.visited_tiles == np.count_nonzero(counts)
    # every power-of-two factorization with 16..256 tokens of both tiles, nothing else
    tiles = [(a, b) for a in (1, 2, 4, 8, 16) for b in (1, 2, 4, 8, 16, 32) if 16 <= a * b <= 256]
    assert {(c.q_tile, c.kv_tile) for c in configs} == {(q, k) for q in tiles for k in tiles}
    keys = [(r.upper_bound_speedup, r.predicted_speedup) for _, r in results]
    assert keys == sorted(keys, reverse=True)


def test_sweep_limit_candidates_and_block_sizes():
    spec = video_spec("neighborhood(window=(15, 24, 40), stride=(2, 8, 8))")
    best = sweep(spec, "m", limit=3)
    assert len(best) == 3
    everything = [r.upper_bound_speedup for _, r in sweep(spec, "m", q_tokens=128, kv_tokens=128, limit=None)]
    assert best[0][1].upper_bound_speedup >= max(everything)
    pairs = [((2, 8, 8), (2, 8, 8)), ((1, 8, 16), (2, 8, 8))]
    got = sweep(spec, "m", candidates=pairs, limit=None)
    assert {(c.q_tile, c.kv_tile) for c, _ in got} == set(pairs)
    for c, r in got:
        assert r == simulate(spec, "m", c.q_tile, c.kv_tile)
    config, result = default_config(spec, "m")
    same = [r.upper_bound_speedup for c, r in sweep(spec, "m", q_tokens=128, kv_tokens=128, limit=None)
            if c.q_tile == c.kv_tile]
    assert config.q_tokens == config.kv_tokens == 128 and config.q_tile == config.kv_tile
    assert result.upper_bound_speedup == max(same)


def test_suggestions_are_perfectly_block_sparse_by_brute_force():
    spec = maskdsl.parse("layout g = grid(16, 24)\nmask m = neighborhood(window=(7, 9), stride=(1, 2))")
    found = suggest(spec, "m", (4, 4), (4, 8))
    assert found
    for nb, r in found:
        counts, qs, ks = brute_counts(make_spec((16, 24), nb), (4, 4), (4, 8), True)
        visited = counts > 0
        assert np.all(counts[visited] == np.multiply.outer(qs, ks)[visited])
        assert r.perfectly_block_sparse and nb.dilation == (1, 1) and nb.causal == (False, False)
    moves = [sum((abs(a - b) + abs(c - d)) / b for a, b, c, d in zip(nb.window, (7, 9), nb.stride, (1, 2)))
             for nb, _ in found]  # the documented distance: window and stride change relative to the window
    assert moves[0] == min(moves)


def test_suggest_refuses_what_it_cannot_do():
    causal = maskdsl.parse("layout s = grid(64)\nmask m = sliding_window(9, causal=true)")
    assert suggest(causal, "m", (8,)) == []
    union = maskdsl.parse("layout s = grid(64)\nmask m = sliding_window(9) | sink(2)")
    with pytest.raises(ValueError, match="one neighborhood"):
        suggest(union, "m", (8,))


# --- cost model ----------------------------------------------------------------------------------

def greedy(jobs, bins):
    """Longest-first, one job at a time onto the least-loaded bin."""
    heap = [0.0] * bins
    for job in sorted(jobs, reverse=True):
        heapq.heappush(heap, heapq.heappop(heap) + job)
    return max(heap)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(1, 40)), min_size=1, max_size=6), st.integers(1, 9))
def test_lpt_makespan_equals_one_at_a_time_greedy(groups, bins):
    values = np.array([v / 7 for v, _ in groups])
    counts = np.array([c for _, c in groups])
    jobs = [v for v, c in zip(values, counts) for _ in range(c)]
    assert math.isclose(lpt_makespan(values, counts, bins), greedy(jobs, bins), rel_tol=1e-9)


def test_predicted_speedup_follows_the_documented_formula(tmp_path):
    spec = make_spec((9, 10), ir.union(ir.Neighborhood((3, 5), (1, 1), (1, 1), (False, False)), ir.Sink(3)),
                     heads=3)
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"gpus": {"Test GPU": {"c_full": 1.0, "c_partial": 2.5, "c_tile": 0.75, "sms": 4,
                                                      "tile_us": 10.0, "source": "test fit"}}}))
    r = simulate(spec, "m", (2, 4), (4, 4), gpu="Test GPU", costs=path)
    counts, qs, ks = brute_counts(spec, (2, 4), (4, 4), True)
    full = (counts == np.multiply.outer(qs, ks)).sum(1)
    partial = (counts > 0).sum(1) - full
    pair, per_q = 8 * 16 / 128**2, 8 / 128
    jobs = list(full * 1.0 * pair + partial * 2.5 * pair + 0.75 * per_q) * 3
    dense_jobs = [counts.shape[1] * pair + 0.75 * per_q] * (counts.shape[0] * 3)
    assert math.isclose(r.predicted_time, greedy(jobs, 4))
    assert math.isclose(r.predicted_speedup, greedy(dense_jobs, 4) / greedy(jobs, 4))
    assert math.isclose(r.predicted_ms, r.predicted_time * 10.0 / 1000)
    assert r.gpu == "Test GPU" and r.cost_source == "test fit"


def test_gpu_cost_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKDSL_CACHE_DIR", str(tmp_path))
    h200 = CostModel.for_gpu("NVIDIA H200")
    assert not h200.placeholder and "fitted" in h200.source and h200.tile_us > 0 and h200.sms == 132
    h100 = CostModel.for_gpu("NVIDIA H100 80GB HBM3")
    assert h100.placeholder and "PLACEHOLDER" in h100.source
    assert CostModel.for_gpu("h100").name == "NVIDIA H100 80GB HBM3"
    # constants fitted by `maskdsl bench --suite` on this machine override the shipped ones
    from maskdsl.simulator.calibrate import store
    from maskdsl.simulator.cost import fitted_path

    store({"c_full": 1.0, "c_partial": 2.0, "c_tile": 0.1, "sms": 100, "tile_us": 5.0, "source": "fitted here"},
          "NVIDIA H200", fitted_path())
    assert CostModel.for_gpu("NVIDIA H200").c_partial == 2.0
    with pytest.raises(KeyError, match="known"):
        CostModel.for_gpu("TPU v5")


# --- errors, CLI, figure -------------------------------------------------------------------------

def test_bad_tiles_name_the_argument():
    spec = video_spec("neighborhood(window=(15, 24, 40))")
    with pytest.raises(ValueError, match=r"q_tile has 2 entries.*3 dimension"):
        simulate(spec, "m", (8, 8))
    with pytest.raises(ValueError, match=r"kv_tile\[1\] = 0 is not a positive integer"):
        simulate(spec, "m", (2, 8, 8), (2, 0, 8))
    with pytest.raises(KeyError, match="no mask named"):
        simulate(spec, "nope", (2, 8, 8))


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


def test_cli_table_json_sweep_suggest(capsys):
    path = str(EXAMPLES / "video_gna.mask")
    assert main(["simulate", path, "--mask", "gna", "--q-tile", "2,8,8", "--kv-tile", "2,8,8", "--suggest"]) == 0
    out = capsys.readouterr().out
    r = simulate(maskdsl.load(path), "gna", (2, 8, 8))
    assert "upper bound" in out and f"{r.upper_bound_speedup:.2f}x" in out and f"{r.visited_tiles:,}" in out
    assert "perfectly block-sparse neighborhoods" in out
    assert main(["simulate", path, "--q-tile", "2,8,8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["results"][0]["visited_tiles"] == r.visited_tiles
    assert main(["simulate", path, "--sweep", "--limit", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3
    assert main(["simulate", path, "--q-tile", "128", "--no-permute"]) == 2
    assert "q_tile has 1 entries" in capsys.readouterr().err


def test_figure_classes_match_brute_force(tmp_path):
    spec = make_spec((12, 12), ir.Neighborhood((5, 5), (1, 1), (2, 2), (False, False)))
    counts, qs, ks = brute_counts(spec, (4, 4), (4, 4), True)
    want = np.where(counts == 0, 0, np.where(counts == np.multiply.outer(qs, ks), 2, 1))
    np.testing.assert_array_equal(tile_classes(spec, "m", (4, 4)), want)
    out = draw_tilemaps(spec, [("m", (4, 4), (4, 4))], str(tmp_path / "map.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_calibration_recovers_known_constants():
    """Times made from chosen constants (linear, evenly loaded SMs) must fit back to those constants."""
    from maskdsl.simulator.calibrate import Measurement, _features, fit

    cases = [("neighborhood(window=(15, 24, 40))", (2, 8, 8), (2, 8, 8)),
             ("neighborhood(window=(15, 24, 40), stride=(2, 8, 8))", (2, 8, 8), (2, 8, 8)),
             ("neighborhood(window=(9, 9, 9))", (4, 4, 8), (2, 4, 8)),
             ("block((2, 16, 16))", (2, 8, 8), (1, 8, 8))]
    truth = np.array([3.0, 4.5, 7.0])  # microseconds: full tile, partial tile, per query tile
    meas = []
    for text, q, k in cases:
        spec = video_spec(text)
        m = Measurement(spec, "m", q, k, 24, 1.0)
        ms = float(_features(m, 132, 1.0) @ truth) / 1000.0
        meas.append(Measurement(spec, "m", q, k, 24, ms))
    entry = fit(meas, "test GPU")
    assert entry["pair_exponent"] == pytest.approx(1.0)
    assert entry["tile_us"] == pytest.approx(3.0, rel=1e-6)
    assert entry["c_partial"] == pytest.approx(1.5, rel=1e-6) and entry["c_tile"] == pytest.approx(7.0 / 3.0, rel=1e-6)
