"""Per-rank predictions of the sharded grid (simulator.sharding) against brute-force tile counts."""

import pytest

import maskdsl
from maskdsl.halo import halo_plan
from maskdsl.simulator.sharding import simulate_sharded

from sim_brute import brute_counts

SPEC = """layout g = grid(12, 6, 8)
mask m = neighborhood(window=(5, 3, 5), stride=(1, 1, 2))
mask d = dilated(window=(3, 3, 3), dilation=(2, 1, 1))
mask t = topk(k=2, block=(2, 2, 4))
attention a(mask=m, heads=4, kv_heads=2, head_dim=64, dtype=bf16)
"""


@pytest.mark.parametrize("ranks", [2, 3])
def test_per_rank_tiles_and_halos_match_brute_force(ranks):
    spec = maskdsl.parse(SPEC)
    preds = simulate_sharded(spec, "m", ranks, (2, 2, 4), (2, 2, 4), link_gb_per_s=100.0)
    # brute force: the reference mask summed over tile pairs, query tiles grouped by their frames
    counts, _, _ = brute_counts(spec, (2, 2, 4), (2, 2, 4), True)
    visited = (counts > 0).sum(1).reshape(6, -1)  # 12 frames / 2 per tile = 6 tile rows
    assert [p.visited_tiles for p in preds] == [int(visited[p.frames[0] // 2:p.frames[1] // 2].sum()) for p in preds]
    assert sum(p.query_tiles for p in preds) == counts.shape[0]
    plan = halo_plan(spec.mask("m").expr, (12, 6, 8), tuple(p.frames[0] for p in preds) + (12,))
    for p in preds:
        assert p.halo_rows == plan.halo_rows(p.rank) > 0
        assert p.halo_bytes == 2 * p.halo_rows * 64 * 2 * 1 * 2  # K and V, head_dim, kv heads, batch, bf16
        assert p.comm_ms == pytest.approx(p.halo_bytes / 100e9 * 1e3)
        assert p.compute_ms is None or (p.hidden == (p.comm_ms <= p.compute_ms))


def test_dilated_outer_dimensions_and_topk_are_refused():
    spec = maskdsl.parse(SPEC)
    with pytest.raises(ValueError, match="outermost dimension is dilated"):
        simulate_sharded(spec, "d", 2, (2, 2, 4))
    with pytest.raises(ValueError, match="ring pass"):
        simulate_sharded(spec, "t", 2, (2, 2, 4))
