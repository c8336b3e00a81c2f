"""The simulator's Gluon-forward verdict (simulator.gluon: maskdsl.analysis.gluon_rule's) and its constants: which
masks the Hopper kernel runs, that a prediction says so, that a GPU without Gluon constants predicts the
template, and that the fit recovers a planted Gluon tile cost."""

import math

import numpy as np
import pytest

from maskdsl.lang.parser import parse
from maskdsl.simulator.calibrate import Measurement, evaluate_fit, fit
from maskdsl.simulator.cost import CostModel
from maskdsl.simulator.gluon import gluon_plan
from maskdsl.simulator.simulation import simulate


def _spec(grid: str, expr: str, head_dim: int = 128, dtype: str = "bf16", heads: int = 4):
    return parse(f"layout g = grid({grid})\nmask m = {expr}\n"
                 f"attention a(mask=m, heads={heads}, head_dim={head_dim}, dtype={dtype})\n")


def _plan(grid, expr, q, k, **kw):
    spec = _spec(grid, expr, **{a: b for a, b in kw.items() if a in ("head_dim", "dtype")})
    mdef = spec.mask("m")
    att = spec.attention_for("m")
    return gluon_plan(mdef.expr, mdef.layout.shape, q, k, True, att.head_dim, att.dtype, mdef.dynamic)


@pytest.mark.parametrize("expr", ["full", "block(2048)", "neighborhood(window=2048, stride=256)",
                                  "block(256) | block(1024)"])
@pytest.mark.parametrize("q,k", [((64,), (64,)), ((128,), (64,)), ((32,), (128,))])
def test_1d_block_sparse_masks_run_gluon_at_its_own_128_tiles(expr, q, k):
    plan = _plan("8192", expr, q, k)
    assert plan.eligible, plan.reason
    assert plan.q_tile == plan.kv_tile == (128,)


@pytest.mark.parametrize("expr", ["sliding_window(2048)", "causal", "block(128) | sink(128)",
                                  "sliding_window(4096, causal=true) | sink(4)"])
def test_1d_masks_with_partial_tiles_or_two_runs_take_the_predicated_mode(expr):
    """Partial diagonal tiles, a causal mask, two runs of key tiles: gluon_rule's "runs" mode takes them."""
    for grid in ("8192", "8000"):  # a ragged last tile too
        plan = _plan(grid, expr, (64,), (64,))
        assert plan.eligible and plan.predicated, plan.reason
    full = _plan("8192", "block(2048)", (64,), (64,))
    assert full.eligible and not full.predicated


@pytest.mark.parametrize("expr,why", [
    ("dilated(window=1024, dilation=4)", "dilated"),
])
def test_1d_masks_the_gluon_kernel_refuses(expr, why):
    plan = _plan("8192", expr, (128,), (128,))
    assert not plan.eligible and why in plan.reason


def test_1d_with_leading_unit_dimensions_is_a_token_order():
    plan = _plan("1, 8192", "block((1, 1024))", (1, 64), (1, 64))
    assert plan.eligible and plan.q_tile == (1, 128)


HUNYUAN = ("30, 48, 80", "neighborhood(window=(18, 24, 24), stride=(16, 8, 8))")


def test_3d_gna_runs_gluon_only_with_128_token_tiles_of_the_config():
    assert _plan(*HUNYUAN, (2, 8, 8), (2, 8, 8)).eligible
    assert "128 tokens" in _plan(*HUNYUAN, (2, 8, 8), (1, 8, 8)).reason
    whole = _plan(*HUNYUAN, (2, 8, 8), (2, 8, 8))
    assert whole.eligible and not whole.predicated


@pytest.mark.parametrize("grid,expr", [
    ("30, 48, 80", "neighborhood(window=(18, 24, 24))"),  # NA: partial tiles at every window edge
    ("16, 44, 80", "neighborhood(window=(16, 24, 16), stride=(1, 8, 16))"),  # ragged: 44 is no multiple of 8
])
def test_one_product_term_on_a_grid_takes_the_box_predicate(grid, expr):
    plan = _plan(grid, expr, (2, 8, 8), (2, 8, 8))
    assert plan.eligible and plan.predicated, plan.reason
    small = _plan(grid, expr, (2, 8, 8), (2, 8, 8), head_dim=64)  # maskdsl.analysis.gluon_rule.BOX_HEAD_DIMS: 128 only
    assert not small.eligible and "head_dim 128 only" in small.reason


def test_masked_tiles_of_the_box_mode_pay_the_predicate_premium():
    """NA on a 32 x 32 grid at 8 x 16 tiles, one head (8 CTAs, one wave): the slowest query tile's
    time from the planted constants and a brute-force count of its full and masked key tiles."""
    from maskdsl.harness.semantics import static_mask

    spec = _spec("32, 32", "neighborhood(window=(9, 9))", heads=1)
    r = simulate(spec, "m", (8, 16), (8, 16), costs=CostModel.from_entry("H", GLUON_ENTRY))
    assert r.gluon
    m = static_mask(spec.mask("m").expr, (32, 32)).numpy()
    x, y = np.divmod(np.arange(1024), 32)
    tile = (x // 8) * 2 + y // 16  # tile-major index of a token's 8 x 16 tile
    slowest, masked_tiles = 0.0, 0
    for qt in range(8):
        seen = np.array([m[np.ix_(tile == qt, tile == kt)].sum() for kt in range(8)])
        full, masked = int((seen == 128 * 128).sum()), int(((seen > 0) & (seen < 128 * 128)).sum())
        slowest = max(slowest, (full + masked) * 0.8 + masked * (1.3 - 1.0) + 1.5)
        masked_tiles += masked
    assert masked_tiles > 0  # the window cuts tiles: the premium is exercised
    assert r.predicted_ms == pytest.approx((slowest * 2.0 + 5.0) / 1000)


def test_a_union_on_a_grid_with_partial_tiles_is_refused():
    plan = _plan("32, 32", "neighborhood(window=(9, 9)) | block((8, 8))", (8, 16), (8, 16))
    assert not plan.eligible and "union of 2 product terms" in plan.reason


@pytest.mark.parametrize("grid,expr,kw,why", [
    ("64, 64", "dilated(window=(16, 16), dilation=(2, 2))", {}, "dilated"),
    ("8192", "block(1024)", {"head_dim": 96}, "head_dim"),
    ("8192", "block(1024)", {"dtype": "fp32"}, "dtype"),
])
def test_other_refusals(grid, expr, kw, why):
    rank = grid.count(",") + 1
    tile = {1: (128,), 2: (8, 16), 3: (2, 8, 8), 4: (1, 1, 8, 16)}[rank]
    plan = _plan(grid, expr, tile, tile, **kw)
    assert not plan.eligible and why in plan.reason


GLUON_ENTRY = {"c_full": 1.0, "c_partial": 1.3, "c_tile": 1.5, "sms": 132, "tile_us": 2.0, "launch_us": 5.0,
               "c_gluon": 0.8}


def test_prediction_says_which_forward_and_uses_the_gluon_tiles_on_1d():
    spec = _spec("32768", "block(2048)", heads=8)
    with_gluon = CostModel.from_entry("H", GLUON_ENTRY)
    template = CostModel.from_entry("H", {k: v for k, v in GLUON_ENTRY.items() if "gluon" not in k})
    a = simulate(spec, "m", (64,), (64,), costs=with_gluon)
    b = simulate(spec, "m", (128,), (128,), costs=with_gluon)
    assert a.gluon and b.gluon and a.to_dict()["gluon"] is True
    assert a.predicted_ms == pytest.approx(b.predicted_ms)  # the kernel's tiles, whatever the config's
    # 256 query tiles x 8 heads of 16 full tiles each + the (shared) CTA cost, 132 SMs one CTA each, plus launch
    waves = math.ceil(256 * 8 / 132)
    assert b.predicted_ms == pytest.approx((waves * (16 * 0.8 + 1.5) * 2.0 + 5.0) / 1000)
    t = simulate(spec, "m", (128,), (128,), costs=template)
    assert not t.gluon and any("do not model it" in n for n in t.notes)
    assert t.predicted_ms > b.predicted_ms
    w = simulate(_spec("32768", "dilated(window=2048, dilation=2)"), "m", (128,), (128,), costs=with_gluon)
    assert not w.gluon


def test_fit_recovers_a_planted_gluon_tile_cost():
    """Synthetic timings from known constants (Gluon cases among template ones): the fit gets them back."""
    truth = CostModel.from_entry("H", {**GLUON_ENTRY, "c_gluon": 0.7})
    cases = [("32768", "block(2048)", (128,), 8), ("32768", "neighborhood(window=2048, stride=256)", (64,), 2),
             ("16384", "full", (128,), 16), ("8192", "block(1024)", (64,), 40),
             ("16384", "dilated(window=1024, dilation=2)", (128,), 8),
             ("16384", "dilated(window=2048, dilation=4)", (64,), 4),
             ("16384", "dilated(window=4096, dilation=2)", (128,), 16),
             ("8192", "dilated(window=512, dilation=8)", (128,), 24)]
    meas = []
    for grid, expr, tile, heads in cases:
        spec = _spec(grid, expr, heads=heads)
        for k in ((64,), (128,)):
            r = simulate(spec, "m", tile, k, costs=truth)
            meas.append(Measurement(spec, "m", tile, k, heads, r.predicted_ms, case=f"{expr}/{heads}",
                                    path="gluon" if r.gluon else "triton"))
    assert sum(m.path == "gluon" for m in meas) == 8
    entry = fit(meas, "H", betas=(1.0,))
    assert entry["c_gluon"] * entry["tile_us"] == pytest.approx(0.7 * 2.0, rel=0.02)
    assert entry["c_tile"] * entry["tile_us"] == pytest.approx(1.5 * 2.0, rel=0.05)
    rows = evaluate_fit(meas, entry, "H")
    assert max(abs(r["ratio"] - 1) for r in rows) < 0.02
    assert [r["gluon"] for r in rows] == [m.path == "gluon" for m in meas]


def test_a_template_timing_of_an_eligible_mask_stays_a_template_timing():
    """Runs older than the Gluon forward (no path) timed the template: the fit must not read them as Gluon."""
    spec = _spec("16384", "block(1024)")
    entry = {**GLUON_ENTRY}
    m = Measurement(spec, "m", (128,), (128,), 4, 1.0, case="x")
    row, = evaluate_fit([m], entry, "H")
    assert row["gluon"] is False
    row, = evaluate_fit([Measurement(spec, "m", (128,), (128,), 4, 1.0, case="x", path="gluon")], entry, "H")
    assert row["gluon"] is True
    assert np.isfinite(row["predicted_ms"])


@pytest.mark.parametrize("grid,expr", [("8192", "sliding_window(1024, causal=true) | sink(4)"), ("4000", "causal"),
                                       ("8192", "sliding_window(2048)")])
def test_predicated_dispatch_order_is_the_kernels(grid, expr):
    """The simulator schedules the predicated Gluon forward's CTAs in the order codegen's table holds them
    (longest first, the long tiles head-major ahead of every head's rest), from its own tile counts."""
    from maskdsl.codegen.config import default_config
    from maskdsl.codegen.gluon_plan import plan_ranges, row_table
    from maskdsl.codegen.plan import build_plan

    spec = _spec(grid, expr, heads=3)
    work = simulate(spec, "m", (64,), (64,), costs=CostModel.from_entry("H", GLUON_ENTRY)).work.gluon_work
    mask = spec.mask("m")
    ranges = plan_ranges(build_plan(mask, default_config(mask)), modes=("runs",))
    assert ranges.ok and work is not None and work.order is not None
    busy = np.flatnonzero(np.asarray(simulate(spec, "m", (128,), (128,)).visits_per_query_tile) > 0)
    assert busy[work.order].tolist() == row_table(ranges)[:, 2].tolist()
    assert work.long == ranges.long


def test_a_sinks_long_tiles_start_first_on_every_head():
    """A window with sinks: query tile 0 walks every key tile. Dispatched head-major first, the four
    heads' long tiles run side by side at the start; in tile order (the template's) head 3's starts after
    the other heads' work and ends late. Hand count: 64 query tiles per head, tile 0 walks 64 key tiles,
    tiles 1-8 walk 1 + t (the causal ramp, the sink's tile among them) and 9-63 walk 10 (the window's 9
    plus the sink's)."""
    from dataclasses import replace

    spec = _spec("8192", "sliding_window(1024, causal=true) | sink(4)", heads=4)
    model = CostModel.from_entry("H", {**GLUON_ENTRY, "sms": 32, "launch_us": 0.0, "c_tile": 0.0, "c_gluon": 1.0})
    r = simulate(spec, "m", (128,), (128,), costs=model)
    work = r.work.gluon_work
    assert r.gluon and work.long == 1
    visits = [64] + [1 + t for t in range(1, 9)] + [10] * 55
    assert work.full.tolist() == visits
    # greedy list scheduling ends within one job of the mean load once the long ones (64 < mean) are placed
    mean = 4 * sum(visits) / 32
    assert mean * 2.0 / 1000 <= r.predicted_ms <= (mean + 10) * 2.0 / 1000
    # tile order: head 3's tile 0 starts once the 3 heads before it are placed (no earlier than their
    # work spread over the 32 SMs, less one short job), then runs 64
    tile_order = model.schedule(replace(work, order=None, long=0)).time
    assert tile_order >= 3 * sum(visits) / 32 - 10 + 64
