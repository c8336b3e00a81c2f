"""Per-rank predictions of the sharded grid (simulator.sharding) against brute-force tile counts."""

import pytest

import maskdsl
import math

from maskdsl.harness.semantics import static_mask
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
    assert [p.visited_tiles for p in preds] == [sum(int(visited[a // 2:b // 2].sum()) for a, b in p.chunks)
                                                for p in preds]
    assert sum(p.query_tiles for p in preds) == counts.shape[0]
    # the rows received: frames holding an attended key, rounded out to 2-frame key tiles, less its own
    m = static_mask(spec.mask("m").expr, (12, 6, 8))
    inner = math.prod((6, 8))
    for p in preds:
        own = {f for a, b in p.chunks for f in range(a, b)}
        need = set()
        for a, b in p.chunks:
            frames = m[a * inner:b * inner].any(0).nonzero().flatten().div(inner, rounding_mode="floor").tolist()
            need |= {f for t in frames for f in (t - t % 2, t - t % 2 + 1)}
        assert p.halo_rows == len(need - own) * inner > 0
        assert p.halo_bytes == 2 * p.halo_rows * 64 * 2 * 1 * 2  # K and V, head_dim, kv heads, batch, bf16
        assert p.comm_ms == pytest.approx(p.halo_bytes / 100e9 * 1e3)
        assert p.compute_ms is None or (p.hidden == (p.comm_ms <= p.compute_ms))
        # an all-gather brings every token row this rank does not hold, K and V of every kv head
        others = 12 * inner - sum(b - a for a, b in p.chunks) * inner
        assert p.gather_bytes == 2 * others * 64 * 2 * 2
        assert p.gather_ms == pytest.approx(p.gather_bytes / 100e9 * 1e3)


def test_halo_beats_the_all_gather_baseline_by_the_link_time_it_saves():
    spec = maskdsl.parse(SPEC)
    for p in simulate_sharded(spec, "m", 3, (2, 2, 4), (2, 2, 4), link_gb_per_s=0.001, gpu="H100"):
        # a slow link: neither transfer hides, so the ratio is the ratio of bytes plus compute
        assert p.compute_ms is not None and not p.hidden
        assert p.speedup_over_gather == pytest.approx((p.compute_ms + p.gather_ms) / p.comm_ms)
        assert p.gather_bytes > p.halo_bytes
    for p in simulate_sharded(spec, "m", 3, (2, 2, 4), (2, 2, 4), link_gb_per_s=1e9, gpu="H100"):
        assert p.hidden and p.speedup_over_gather == pytest.approx(1.0, abs=1e-6)


def test_dilated_outer_dimensions_and_topk_are_refused():
    spec = maskdsl.parse(SPEC)
    with pytest.raises(ValueError, match="outermost dimension is dilated"):
        simulate_sharded(spec, "d", 2, (2, 2, 4))
    with pytest.raises(ValueError, match="ring pass"):
        simulate_sharded(spec, "t", 2, (2, 2, 4))
