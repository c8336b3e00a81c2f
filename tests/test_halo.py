"""The halo analysis (maskdsl.analysis.halo) against a brute-force count over the reference mask."""

import math

import pytest
import torch

import maskdsl
from maskdsl.analysis.halo import even_bounds, halo_plan
from maskdsl.harness.semantics import static_mask

CASES = [
    ("grid(40)", "sliding_window(9)", 3),
    ("grid(40)", "sliding_window(9, causal=true) | sink(3)", 4),
    ("grid(37)", "dilated(window=5, dilation=3)", 3),
    ("grid(12, 7)", "neighborhood(window=(5, 3), stride=(2, 1))", 3),
    ("grid(12, 7)", "neighborhood(window=(3, 3), causal=(true, false))", 4),
    ("grid(9, 5, 6)", "neighborhood(window=(3, 3, 5), stride=(1, 1, 2))", 2),
    ("grid(9, 5, 6)", "block((3, 5, 3))", 3),
    ("grid(9, 5, 6)", "neighborhood(window=(3, 3, 3)) | neighborhood(window=(1, 5, 6), dilation=(1, 1, 1))", 4),
    ("grid(10, 6)", "neighborhood(window=(4, 3)) & neighborhood(window=(6, 6), stride=(3, 3))", 3),
    ("grid(16, 4)", "neighborhood(window=(5, 4), dilation=(3, 1))", 4),
]


def brute(spec, ranks):
    mask = spec.masks[0]
    shape = mask.layout.shape
    m = static_mask(mask.expr, shape)
    inner = math.prod(shape[1:])
    bounds = even_bounds(shape[0], ranks)
    out = []
    for r in range(ranks):
        needed = m[bounds[r] * inner:bounds[r + 1] * inner].any(0)
        row = []
        for s in range(ranks):
            rows = torch.nonzero(needed[bounds[s] * inner:bounds[s + 1] * inner]).flatten() + bounds[s] * inner
            row.append((int(rows[0]), int(rows[-1])) if len(rows) else None)
        out.append(tuple(row))
    return bounds, tuple(out)


@pytest.mark.parametrize("layout, text, ranks", CASES, ids=[c[1] for c in CASES])
def test_halo_ranges_equal_a_brute_force_count(layout, text, ranks):
    spec = maskdsl.parse(f"layout g = {layout}\nmask m = {text}")
    bounds, want = brute(spec, ranks)
    plan = halo_plan(spec.masks[0].expr, spec.masks[0].layout.shape, bounds)
    assert plan.ranges == want


def test_halo_sizes_and_bytes():
    spec = maskdsl.parse("layout v = grid(8, 4, 4)\nmask m = neighborhood(window=(3, 4, 4))")
    plan = halo_plan(spec.masks[0].expr, (8, 4, 4), even_bounds(8, 2))
    # rank 0 holds frames 0-3; its last frame's window (frames 2-4) reaches one frame (16 rows) of rank 1
    assert plan.rows(0) == (0, 64) and plan.ranges[0][1] == (64, 79)
    assert plan.halo_rows(0) == 16 and plan.halo_rows(1) == 16
    assert plan.halo_bytes(0, head_dim=128, kv_heads=2) == 2 * 16 * 128 * 2 * 2


def test_bad_bounds_and_dynamic_masks_are_refused():
    spec = maskdsl.parse("layout s = grid(16)\nmask m = sliding_window(3)\nmask t = topk(k=1, block=16)")
    with pytest.raises(ValueError, match="rise strictly"):
        halo_plan(spec.masks[0].expr, (16,), (0, 8, 8, 16))
    with pytest.raises(ValueError, match="ring pass"):
        halo_plan(spec.masks[1].expr, (16,), (0, 8, 16))
    with pytest.raises(ValueError, match="cannot shard"):
        even_bounds(4, 5)
