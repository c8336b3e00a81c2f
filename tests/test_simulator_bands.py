"""Banded per-dimension tables (simulator.band) against the dense counts they replace, and their scaling.

The dense reference is `maskdsl.analysis.counts.box_pair_counts` (the [query tiles, key tiles] table the
simulator built before bands) or brute force over the reference mask (tests/sim_brute.py); every
union path (listed tile pairs, dense chunks) and both kinds of ranking supports are checked.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import maskdsl
from maskdsl.analysis.counts import NotAnalyzable, Rel1D, box_pair_counts, layout_dilation, num_products
from maskdsl.simulator import counting, simulate, support, tables
from maskdsl.simulator.band import band_table
from maskdsl.simulator.counting import key_tile_stats, tile_stats
from maskdsl.simulator.support import SupportCounter
from maskdsl.simulator.tiles import dim_intervals

from sim_brute import brute_counts, cases, make_spec

UNIONS = [  # (shape, mask, q tile, kv tile): unions and dense pieces in 1-3 dimensions, ragged tiles
    ((37,), "sliding_window(6, causal=true) | sink(3)", (8,), (4,)),
    ((37,), "(sliding_window(5, causal=true) | sink(4)) & causal", (16,), (8,)),
    ((40,), "sliding_window(3) | dilated(3, 4)", (5,), (3,)),
    ((37,), "block(8) | sink(5)", (4,), (8,)),
    ((10, 12), "neighborhood(window=(3, 5), stride=(2, 3)) | sink(7)", (4, 4), (2, 8)),
    ((10, 12), "causal | neighborhood(window=(3, 3), dilation=(2, 3))", (2, 4), (4, 2)),
    ((5, 6, 7), "neighborhood(window=(3, 4, 5), causal=(true, false, true)) | sink(9)", (2, 2, 4), (1, 4, 4)),
    ((5, 6, 7), "causal & neighborhood(window=(3, 4, 5)) | sink(40)", (2, 2, 4), (1, 4, 4)),
]


def _spec(shape, text):
    return maskdsl.parse(f"layout g = grid({', '.join(map(str, shape))})\nmask m = {text}")


@settings(max_examples=120, deadline=None)
@given(cases(max_tokens=200), st.sampled_from(["signed", "products"]))
def test_band_tables_equal_the_dense_tables(case, kind):
    """Every term's table, every dimension: the band holds exactly the dense table's nonzeros."""
    shape, expr, q_tile, kv_tile, _ = case
    tables.clear()
    try:
        dil = layout_dilation(num_products(expr, shape), len(shape))
        rels = tables.term_rels(expr, shape, kind)
    except NotAnalyzable:
        return
    for d, n in enumerate(shape):
        q, k = dim_intervals(n, q_tile[d], dil[d]), dim_intervals(n, kv_tile[d], dil[d])
        bands = tables.dim_tables(expr, shape, d, q_tile[d], kv_tile[d], kind)
        assert len(bands) == len(rels)
        for band, (_, term) in zip(bands, rels):
            want = box_pair_counts((term[d],), q[:, None, :], k[:, None, :])
            np.testing.assert_array_equal(band.dense(), want)
            np.testing.assert_array_equal(band.row_sums(), want.sum(axis=1))
            np.testing.assert_array_equal(band.col_sums(), np.count_nonzero(want, axis=0))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9), st.integers(1, 3),
       st.integers(1, 3), st.data())
def test_band_operations_equal_dense_ones(n, d, tq, tk, mq, mk, data):
    """meet, block_sum and row slices of bands of arbitrary valid relations, against numpy on dense tables."""
    def relation():
        g = np.arange(n) % d
        glen = (n - g + d - 1) // d
        lo = np.array([data.draw(st.integers(0, int(x) - 1)) for x in glen], dtype=np.int64)
        span = np.array(data.draw(st.lists(st.integers(-3, 8), min_size=n, max_size=n)), dtype=np.int64)
        return Rel1D(n, d, lo, np.minimum(lo + span, glen - 1))

    q, k = dim_intervals(n, tq), dim_intervals(n, tk)
    a, b = band_table(relation(), q, k), band_table(relation(), q, k)
    da, db = a.dense(), b.dense()
    np.testing.assert_array_equal(a.meet(b).dense(), da * db)
    supports = a.with_values(a.values > 0).meet(b.with_values(b.values > 0))
    np.testing.assert_array_equal(supports.dense(), (da > 0) & (db > 0))
    r0 = data.draw(st.integers(0, len(q)))
    r1 = data.draw(st.integers(r0, len(q)))
    np.testing.assert_array_equal(a.dense(r0, r1), da[r0:r1])
    cq, ck = dim_intervals(n, tq * mq), dim_intervals(n, tk * mk)
    rows, cols = np.searchsorted(q[:, 0], cq[:, 0]), np.searchsorted(k[:, 0], ck[:, 0])
    np.testing.assert_array_equal(a.block_sum(rows, cols).dense(),
                                  np.add.reduceat(np.add.reduceat(da, rows, axis=0), cols, axis=1))


@pytest.mark.parametrize("listed", [True, False], ids=["listed-pairs", "dense-chunks"])
@pytest.mark.parametrize("shape, text, q_tile, kv_tile", UNIONS)
def test_union_paths_equal_brute_force(monkeypatch, listed, shape, text, q_tile, kv_tile):
    """Both ways a union is counted (its terms' tile pairs listed, or the dense map in chunks), both walks."""
    monkeypatch.setattr(counting, "SPARSE_RATIO", 0 if listed else 10**12)
    monkeypatch.setattr(counting, "CHUNK_ELEMENTS", 5)  # several chunks of query tiles
    spec = _spec(shape, text)
    expr = spec.mask("m").expr
    counts, qs, ks = brute_counts(make_spec(shape, expr), q_tile, kv_tile, True)
    full = counts == np.multiply.outer(qs, ks)
    tables.clear()
    stats = tile_stats(expr, shape, q_tile, kv_tile)
    np.testing.assert_array_equal(stats.visits, np.count_nonzero(counts, axis=1))
    np.testing.assert_array_equal(stats.full, np.count_nonzero(full, axis=1))
    np.testing.assert_array_equal(stats.pairs, counts.sum(axis=1))
    visits, kfull = key_tile_stats(expr, shape, q_tile, kv_tile)
    whole = ks == math.prod(kv_tile)
    np.testing.assert_array_equal(visits, np.count_nonzero(counts, axis=0))
    np.testing.assert_array_equal(kfull, np.count_nonzero(full, axis=0) * whole)


@pytest.mark.parametrize("shape, text, q_tile, kv_tile", UNIONS + [
    ((37,), "sliding_window(9)", (4,), (2,)), ((10, 12), "neighborhood(window=(3, 5), stride=(2, 3))", (4, 4), (2, 8))])
def test_support_counter_on_bands_equals_brute_force(monkeypatch, shape, text, q_tile, kv_tile):
    """Ranking from banded supports (what a long dimension keeps) counts the visited pairs exactly."""
    monkeypatch.setattr(support, "DENSE_FLOOR", 0)
    monkeypatch.setattr(support, "BAND_GAIN", 0)
    expr = _spec(shape, text).mask("m").expr
    counter = SupportCounter(expr, shape)
    counts = brute_counts(make_spec(shape, expr), q_tile, kv_tile, True)[0]
    assert counter.visited(q_tile, kv_tile) == (np.count_nonzero(counts), counts.size)
    assert all(not isinstance(s, np.ndarray) for dim in counter._seen.values() for s in dim[2])  # bands were used


def test_million_token_window_tables_hold_the_band_only():
    """1-D, 2**20 tokens, window 4096, 128/64-token tiles: the tables hold about the band (8k x 66 entries),
    not the 8k x 16k dense table; the counts match the NATTEN window's closed form computed here."""
    n, w, tq, tk = 1 << 20, 4096, 128, 64
    spec = maskdsl.parse(f"layout s = grid({n})\nmask m = sliding_window({w})\n"
                         "attention a(mask=m, heads=8, head_dim=128, dtype=bf16)")
    tables.clear()
    r = simulate(spec, "m", (tq,), (tk,), gpu="H100")
    nq, nk = n // tq, n // tk
    band = nq * (w // tk + 2)
    assert tables.cached_elements() <= 3 * band < nq * nk // 80
    a = np.arange(0, n, tq)  # first and last query of every query tile
    lo = lambda i: np.clip(i - w // 2, 0, n - w)  # noqa: E731 - NATTEN: the window stays inside the grid
    first_lo, last_lo = lo(a), lo(a + tq - 1)
    visits = (last_lo + w - 1) // tk - first_lo // tk + 1
    full = np.maximum((first_lo + w) // tk - (last_lo + tk - 1) // tk, 0)  # whole key tiles every query sees
    np.testing.assert_array_equal(r.visits_per_query_tile, visits)
    np.testing.assert_array_equal(r.full_per_query_tile, full)
    assert r.attended_pairs == n * w and r.dense_tiles == nq * nk
