"""The Gluon forward's per-dimension predicate on multi-dimensional grids (gluon_rule's "boxes" mode), on the CPU.

The kernel cannot run here (no Hopper GPU, no Gluon interpreter); what it attends is rebuilt from
the tables it reads (`applied`: the key-tile box, the tiles it leaves unmasked, each
row's interval per dimension) and compared with the [L, L] reference mask of the mask's exact
definition, row by row, on ragged grids and masks whose tiles are partial. Its sm_90 compile is in
test_gluon (`3d-box`).
"""

import numpy as np
import pytest
import torch

import maskdsl
from maskdsl.codegen.config import KernelConfig, default_config
from maskdsl.analysis.tile_table import WIDTH
from maskdsl.codegen.gluon_plan import GluonSchedule, plan_ranges
from maskdsl.codegen.plan import build_plan
from maskdsl.harness.semantics import static_mask

# (layout, mask, query tile, key tile): ragged extents, partial window edges, both
CASES = [
    ("grid(12, 20)", "neighborhood(window=(5, 7))", (4, 8), (4, 8)),  # NA: every window edge cuts tiles
    ("grid(6, 10, 20)", "neighborhood(window=(4, 8, 8), stride=(2, 4, 4))", (2, 4, 4), (2, 4, 4)),  # GNA, ragged
    ("grid(5, 9, 11)", "neighborhood(window=(3, 5, 5))", (2, 4, 8), (2, 8, 4)),  # ragged in every dimension
    ("grid(7, 13, 16)", "neighborhood(window=(3, 6, 8), stride=(1, 4, 8))", (1, 8, 16), (2, 8, 8)),
    ("grid(6, 10)", "block((2, 4))", (4, 4), (4, 4)),  # blocks that cut tiles
    ("grid(9, 9)", "full", (4, 4), (4, 8)),  # a dense ragged grid: only the overhang is masked
]


def applied(ranges, tile: int) -> np.ndarray:
    """[rows of query tile `tile` inside the grid, keys of the grid] bool: what the kernel attends, rebuilt
    from the schedule's boxes, full boxes and per-dimension row bounds as the kernel reads them."""
    shape, kv_tile = np.array(ranges.shape), np.array(ranges.kv_tile)
    keys = np.stack(np.unravel_index(np.arange(int(np.prod(shape))), ranges.shape), axis=1)
    rows = ranges.rows(np.array([tile]))
    out = np.zeros((len(rows), len(keys)), bool)
    if not (ranges.hi[tile] > ranges.lo[tile]).all():
        return out
    kt = keys // kv_tile
    in_box = ((kt >= ranges.lo[tile]) & (kt < ranges.hi[tile])).all(1)
    full = ((kt >= ranges.full_lo[tile]) & (kt < ranges.full_hi[tile])).all(1)
    row_xy = np.stack(np.unravel_index(rows, ranges.shape), axis=1)
    offs = np.concatenate([[0], np.cumsum(2 * shape)])
    lo = np.stack([ranges.bounds[offs[d] + row_xy[:, d]] for d in range(3)], axis=1)
    hi = np.stack([ranges.bounds[offs[d] + shape[d] + row_xy[:, d]] for d in range(3)], axis=1)
    sees = ((keys[None] >= lo[:, None]) & (keys[None] <= hi[:, None])).all(2)
    out[:] = in_box[None] & (full[None] | sees)
    return out


def _plan(layout, text, config=None):
    mask = maskdsl.parse(f"layout g = {layout}\nmask m = {text}").masks[0]
    return mask, build_plan(mask, config or default_config(mask))


@pytest.mark.parametrize("layout, text, qt, kt", CASES, ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_the_mask_the_kernel_applies_is_the_reference(layout, text, qt, kt):
    mask, plan = _plan(layout, text)
    ranges = plan_ranges(plan, qt, kt, ("boxes",))
    assert ranges.ok, ranges.reason
    want = static_mask(mask.expr, mask.layout.shape).numpy()
    n_tiles = len(ranges.lo)
    covered = np.zeros(want.shape[0], bool)
    for t in range(n_tiles):
        rows = ranges.rows(np.array([t]))
        covered[rows] = True
        np.testing.assert_array_equal(applied(ranges, t), want[rows], err_msg=f"query tile {t}")
    assert covered.all()  # every row of the grid belongs to one query tile
    # the predicate is needed somewhere (else the whole-tile mode would have taken it) but not everywhere
    busy = ranges.busy
    full = ((ranges.lo[busy] >= ranges.full_lo[busy]) & (ranges.hi[busy] <= ranges.full_hi[busy])).all(1)
    assert not full.all()


def test_the_schedule_table_holds_the_box_and_the_full_box():
    _, plan = _plan("grid(6, 10, 20)", "neighborhood(window=(4, 8, 8), stride=(2, 4, 4))")
    ranges = plan_ranges(plan, (2, 4, 4), (2, 4, 4), ("boxes",))
    schedule = GluonSchedule(ranges)
    assert schedule.boxes  # the head_dim gate reads this (codegen.dispatch.head_dim_blocker)
    assert schedule.table.shape == (len(ranges.busy), WIDTH["boxes"]) and schedule.table.dtype == np.int32
    row = schedule.table[5]
    t = int(ranges.busy[5])
    assert row[:3].tolist() == ranges.coords(np.array([t]))[0].tolist()
    assert row[3:9].tolist() == np.stack([ranges.lo[t], ranges.hi[t]], 1).reshape(-1).tolist()
    assert row[9:].tolist() == np.stack([ranges.full_lo[t], ranges.full_hi[t]], 1).reshape(-1).tolist()
    table, idle, bounds = schedule.on("cpu")
    assert bounds.dtype == torch.int32 and bounds.shape == (2 * (6 + 10 + 20),)


def test_rows_of_a_ragged_tile_stop_at_the_grid():
    _, plan = _plan("grid(5, 9, 11)", "neighborhood(window=(3, 5, 5))")
    ranges = plan_ranges(plan, (2, 4, 8), (2, 8, 4), ("boxes",))
    last = ranges.rows(np.array([len(ranges.lo) - 1]))  # tile (2, 2, 1): one plane, one row, three columns
    coords = np.stack(np.unravel_index(last, (5, 9, 11)), axis=1)
    assert coords.tolist() == [[4, 8, 8], [4, 8, 9], [4, 8, 10]]


def test_refusals_name_the_reason():
    cfg = KernelConfig((4, 4), (4, 4), 4, 2)
    union = "neighborhood(window=(3, 3)) | block((4, 4))"
    union_plan = _plan("grid(8, 8)", union, cfg)[1]
    assert "union of 2 product terms" in plan_ranges(union_plan, (4, 4), (4, 4), ("boxes",)).reason
    assert "1-D" in plan_ranges(_plan("grid(512)", "sliding_window(65)")[1], modes=("boxes",)).reason
    dilated = "dilated(window=(3, 3), dilation=(2, 2))"
    assert "dilat" in plan_ranges(_plan("grid(16, 16)", dilated, cfg)[1], (4, 4), (4, 4), ("boxes",)).reason
    small = _plan("grid(16, 16)", "neighborhood(window=(3, 3))", cfg)[1]
    assert "128 tokens" in plan_ranges(small, modes=("boxes",)).reason


def test_the_predicate_runs_head_dim_128_only():
    from maskdsl.codegen.dispatch import head_dim_blocker

    assert head_dim_blocker(128) is None
    assert "head_dim 64" in head_dim_blocker(64) and "128 only" in head_dim_blocker(64)
