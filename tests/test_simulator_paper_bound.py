"""The GNA paper's speedup bound (Hassani et al. 2025): dense key tiles / the busiest query tile's key tiles.

The expected values are the paper's published ones (its simulator's upper bounds for the
HunyuanVideo, FLUX and Cosmos settings), rounded as the paper prints them.
"""

import math

import numpy as np
import pytest

import maskdsl
from maskdsl.simulator import simulate


def spec_for(shape, window, stride):
    tup = lambda t: "(" + ", ".join(map(str, t)) + ")"  # noqa: E731
    return maskdsl.parse(f"layout g = grid{tup(shape)}\nmask m = neighborhood(window={tup(window)}, stride={tup(stride)})\n")


PAPER = [  # grid, window, stride, query tile, key tile, the paper's bound
    ((30, 48, 80), (18, 24, 24), (1, 1, 1), (4, 8, 8), (2, 8, 8), 3.3),  # HunyuanVideo
    ((30, 48, 80), (18, 24, 24), (16, 8, 8), (4, 8, 8), (2, 8, 8), 11.1),
    ((256, 256), (80, 80), (1, 1), (16, 16), (16, 8), 6.1),  # FLUX
    ((256, 256), (80, 80), (16, 16), (16, 16), (16, 8), 10.2),
    ((16, 44, 80), (16, 24, 16), (1, 1, 1), (8, 4, 8), (4, 4, 8), 5.2),  # Cosmos
    ((16, 44, 80), (16, 24, 16), (1, 8, 16), (8, 4, 8), (4, 4, 8), 9.2),
]


@pytest.mark.parametrize("shape, window, stride, q_tile, kv_tile, paper", PAPER)
def test_worst_tile_speedup_reproduces_the_paper(shape, window, stride, q_tile, kv_tile, paper):
    r = simulate(spec_for(shape, window, stride), "m", q_tile, kv_tile)
    assert round(r.worst_tile_speedup, 1) == paper
    assert r.worst_tile_speedup == pytest.approx(r.kv_tiles / r.max_visits)


def test_worst_tile_differs_from_the_mean_bound_when_tiles_are_imbalanced():
    # unstrided HunyuanVideo: edge query tiles visit fewer key tiles than interior ones
    r = simulate(spec_for((30, 48, 80), (18, 24, 24), (1, 1, 1)), "m", (4, 8, 8), (2, 8, 8))
    assert r.worst_tile_speedup < r.upper_bound_speedup
    assert r.to_dict()["worst_tile_speedup"] == pytest.approx(r.worst_tile_speedup)


def test_worst_tile_counts_padded_key_tiles_and_intersecting_ones():
    """The definition written out on a small ragged grid, from the reference mask (no simulator counts)."""
    shape, q_tile, kv_tile = (7, 10), (2, 4), (4, 4)
    spec = maskdsl.parse("layout g = grid(7, 10)\nmask m = neighborhood(window=(3, 5), stride=(1, 2))\n")
    dense = maskdsl.reference_mask(spec, "m").numpy()
    coords = np.array(np.unravel_index(np.arange(math.prod(shape)), shape)).T
    tiles = lambda t: np.ravel_multi_index(  # noqa: E731
        (coords // np.array(t)).T, [-(-n // e) for n, e in zip(shape, t)])
    qi, ki = tiles(q_tile), tiles(kv_tile)
    nk = math.prod(-(-n // e) for n, e in zip(shape, kv_tile))  # padded: ceil per dimension
    visits = [len(set(ki[np.flatnonzero(dense[qi == q].any(axis=0))])) for q in range(qi.max() + 1)]
    r = simulate(spec, "m", q_tile, kv_tile)
    assert r.kv_tiles == nk == 6
    assert r.worst_tile_speedup == pytest.approx(nk / max(visits))


def test_cli_shows_the_worst_tile_column(capsys):
    from maskdsl.cli import main
    from conftest import EXAMPLES

    assert main(["simulate", str(EXAMPLES / "video_gna.mask"), "--q-tile", "2,8,8"]) == 0
    out = capsys.readouterr().out
    assert "worst tile" in out and "CTAs/SM" in out and "waves" in out
