"""Choosing tiles: the sweep ranks every valid config, the default config, and block-sparse suggestions."""

import numpy as np
import pytest

import maskdsl
from maskdsl.spec import ir
from maskdsl.simulator import default_config, simulate, suggest, sweep

from sim_brute import brute_counts, make_spec, video_spec


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
