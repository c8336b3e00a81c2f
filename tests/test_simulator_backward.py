"""The simulator's backward: transposed counts against brute force, the schedule, the fit, `maskdsl simulate`."""

import math

import numpy as np
import pytest

import maskdsl
from maskdsl.cli import main
from maskdsl.codegen.config import BackwardConfig
from maskdsl.simulator.backward import backward_work, simulate_backward
from maskdsl.simulator.calibrate_backward import (BackwardMeasurement, cross_validate_backward, evaluate_backward,
                                                  fit_backward, format_evaluation, measurements_from_records)
from maskdsl.simulator.schedule import warpgroup_split
from maskdsl.simulator.cost import _BUILTIN, CostModel, _load

from sim_brute import brute_counts

CASES = [  # (mask, q tile, kv tile): odd extents make ragged tiles at both ends
    ("neighborhood(window=(3, 5), stride=(1, 2))", (2, 4), (4, 2)),
    ("neighborhood(window=(5, 3), dilation=(1, 2))", (4, 2), (2, 4)),  # dilation groups: tile-major per group
    ("neighborhood(window=(3, 5)) | sink(3)", (2, 4), (2, 2)),  # a union: the several-term path
    ("neighborhood(window=(5, 7), causal=(true, false))", (2, 2), (4, 2)),
]
H100 = "NVIDIA H100 80GB HBM3"


def _spec(expr, heads=4, kv_heads=2):
    return maskdsl.parse(f"layout g = grid(9, 11)\nmask m = {expr}\n"
                         f"attention a(mask=m, heads={heads}, kv_heads={kv_heads}, head_dim=64, dtype=bf16)\n")


@pytest.mark.parametrize("expr,q_tile,kv_tile", CASES)
def test_backward_counts_are_the_transposed_visits(expr, q_tile, kv_tile):
    spec = _spec(expr)
    counts, qs, ks = brute_counts(spec, q_tile, kv_tile, True)
    visited = counts > 0
    # the kernels' fully-seen boxes hold whole key tiles only: a ragged key tile always takes the predicate
    full = (counts == np.multiply.outer(qs, ks)) & (ks == math.prod(kv_tile))[None, :]
    union = "|" in expr
    dkdv = backward_work(spec, "m", "dkdv", q_tile, kv_tile)
    np.testing.assert_array_equal(dkdv.full + dkdv.partial, visited.sum(0))
    np.testing.assert_array_equal(dkdv.full, 0 if union else full.sum(0))
    dq = backward_work(spec, "m", "dq", q_tile, kv_tile)
    np.testing.assert_array_equal(dq.full + dq.partial, visited.sum(1))
    np.testing.assert_array_equal(dq.full, 0 if union else full.sum(1))
    # one dK/dV program per key tile and kv head sums the GQA group; one dQ program per query tile and head
    assert (dkdv.copies, dkdv.group, dq.copies, dq.group) == (2, 2, 4, 1)
    assert (dkdv.own, dkdv.other, dq.own, dq.other) == (math.prod(kv_tile), math.prod(q_tile),
                                                        math.prod(q_tile), math.prod(kv_tile))


def test_a_top_k_mask_has_no_backward_prediction():
    spec = maskdsl.parse("layout s = grid(256)\nmask t = topk(4, block=64)\n")
    with pytest.raises(ValueError, match="top-k"):
        backward_work(spec, "t", "dq", (64,), (64,))


def _synthetic(model, truth, case_suffix="", window=65):
    """Measurements made by a known model: the fit must find its constants again."""
    out = []
    for case, expr in (("a" + case_suffix, f"sliding_window({window})"),
                       ("b" + case_suffix, "sliding_window(33) | sink(4)")):
        spec = maskdsl.parse(f"layout s = grid(1024)\nmask m = {expr}\nattention a(mask=m, heads=16, head_dim=128)\n")
        for key in ("bwd-q64_k64_w4_s2-q128_k64_w8_s2", "bwd-q32_k128_w8_s2-q64_k32_w4_s3",
                    "bwd-q128_k64_w8_s3-q64_k64_w4_s2"):
            m = BackwardMeasurement(spec, "m", BackwardConfig.from_key(key), 1.0, case)
            from maskdsl.simulator.calibrate_backward import predict_ms

            out.append(BackwardMeasurement(spec, "m", m.config, predict_ms(truth, m), case))
    return out


def test_the_fit_recovers_the_constants_that_made_the_times():
    base = CostModel(name="G", c_full=1, c_partial=1, c_tile=1, sms=8, launch_us=5.0)
    # one cost per 128^3 product: a dK/dV pair is 4 products, a dQ pair 3 (0.75 us each here)
    truth = CostModel(**{**base.__dict__, "bwd_dkdv_us": 3.0, "bwd_dq_us": 2.25, "bwd_program_us": 2.0,
                         "bwd_partial": 1.5, "bwd_pair_exponent": 0.8})
    entry = fit_backward(_synthetic(base, truth), base, source="synthetic")
    assert entry["bwd_pair_exponent"] == 0.8 and entry["bwd_partial"] == 1.5
    assert entry["bwd_dkdv_us"] == pytest.approx(3.0, rel=1e-3)
    assert entry["bwd_dq_us"] == pytest.approx(2.25, rel=1e-3)
    assert entry["bwd_program_us"] == pytest.approx(2.0, rel=1e-3)
    assert entry["bwd_fit_rms_relative_error"] < 1e-6
    with pytest.raises(ValueError, match="at least 4 measurements"):
        fit_backward(_synthetic(base, truth)[:2], base)


def test_the_two_walks_share_one_cost_per_product():
    """Times made with a dQ pair as dear as a dK/dV one (not 3/4 of it) cannot be fitted exactly: the ratio
    is the products' count, not a free constant."""
    base = CostModel(name="G", c_full=1, c_partial=1, c_tile=1, sms=8, launch_us=5.0)
    truth = CostModel(**{**base.__dict__, "bwd_dkdv_us": 3.0, "bwd_dq_us": 3.0, "bwd_program_us": 2.0,
                         "bwd_partial": 1.5, "bwd_pair_exponent": 0.8})
    entry = fit_backward(_synthetic(base, truth), base, source="synthetic")
    assert entry["bwd_dkdv_us"] / entry["bwd_dq_us"] == pytest.approx(4 / 3)
    assert entry["bwd_fit_rms_relative_error"] > 1e-3


def test_backward_leave_one_case_out_predicts_each_case_from_the_others():
    base = CostModel(name="G", c_full=1, c_partial=1, c_tile=1, sms=8, launch_us=5.0)
    truth = CostModel(**{**base.__dict__, "bwd_dkdv_us": 3.0, "bwd_dq_us": 2.25, "bwd_program_us": 2.0,
                         "bwd_partial": 1.5, "bwd_pair_exponent": 0.8})
    meas = _synthetic(base, truth) + _synthetic(base, truth, case_suffix="2", window=97)
    rows = cross_validate_backward(meas, base)
    assert len(rows) == len(meas) and {r["fold"] for r in rows} == {m.case for m in meas}
    assert all(r["fold"] == r["case"] for r in rows)
    # the truth is in the model; the fit's alternation over the critical SM's pieces (the tail shared per SM,
    # schedule.shared_schedule) stops within 1% of it on three cases
    assert all(r["ratio"] == pytest.approx(1.0, rel=1e-2) for r in rows)
    assert "within 15%" in format_evaluation(rows)


def test_warpgroups_sharing_a_short_owned_tile_slow_its_products():
    # wgmma takes 64 rows per warpgroup: 8 warps (2 groups) on a 64-row tile do each product at half speed
    assert warpgroup_split(64, 8) == 2.0 and warpgroup_split(128, 8) == 1.0 and warpgroup_split(32, 8) == 4.0
    assert warpgroup_split(64, 4) == 1.0 and warpgroup_split(32, 4) == 1.0  # one group: the older MMA, not this
    spec = _spec("neighborhood(window=(3, 5))")
    w8 = backward_work(spec, "m", "dkdv", (4, 4), (8, 8), num_warps=8)
    w4 = backward_work(spec, "m", "dkdv", (4, 4), (8, 8), num_warps=4)
    f8, f4 = w8.features(0.9, 1.25), w4.features(0.9, 1.25)
    np.testing.assert_allclose(f8[:, 0], 2 * f4[:, 0])  # the walk doubles
    np.testing.assert_allclose(f8[:, 2], f4[:, 2])  # the program's fixed cost does not


def test_the_shipped_h100_backward_reproduces_its_recorded_measurements():
    entry = _load(_BUILTIN)[H100]
    assert "2026-11-25" in entry["bwd_measurements_source"] and "bench --train" in entry["bwd_measurements_source"]
    meas = measurements_from_records(entry["bwd_measurements"], BackwardConfig.from_key)
    # the first run's 16 timings and the ranked-default run's 20 (docs/bench/2026-11-25-train-*.json)
    assert len(meas) == 36 and {m.case for m in meas} == {"window_1d_32k", "neighborhood_2d", "gna_3d",
                                                          "hunyuan_gna_stride"}
    rows = evaluate_backward(meas, CostModel.for_gpu(H100))
    errors = sorted(abs(r["error"]) for r in rows)
    assert np.sqrt(np.mean(np.square(errors))) == pytest.approx(entry["bwd_fit_rms_relative_error"], rel=1e-3)
    # in sample, with the forward's H100 constants (they share the launch cost): median within 15%, worst within 30%
    assert errors[len(errors) // 2] < 0.15 and errors[-1] < 0.3
    for r in rows:
        if "dense_bwd_ms" in r:
            assert r["predicted_dense_bwd_ms"] == pytest.approx(r["dense_bwd_ms"], rel=0.1)


def test_simulate_backward_sums_its_kernels_and_compares_with_dense():
    spec = maskdsl.parse("layout s = grid(4096)\nmask m = sliding_window(257)\n"
                         "attention a(mask=m, heads=8, head_dim=128)\n")
    cfg = BackwardConfig.from_key("bwd-q64_k64_w4_s2-q128_k64_w8_s2")
    b = simulate_backward(spec, "m", cfg, gpu=H100)
    assert b.ms == pytest.approx(b.dkdv_ms + b.dq_ms) and b.label() == cfg.key()
    assert b.dense_ms > b.ms  # 257 of 4096 keys: far less work than dense
    assert simulate_backward(spec, "m", cfg, gpu="NVIDIA H200") is None  # not calibrated there


def test_cli_prints_the_backward_lines(tmp_path, capsys):
    path = tmp_path / "w.mask"
    path.write_text("layout s = grid(4096)\nmask m = sliding_window(257)\nattention a(mask=m, heads=8, head_dim=128)\n")
    assert main(["simulate", str(path), "--gpu", H100]) == 0
    out = capsys.readouterr().out
    assert "backward bwd-" in out and "(the untuned default)" in out and "dense SDPA backward" in out
    assert "forward+backward:" in out
    key = "bwd-q32_k128_w8_s2-q64_k32_w4_s3"
    assert main(["simulate", str(path), "--gpu", H100, "--backward-config", key]) == 0
    assert f"backward {key}:" in capsys.readouterr().out
    assert main(["simulate", str(path), "--gpu", "NVIDIA H200"]) == 0
    assert "backward: not predicted: NVIDIA H200 has no backward constants" in capsys.readouterr().out
