"""The load-latency term (simulator.pipeline): a slot computes or waits for its K/V loads, the top-k
kernel's unpipelined loop, and the fit finding the latency that made the times."""

import dataclasses
import itertools

import pytest

import maskdsl
from maskdsl.spec import ir
from maskdsl.codegen.topk.grid import TopKGrid
from maskdsl.simulator import simulate
from maskdsl.simulator.calibrate import Measurement, fit
from maskdsl.simulator.pipeline import split, tile_slot_time
from maskdsl.harness.topk import normal_form

from test_simulator_crossval import TRUTH


def test_slot_time_per_tile_by_hand():
    # pipelined, s stages: s - 1 loads in flight, so at most s - 1 tiles per latency (Little's law)
    assert tile_slot_time(1.0, 1, 2, True, 1.5) == 1.5  # one load in flight does not cover 1.5
    assert tile_slot_time(1.0, 1, 3, True, 1.5) == 1.0  # two do
    assert tile_slot_time(1.0, 2, 2, True, 1.5) == 2.0  # two CTAs share the SM: compute binds
    # unpipelined: load, then compute; other CTAs on the SM fill the wait when there are enough
    assert tile_slot_time(1.0, 1, 3, False, 1.5) == 2.5
    assert tile_slot_time(1.0, 3, 3, False, 1.5) == 3.0
    assert tile_slot_time(1.0, 1, 1, True, 1.5) == 2.5  # one stage is no pipeline
    assert tile_slot_time(1.0, 1, 2, True, 0.0) == 1.0 and tile_slot_time(1.0, 1, 3, False, 0.0) == 1.0


@pytest.mark.parametrize("c,k,s,piped,load", itertools.product((0.3, 1.0, 2.5), (1, 2, 4), (1, 2, 3, 4),
                                                                (True, False), (0.0, 0.7, 1.5, 4.0)))
def test_the_fits_linear_form_is_the_slot_time_and_grows_with_the_latency(c, k, s, piped, load):
    cf, lf = split(c, k, s, piped, load)
    assert cf * c + lf * load == pytest.approx(tile_slot_time(c, k, s, piped, load))
    assert tile_slot_time(c, k, s, piped, load + 0.5) >= tile_slot_time(c, k, s, piped, load)
    assert tile_slot_time(c, k, s, piped, load) >= k * c  # never faster than the SM's compute


def _spec(layout, mask, extra="heads=8, head_dim=128"):
    return maskdsl.parse(f"layout g = grid({layout})\nmask m = {mask}\nattention a(mask=m, {extra})\n")


def test_a_short_two_stage_tile_waits_and_a_three_stage_one_does_not():
    spec = _spec("4096", "sliding_window(1025)")
    slow = dataclasses.replace(TRUTH, load_us=3.0)  # a 128x64 tile computes in 0.5^0.8 * 2 us = 1.15 us
    s2 = [simulate(spec, "m", (128,), (64,), num_warps=8, num_stages=2, costs=c).predicted_ms for c in (TRUTH, slow)]
    s3 = [simulate(spec, "m", (128,), (64,), num_warps=8, num_stages=3, costs=c).predicted_ms for c in (TRUTH, slow)]
    assert s2[1] > 2 * s2[0] * 0.9  # 3 us per tile instead of 1.15 (plus the fixed costs)
    assert s3[1] > s3[0]  # 1.5 us per tile: still waiting, less
    assert s2[1] > s3[1]
    s4 = [simulate(spec, "m", (128,), (64,), num_warps=8, num_stages=4, costs=c).predicted_ms for c in (TRUTH, slow)]
    assert s4[1] == s4[0]  # three loads in flight cover 3 us


TOPK_MASKS = [  # (grid, mask): which of them codegen.topk.forward runs in its pipelined fast loop
    ("4096", "topk(k=4, block=128)"),
    ("4000", "topk(k=4, block=128)"),  # the last block is cut: whole-tile loads no more
    ("4096", "topk(k=4, block=128) | sliding_window(256, causal=true)"),  # a static part
    ("4096", "topk(k=4, block=128) & causal"),  # a restriction
    ("16, 32", "topk(k=3, block=(4, 8))"),
]


@pytest.mark.parametrize("grid,mask", TOPK_MASKS)
def test_the_topk_pipelined_rule_is_codegens_fast_loop(grid, mask):
    spec = _spec(grid, mask)
    mdef = spec.mask("m")
    tile = (128,) if "," not in grid else (4, 8)
    form = normal_form(mdef.expr)
    g = TopKGrid(mdef.layout.shape, form.topk.block, tile)
    # codegen.topk.forward._context's rule: no static term, no restriction, blocks tiling the grid
    fast = form.static is None and isinstance(form.restrict, ir.Full) and g.exact
    work = simulate(spec, "m", tile, costs=TRUTH).work
    assert work.pipelined == fast
    slow = dataclasses.replace(TRUTH, load_us=2.0)
    # with every slot busy (a lone CTA in the last wave waits even when pipelined: schedule.shared_schedule)
    busy = lambda m: m.slot_features(work, m.pair_exponent, m.coefficients) @ m.coefficients  # noqa: E731
    waits = bool((busy(slow) > busy(TRUTH)).any())
    assert waits == (not fast)  # only the unpipelined loop waits (3 stages hide 2 us behind these tiles)


def test_the_fit_finds_the_load_latency_that_made_the_times():
    # constants near the H100's (the alternating fit is local: regimes chosen from a start near real GPUs)
    truth = dataclasses.replace(TRUTH, load_us=2.0, c_union=1.3, c_tile=2.0)
    cases = {"w1": _spec("4096", "sliding_window(513)"), "nb": _spec("48, 48", "neighborhood(window=13)"),
             "tk": _spec("4000", "topk(k=4, block=128)"), "bl": _spec("64, 64", "block(16)")}
    configs = [((128,), (64,), 8, 2), ((128,), (128,), 8, 3), ((64,), (64,), 4, 3)]
    configs2d = [((8, 16), (8, 8), 8, 2), ((8, 16), (8, 16), 8, 3), ((8, 8), (8, 8), 4, 3)]
    meas = []
    for case, spec in cases.items():
        for q, kv, warps, stages in (configs2d if case in ("nb", "bl") else configs):
            r = simulate(spec, "m", q, kv, num_warps=warps, num_stages=stages, costs=truth)
            meas.append(Measurement(spec, "m", q, kv, 8, r.predicted_ms, warps, stages, case=case))
    entry = fit(meas, "Test GPU", betas=(0.8,), loads=(0.0, 1.0, 2.0, 3.0))
    assert entry["load_us"] == 2.0 and entry["fit_rms_relative_error"] < 1e-6
    for key in ("c_partial", "c_tile", "c_union", "launch_us"):
        assert entry[key] == pytest.approx(getattr(truth, key), rel=1e-3), key
    # the same times fitted without the term cannot be matched
    assert fit(meas, "Test GPU", betas=(0.8,), loads=(0.0,))["fit_rms_relative_error"] > 0.01
