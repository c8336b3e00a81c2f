"""The Gluon forward's predicated 1-D mode (gluon_rule's "runs" mode) against the reference mask.

The kernel itself needs a Hopper GPU; what it computes is fixed by its tables: each query tile walks
its runs of 128-key tiles, masks S with the rows' key intervals on each run's first and last tile (on
every tile where the row's flag says so), and takes every other tile whole. These tests rebuild the
mask that procedure applies, from the tables alone, and require it to equal the reference mask.
"""

import numpy as np
import pytest

import maskdsl
from maskdsl.codegen.config import default_config
from maskdsl.analysis.gluon_rule import row_key_intervals
from maskdsl.codegen.gluon_plan import plan_ranges, plan_terms, row_table
from maskdsl.codegen.plan import build_plan
from maskdsl.analysis.row_runs import BLOCK
from maskdsl.harness.semantics import static_mask

# (layout, mask, runs on Gluon): odd extents leave a ragged last tile
CASES = [
    ("grid(700)", "causal", True),
    ("grid(1000)", "sliding_window(300, causal=true) | sink(4)", True),
    ("grid(1000)", "sliding_window(129)", True),
    ("grid(777)", "sliding_window(257)", True),
    ("grid(900)", "sink(3) | causal", True),  # one interval per row: [0, i]
    ("grid(1024)", "block(200)", True),
    ("grid(1000)", "neighborhood(window=250, stride=100)", True),
    ("grid(1, 640)", "neighborhood(window=(1, 201), causal=(false, true)) | full & sink(8)", True),  # extent-1 outer dim
    ("grid(1000)", "sink(4) & causal", True),
    ("grid(1200)", "sliding_window(100) | sliding_window(101, causal=true) | sink(2)", True),
    ("grid(1000)", "dilated(window=9, dilation=4)", False),  # every 4th key: not an interval
    ("grid(2000)", "sliding_window(65) | block(1000) & sink(1)", True),
    ("grid(12, 40)", "causal", False),  # a 2-D grid: boxes, not runs
]


def _plan(layout, text):
    mask = maskdsl.parse(f"layout g = {layout}\nmask m = {text}").masks[0]
    return mask, build_plan(mask, default_config(mask))


def applied_mask(ranges, n: int, keys: int | None = None) -> np.ndarray:
    """The [n, keys] mask the kernel applies, rebuilt from the table and bounds (module docstring)."""
    lo, hi = ranges.bounds[:, 0, :], ranges.bounds[:, 1, :]  # [SLOTS, n]
    m = n if keys is None else keys
    cols = np.arange(m)
    predicate = ((cols[None, None, :] >= lo[:, :, None]) & (cols[None, None, :] <= hi[:, :, None])).any(0)
    out = np.zeros((n, m), bool)
    for row in row_table(ranges):
        t = int(row[2])
        rows = slice(t * BLOCK, min((t + 1) * BLOCK, n))
        runs = [(int(row[7]), int(row[8])), (int(row[9]), int(row[10]))]
        for a, b in runs:
            for j in range(a, b):
                cols = slice(j * BLOCK, min((j + 1) * BLOCK, m))
                if row[11] or j in (a, b - 1):
                    out[rows, cols] = predicate[rows, cols]
                else:
                    assert (j + 1) * BLOCK <= m, "an unmasked tile past the keys' end"
                    out[rows, cols] = True
    return out


@pytest.mark.parametrize("layout, text, ok", CASES, ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_the_kernels_mask_equals_the_reference(layout, text, ok):
    mask, plan = _plan(layout, text)
    got = plan_ranges(plan, modes=("runs",))
    assert got.ok == ok, got.reason
    if not ok:
        return
    n = mask.layout.tokens
    want = static_mask(mask.expr, mask.layout.shape).numpy()
    np.testing.assert_array_equal(applied_mask(got, n), want)
    # the rows no query tile of the table holds are exactly the rows that attend nothing
    idle = got.rows(got.idle)
    assert not want[idle].any()
    held = np.zeros(n, bool)
    for t in row_table(got)[:, 2]:
        held[t * BLOCK:(t + 1) * BLOCK] = True
    held[idle] = True
    assert held.all()


def test_intervals_are_exact_sorted_and_disjoint():
    mask, plan = _plan("grid(500)", "sliding_window(60, causal=true) | sink(5) | block(100)")
    iv = row_key_intervals(plan_terms(plan), plan.shape[-1])
    want = static_mask(mask.expr, mask.layout.shape).numpy()
    for i in range(500):
        ranges = [(a, b) for a, b in iv[i] if a <= b]
        assert all(b1 + 1 < a2 for (_, b1), (a2, _) in zip(ranges, ranges[1:])), ranges  # merged
        row = np.zeros(500, bool)
        for a, b in ranges:
            row[a:b + 1] = True
        np.testing.assert_array_equal(row, want[i], err_msg=f"row {i}")


def test_flags_only_where_a_run_has_a_partial_tile_inside():
    """A causal window with sinks: only the sink rows' tile (it sees every key) and the tiles where the
    window meets the sink predicate every tile; the rest mask their runs' edges only."""
    _, plan = _plan("grid(4096)", "sliding_window(1024, causal=true) | sink(4)")
    table = row_table(plan_ranges(plan, modes=("runs",)))
    flagged = table[table[:, 11] == 1, 2].tolist()
    assert 0 in flagged and len(flagged) <= 3, flagged
    assert (table[:, 9:11] != 0).any(), "the sink's run and the window's should be two runs"


def test_refusals_name_the_reason():
    _, plan = _plan("grid(1000)", "dilated(window=9, dilation=4)")
    assert "dilated" in plan_ranges(plan, modes=("runs",)).reason
    _, plan = _plan("grid(12, 40)", "causal")
    assert "1-D" in plan_ranges(plan, modes=("runs",)).reason


def test_long_tiles_lead_the_table_and_equal_ones_keep_their_order():
    """The sink rows' tile (every key) leads; the window's equal tiles follow in tile order (L2
    sharing), the shorter first tiles of the sequence last."""
    _, plan = _plan("grid(8192)", "sliding_window(1024, causal=true) | sink(4)")
    got = plan_ranges(plan, modes=("runs",))
    table = row_table(got)
    work = (table[:, 8] - table[:, 7]) + (table[:, 10] - table[:, 9])
    assert (np.diff(work) <= 0).all()
    assert got.long == 1 and table[0, 2] == 0 and work[0] == 64  # tile 0 walks all 64 key tiles
    equal = table[work == work[1], 2]
    assert (np.diff(equal) > 0).all()
    _, plan = _plan("grid(4096)", "causal")
    got = plan_ranges(plan, modes=("runs",))
    assert got.long == 0 and row_table(got)[:, 2].tolist() == list(range(31, -1, -1))  # longest first


@pytest.mark.parametrize("text", ["sliding_window(300, causal=true) | sink(4)", "sliding_window(257)", "causal"])
def test_a_segments_schedule_is_the_mask_cut_to_its_rows_and_buffer(text):
    """Context parallelism's segments: rows [qa, qb) over keys [ka, kb) of a 1000-token grid (buffers that
    start off the 128-key tiles, the grid's ragged end, a buffer shorter than the rows)."""
    from maskdsl.analysis.gluon_rule import segment_ranges

    mask, plan = _plan("grid(1000)", text)
    whole = plan_ranges(plan, modes=("runs",))
    want = static_mask(mask.expr, mask.layout.shape).numpy()
    for (qa, qb), (ka, kb) in [((0, 500), (0, 500)), ((500, 1000), (200, 500)), ((500, 1000), (500, 1000)),
                               ((256, 640), (64, 320)), ((896, 1000), (0, 64))]:
        seg = segment_ranges(whole, (qa, qb), (ka, kb))
        assert seg.ok, seg.reason
        assert seg.keys == kb - ka and seg.shape[-1] == qb - qa
        np.testing.assert_array_equal(applied_mask(seg, qb - qa, kb - ka), want[qa:qb, ka:kb],
                                      err_msg=f"rows {qa}-{qb}, keys {ka}-{kb}")
        assert not want[qa:qb, ka:kb][seg.rows(seg.idle)].any()
