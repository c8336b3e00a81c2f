"""Fitting the cost constants, and predicting cases the fit never saw (leave-one-case-out)."""

import pytest

import maskdsl
from maskdsl.simulator import CostModel, simulate
from maskdsl.simulator.calibrate import (Measurement, cross_validate, fit, format_cross_validation, store,
                                         summarize)

CASES = {  # small problems that still differ in what the constants multiply
    "nb2d": ("layout g = grid(48, 48)\nmask m = neighborhood(window=13)\n", 24, 64, [((8, 8), 4), ((8, 16), 8)]),
    "block2d": ("layout g = grid(64, 64)\nmask m = block(16)\n", 4, 128, [((8, 8), 4), ((16, 8), 8)]),
    "win1d": ("layout g = grid(4096)\nmask m = sliding_window(513)\n", 1, 128, [((128,), 8), ((64,), 4)]),
    "causal": ("layout g = grid(2048)\nmask m = causal\n", 16, 128, [((128,), 8), ((64,), 4)]),
    "sink": ("layout g = grid(4096)\nmask m = sliding_window(256, causal=true) | sink(4)\n", 8, 128,
             [((128,), 8), ((64,), 4)]),
    "topk": ("layout g = grid(4096)\nmask m = topk(k=4, block=128)\n", 8, 128, [((128,), 8), ((64,), 4)]),
    "nb3d": ("layout g = grid(6, 20, 20)\nmask m = neighborhood(window=(3, 7, 7), stride=(1, 2, 2))\n", 12, 64,
             [((2, 4, 8), 4), ((1, 8, 16), 8)]),
}
TRUTH = CostModel(name="Truth", c_full=1.0, c_partial=1.5, c_tile=4.0, sms=132, tile_us=2.0, pair_exponent=0.8,
                  c_union=4.5, launch_us=8.0, dense_tile_us=1.5, dense_cta=2.0)


def measurements(truth=TRUTH):
    """Times made by chosen constants (the forward model is tested on its own in test_simulator_waves)."""
    out = []
    for case, (text, heads, dim, configs) in CASES.items():
        spec = maskdsl.parse(text + f"attention a(mask=m, heads={heads}, head_dim={dim})\n")
        for tile, warps in configs:
            r = simulate(spec, "m", tile, num_warps=warps, num_stages=3, costs=truth)
            out.append(Measurement(spec, "m", tile, tile, heads, r.predicted_ms, warps, 3,
                                   dense_ms=r.predicted_dense_time * truth.tile_us / 1000, case=case))
    return out


@pytest.fixture(scope="module")
def meas():
    return measurements()


def test_fit_recovers_the_constants_that_made_the_times(meas):
    entry = fit(meas, "Test GPU", source="synthetic")
    assert entry["pair_exponent"] == pytest.approx(0.8)
    assert entry["tile_us"] == pytest.approx(2.0, rel=1e-4)
    for key, want in (("c_partial", 1.5), ("c_tile", 4.0), ("c_union", 4.5), ("launch_us", 8.0),
                      ("dense_tile_us", 1.5), ("dense_cta", 2.0)):
        assert entry[key] == pytest.approx(want, rel=1e-3), key
    assert entry["fit_rms_relative_error"] < 1e-6 and entry["fitted_cases"] == sorted(CASES)


def test_cross_validation_predicts_each_case_from_a_fit_without_it(meas):
    rows = cross_validate(meas, "Test GPU", folds="loo")
    assert len(rows) == len(meas) and {r["case"] for r in rows} == set(CASES)
    by_case = {r["case"]: r for r in rows}
    # the top-k case is the only one running the union loop: held out, nothing fits c_union and it falls
    # back to c_partial, so that case is mispredicted out of sample (and only that one), which an
    # in-sample fit would hide
    assert by_case["topk"]["ratio"] > 1.2
    assert all(r["ratio"] == pytest.approx(1.0, rel=1e-3) for r in rows if r["case"] != "topk")
    assert all(r["measured_speedup"] == pytest.approx(r["dense_ms"] / r["measured_ms"]) for r in rows)
    s = summarize(rows)
    assert s["cases"] == len(CASES) and s["worst_case"] == "topk" and s["within_15_percent"] == len(CASES) - 1
    table = format_cross_validation(rows)
    assert "held-out case" in table and f"{len(CASES) - 1}/{len(CASES)} within 15%" in table


def test_k_folds_and_bad_folds(meas):
    rows = cross_validate(meas, "Test GPU", folds=3)
    assert sorted({r["fold"] for r in rows}) == [0, 1, 2]
    with pytest.raises(ValueError, match="folds must be 'loo' or an int"):
        cross_validate(meas, "Test GPU", folds=1)
    with pytest.raises(ValueError, match="at least 5 measurements of 3 cases"):
        fit(meas[:2], "Test GPU")


def test_a_stored_fit_is_what_the_simulator_then_uses(meas, tmp_path):
    entry = fit(meas, "Test GPU", source="synthetic")
    path = store(entry, "Test GPU", tmp_path / "costs.json")
    spec = meas[0].spec
    got = simulate(spec, "m", meas[0].q_tile, num_warps=4, num_stages=3, gpu="Test GPU", costs=path)
    assert got.predicted_ms == pytest.approx(meas[0].ms, rel=1e-3) and got.cost_source == "synthetic"


def test_shipped_entries_say_where_they_come_from(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKDSL_CACHE_DIR", str(tmp_path))  # no fit of this machine's own
    monkeypatch.delenv("MASKDSL_GPU_COSTS", raising=False)
    h100, h200 = CostModel.for_gpu("h100"), CostModel.for_gpu("h200")
    assert not h100.placeholder and not h200.placeholder and "H200" in h200.source and "H100" in h100.source
    assert h200.dense_tile_us and h200.tile_us and h200.c_union is not None
