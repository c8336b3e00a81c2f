"""The simulator's atomic-dQ backward: its work, its buffer passes, its constant's fit, the refit command."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest

import maskdsl
from maskdsl.cli import main
from maskdsl.codegen.config import BackwardConfig
from maskdsl.simulator.backward import atomic_pass_bytes, backward_work, predict_kernel, simulate_backward
from maskdsl.simulator.calibrate_backward import (BackwardMeasurement, cross_validate_backward, fit_backward,
                                                  format_evaluation, measurements_from_records, predict_ms,
                                                  records_from_bench)
from maskdsl.simulator.cost import CostModel

from sim_brute import brute_counts

H100 = "NVIDIA H100 80GB HBM3"
SPLIT_KEYS = ("bwd-q64_k64_w4_s2-q128_k64_w8_s2", "bwd-q32_k128_w8_s2-q64_k32_w4_s3")
ATOMIC_KEYS = ("bwd-q64_k64_w4_s2-q128_k64_w8_s2-atomic", "bwd-q32_k128_w8_s2-q128_k64_w8_s2-atomic",
               "bwd-q128_k64_w8_s3-q128_k64_w8_s2-atomic")


def _gqa_spec(expr="neighborhood(window=(3, 5), stride=(1, 2))"):
    return maskdsl.parse(f"layout g = grid(9, 11)\nmask m = {expr}\n"
                         "attention a(mask=m, heads=4, kv_heads=2, head_dim=64, dtype=bf16)\n")


def test_the_atomic_walk_is_the_dkdv_walk_on_one_program_per_query_head():
    spec = _gqa_spec()
    q_tile, kv_tile = (2, 4), (4, 2)
    counts, _, _ = brute_counts(spec, q_tile, kv_tile, True)
    visited = (counts > 0).sum(0)
    split = backward_work(spec, "m", "dkdv", q_tile, kv_tile)
    atomic = backward_work(spec, "m", "dkdv", q_tile, kv_tile, atomic=True)
    np.testing.assert_array_equal(atomic.full + atomic.partial, visited)
    # one program per (key tile, batch x query head): 4 heads, no group summed; the kv-head split sums 2
    assert (atomic.copies, atomic.group, atomic.per_head) == (4, 1, True)
    assert (split.copies, split.group, split.per_head) == (2, 2, False)
    f_split, f_atomic = split.features(0.9, 1.25), atomic.features(0.9, 1.25)
    # its products go in their own column (priced at 5 per pair), the group's factor gone
    np.testing.assert_allclose(f_atomic[:, 3] * 2, f_split[:, 0])
    assert not f_atomic[:, :2].any() and not f_split[:, 3:].any()
    # atomic adds, in 128-row x head_dim tiles: each walked pair adds its 8 query rows at head_dim 64, and
    # each program its 8 dK and 8 dV rows
    np.testing.assert_allclose(f_atomic[:, 4], visited * 8 / 128 * 0.5 + 2 * 8 / 128 * 0.5)
    with pytest.raises(ValueError, match="no dQ kernel"):
        backward_work(spec, "m", "dq", q_tile, kv_tile, atomic=True)


def test_without_a_group_the_atomic_walk_adds_no_dkdv():
    spec = maskdsl.parse("layout s = grid(512)\nmask m = sliding_window(65)\n"
                         "attention a(mask=m, heads=2, head_dim=128)\n")
    w = backward_work(spec, "m", "dkdv", (64,), (64,), atomic=True)
    assert (w.copies, w.group, w.per_head) == (2, 1, False)
    np.testing.assert_allclose(w.features(1.0, 1.0)[:, 4], (w.full + w.partial) * 64 / 128)


def test_the_atomic_buffers_passes_are_counted_in_bytes():
    # dQ float32 [1, 4, 99, 64] and, under GQA, dK and dV float32 [1, 2, 99, 64]: each zero-filled (4 bytes),
    # read (4) and cast into bf16 (2); one zero-fill and one cast per buffer
    assert atomic_pass_bytes(_gqa_spec(), "m") == ((4 * 99 * 64 + 2 * 2 * 99 * 64) * 10, 6)
    spec = maskdsl.parse("layout s = grid(512)\nmask m = sliding_window(65)\n"
                         "attention a(mask=m, heads=2, head_dim=128, dtype=fp32, batch=3)\n")
    assert atomic_pass_bytes(spec, "m") == (3 * 2 * 512 * 128 * 12, 2)


def _calibrated(atomic_us=0.5):
    return replace(CostModel.for_gpu(H100), bwd_dkdv_us=4.0, bwd_dq_us=3.0, bwd_program_us=1.0,
                   bwd_atomic_us=atomic_us)


def test_simulate_backward_predicts_the_atomic_backward_from_its_config():
    spec = maskdsl.parse("layout s = grid(4096)\nmask m = sliding_window(257)\n"
                         "attention a(mask=m, heads=8, head_dim=128)\n")
    split_cfg = BackwardConfig.from_key(SPLIT_KEYS[0])
    cfg = replace(split_cfg, atomic=True)
    model = _calibrated()
    b = simulate_backward(spec, "m", cfg, costs=model)
    s = simulate_backward(spec, "m", split_cfg, costs=model)
    assert b.atomic and b.dq is None and b.dq_ms == 0 and b.label() == cfg.key() and b.label().endswith("-atomic")
    # 8 heads x 4096 tokens x 128 of float32 dQ: zero-fill, read, cast to bf16 (10 bytes); two passes
    assert b.pass_ms == pytest.approx((8 * 4096 * 128 * 10 / (model.hbm_gbps * 1e3) + 2 * model.launch_us) / 1000)
    assert b.ms == pytest.approx(b.dkdv_ms + b.pass_ms)
    assert b.dkdv_ms > s.dkdv_ms
    # with nothing but products priced, the atomic walk is the split one's at 5 products a pair instead of 4
    # (no GQA group here: the same programs; list scheduling scales with the programs' times)
    products = replace(model, bwd_program_us=0.0, bwd_atomic_us=0.0)
    a5, s4 = (simulate_backward(spec, "m", c, costs=products).dkdv_ms - model.launch_us / 1000 for c in (cfg, split_cfg))
    assert a5 == pytest.approx(s4 * 5 / 4, rel=1e-9)
    assert b.to_dict()["dq_programs"] == 0 and b.to_dict()["atomic"] is True
    assert simulate_backward(spec, "m", split_cfg, costs=model, atomic=True).label() == cfg.key()
    assert predict_kernel(spec, "m", "dkdv", (64,), (64,), 4, 2, costs=model, atomic=True) == pytest.approx(b.dkdv_ms)
    # without its constant: no atomic prediction, the split one unchanged
    bare = _calibrated(None)
    assert simulate_backward(spec, "m", cfg, costs=bare) is None
    assert predict_kernel(spec, "m", "dkdv", (64,), (64,), 4, 2, costs=bare, atomic=True) is None
    assert simulate_backward(spec, "m", split_cfg, costs=bare).ms == pytest.approx(s.ms)


def _synthetic(truth, cases=(("a", 65), ("b", 33)), keys=SPLIT_KEYS + ATOMIC_KEYS):
    """Measurements made by a known model: the fit must find its constants again."""
    out = []
    for case, window in cases:
        spec = maskdsl.parse(f"layout s = grid(1024)\nmask m = sliding_window({window}) | sink(4)\n"
                             "attention a(mask=m, heads=16, kv_heads=4, head_dim=128)\n" if case == "b" else
                             f"layout s = grid(1024)\nmask m = sliding_window({window})\n"
                             "attention a(mask=m, heads=16, head_dim=128)\n")
        for key in keys:
            m = BackwardMeasurement(spec, "m", BackwardConfig.from_key(key), 1.0, case)
            out.append(replace(m, ms=predict_ms(truth, m)))
    return out


# 7 SMs: equal programs on an even SM count tie in the list schedule, and a tie broken the other way by a
# rounding of the fitted constants moves the makespan (the fit would then stop near, not at, the truth)
BASE = CostModel(name="G", c_full=1, c_partial=1, c_tile=1, sms=7, launch_us=5.0, hbm_gbps=100.0)
TRUTH = replace(BASE, bwd_dkdv_us=3.0, bwd_dq_us=2.25, bwd_program_us=2.0, bwd_atomic_us=1.5, bwd_partial=1.5,
                bwd_pair_exponent=0.8)


def test_the_fit_recovers_the_atomic_constant_with_the_split_ones():
    entry = fit_backward(_synthetic(TRUTH), BASE, source="synthetic")
    assert entry["bwd_pair_exponent"] == 0.8 and entry["bwd_partial"] == 1.5
    for name in ("bwd_dkdv_us", "bwd_dq_us", "bwd_program_us", "bwd_atomic_us"):
        assert entry[name] == pytest.approx(getattr(TRUTH, name), rel=1e-3), name
    assert entry["bwd_fit_rms_relative_error"] < 1e-6


def test_atomic_times_need_their_constant_and_five_products():
    """Times made without atomic adds fit to no atomic cost; times made as if an atomic pair cost a split
    dK/dV pair (4 products, no adds) cannot be fitted exactly: the fifth product is in the model."""
    entry = fit_backward(_synthetic(replace(TRUTH, bwd_atomic_us=0.0)), BASE)
    assert entry["bwd_atomic_us"] == pytest.approx(0.0, abs=1e-6) and entry["bwd_fit_rms_relative_error"] < 1e-6
    four = replace(TRUTH, bwd_atomic_us=0.0)
    meas = [m if not m.config.atomic else replace(m, ms=m.ms - _fifth_product_ms(four, m)) for m in _synthetic(four)]
    assert fit_backward(meas, BASE)["bwd_fit_rms_relative_error"] > 1e-3


def _fifth_product_ms(model, m):
    """The atomic walk's time less its kernel as if priced at 4 products (a test-side reprice of the same work)."""
    (work,) = [backward_work(m.spec, m.mask, "dkdv", m.config.dkdv.q_tile, m.config.dkdv.kv_tile,
                             m.config.dkdv.num_warps, m.config.dkdv.num_stages, atomic=True)]
    at4 = replace(model, bwd_dkdv_us=model.bwd_dkdv_us * 4 / 5)  # its 5 products cost what 4 did
    return (model.backward_kernel_us(work) - at4.backward_kernel_us(work)) / 1000.0


def test_without_atomic_measurements_the_atomic_constant_stays_unfitted():
    entry = fit_backward(_synthetic(TRUTH, keys=SPLIT_KEYS + ("bwd-q128_k64_w8_s3-q64_k64_w4_s2",)), BASE)
    assert entry["bwd_atomic_us"] is None and entry["bwd_dkdv_us"] == pytest.approx(3.0, rel=1e-3)


def test_leave_one_case_out_reports_each_mode():
    meas = _synthetic(TRUTH, cases=(("a", 65), ("b", 33), ("c", 97)))
    rows = cross_validate_backward(meas, BASE)
    assert {r["mode"] for r in rows} == {"split", "atomic"} and {r["fold"] for r in rows} == {"a", "b", "c"}
    assert all(r["ratio"] == pytest.approx(1.0, rel=1e-2) for r in rows)
    text = format_evaluation(rows)
    assert "\nsplit: rms relative error" in text and "\natomic: rms relative error" in text
    assert f"{len(ATOMIC_KEYS) * 3}/{len(ATOMIC_KEYS) * 3} within 15%" in text.splitlines()[-1]


def _bench_json(tmp_path, truth):
    """A `maskdsl bench --train --json` file of three cases whose bwd_ms `truth` made, with a failed config,
    a NaN one, one whose gradients missed and a top-k case (none of which may become a record)."""
    results = []
    for name, window in (("win_a", 65), ("win_b", 129), ("win_c", 257)):
        path = tmp_path / "bench" / "suite" / f"{name}.mask"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"layout s = grid(1024)\nmask m = sliding_window({window})\n"
                        "attention a(mask=m, heads=16, head_dim=128, dtype=fp16)\n")
        ours = []
        for key in SPLIT_KEYS + ATOMIC_KEYS:
            m = BackwardMeasurement(str(path), "m", BackwardConfig.from_key(key), 1.0, name)
            ours.append({"config": "q128_k64_w8_s3", "backward_config": key, "dq_error": 0.002, "dk_error": 0.002,
                         "dv_error": 0.002, "grad_nan": False, "fwd_ms": 0.5, "bwd_ms": predict_ms(truth, m),
                         "fwd_bwd_ms": 9.0})
        ours += [{"config": "q128_k64_w8_s3", "backward_config": "bwd-q64_k64_w4_s3-q64_k64_w4_s3",
                  "failed": "OutOfResources: shared memory"},
                 {**ours[0], "backward_config": "bwd-q64_k64_w8_s3-q64_k64_w4_s3", "grad_nan": True},
                 {**ours[0], "backward_config": "bwd-q64_k64_w8_s2-q64_k64_w4_s3", "dk_error": 0.5}]
        results.append({"mask": "m", "file": str(path), "dtype": "torch.float16", "ours": ours,
                        "dense_best": {"backend": "cudnn", "fwd_ms": 3.0, "bwd_ms": 7.5, "fwd_bwd_ms": 10.5}})
    # a top-k case: its backward takes the forward's tiles, no backward config of the static model
    results.append({"mask": "t", "file": str(tmp_path / "bench" / "suite" / "topk.mask"), "dtype": "torch.bfloat16",
                    "ours": [{**ours[0], "backward_config": "topk"}]})
    out = tmp_path / "train.json"
    out.write_text(json.dumps({"environment": {"gpu": H100}, "results": results}))
    return out, results


def test_bench_training_results_become_records(tmp_path):
    _, results = _bench_json(tmp_path, TRUTH)
    records = records_from_bench(results, source="synthetic run", root=tmp_path)
    assert [r["case"] for r in records] == ["win_a", "win_b", "win_c"]
    r = records[0]
    assert r["spec"] == "bench/suite/win_a.mask" and r["mask"] == "m" and r["dtype"] == "fp16"
    assert sorted(r["backward_ms"]) == sorted(SPLIT_KEYS + ATOMIC_KEYS)  # failed, NaN and wrong gradients left out
    assert r["dense_bwd_ms"] == 7.5 and r["source"] == "synthetic run" and r["fwd_config"] == "q128_k64_w8_s3"
    # a run in another copy of the repository: the path from its bench/ folder
    moved = [{**results[0], "file": "/elsewhere/repo/bench/suite/win_a.mask"}]
    assert records_from_bench(moved, root=tmp_path)[0]["spec"] == "bench/suite/win_a.mask"
    meas = measurements_from_records(records, BackwardConfig.from_key, root=tmp_path)
    assert sum(m.config.atomic for m in meas) == 3 * len(ATOMIC_KEYS)


def test_cli_refits_the_backward_from_a_bench_file(tmp_path, capsys, monkeypatch):
    truth = replace(CostModel.for_gpu(H100), bwd_dkdv_us=4.0, bwd_dq_us=3.0, bwd_program_us=0.5, bwd_atomic_us=0.7,
                    bwd_partial=1.25, bwd_pair_exponent=0.9)
    path, _ = _bench_json(tmp_path, truth)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "costs.json"
    assert main(["simulate", "--calibrate-backward", str(path), "--no-recorded", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bwd_atomic_us" in text and "leave one case out (each case" in text and "\natomic: rms relative error" in text
    entry = json.loads(out.read_text())["gpus"][H100]
    assert entry["bwd_atomic_us"] == pytest.approx(0.7, rel=1e-2) and entry["bwd_dkdv_us"] == pytest.approx(4.0, rel=1e-2)
    assert entry["c_gluon"] == CostModel.for_gpu(H100).c_gluon  # the forward's constants kept
    assert [r["case"] for r in entry["bwd_measurements"]] == ["win_a", "win_b", "win_c"]
    assert str(path) in entry["bwd_source"]
    # the written file is a cost file: the atomic backward is now predicted from it
    model = CostModel.for_gpu(H100, out)
    assert model.bwd_atomic_us == pytest.approx(0.7, rel=1e-2)
    spec = maskdsl.parse("layout s = grid(1024)\nmask m = sliding_window(65)\nattention a(mask=m, heads=16, head_dim=128)\n")
    assert simulate_backward(spec, "m", BackwardConfig.from_key(ATOMIC_KEYS[0]), costs=model) is not None
    spec_file = tmp_path / "bench" / "suite" / "win_a.mask"
    assert main(["simulate", str(spec_file), "--gpu", H100, "--costs", str(out),
                 "--backward-config", ATOMIC_KEYS[1]]) == 0
    assert f"backward {ATOMIC_KEYS[1]}: dK/dV with atomic dQ" in capsys.readouterr().out
    assert main(["simulate", str(spec_file), "--gpu", H100, "--backward-config", ATOMIC_KEYS[1]]) == 0
    assert "has no constant for the atomic-dQ backward (bwd_atomic_us)" in capsys.readouterr().out
    assert main(["simulate"]) == 2  # neither a spec nor a bench file
    assert "needs a spec FILE" in capsys.readouterr().err


def test_the_atomic_study_seeds_are_ranked_by_the_atomic_prediction(tmp_path, monkeypatch):
    from maskdsl.autotune.space import backward_seeds

    spec = maskdsl.parse("layout s = grid(2048)\nmask m = sliding_window(257)\n"
                         "attention a(mask=m, heads=8, head_dim=128)\n")
    entry = json.loads(_shipped_h100())
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"gpus": {"Test GPU": {**entry, "bwd_atomic_us": 0.7},
                                          "Bare GPU": {**entry, "bwd_atomic_us": None}}}))
    monkeypatch.setenv("MASKDSL_GPU_COSTS", str(costs))
    seeds = backward_seeds(spec, "m", count=4, gpu="Test GPU", atomic=True)
    split = backward_seeds(spec, "m", count=4, gpu="Test GPU")
    assert len(seeds) > 2 and all(s.atomic and s.dq == split[0].dq for s in seeds)
    assert seeds[0] == replace(split[0], atomic=True)  # the untuned default first, as the split study's
    model = CostModel.for_gpu("Test GPU")
    times = [predict_kernel(spec, "m", "dkdv", c.dkdv.q_tile, c.dkdv.kv_tile, c.dkdv.num_warps, c.dkdv.num_stages,
                            costs=model, atomic=True) for c in seeds[1:]]
    assert times == sorted(times)
    # over all the dK/dV kernel's configs: the atomic order is not the split one's on this mask
    from maskdsl.autotune.space import _kernel_configs, _rank_kernel, backward_tile_pairs

    configs = _kernel_configs(backward_tile_pairs(spec, "m")["dkdv"])

    def atomic_ms(ranked):
        return [predict_kernel(spec, "m", "dkdv", c.q_tile, c.kv_tile, c.num_warps, c.num_stages, costs=model,
                               atomic=True) for c in ranked]

    by_atomic = atomic_ms(_rank_kernel(spec, "m", "dkdv", configs, "Test GPU", atomic=True))
    by_split = atomic_ms(_rank_kernel(spec, "m", "dkdv", configs, "Test GPU"))
    assert by_atomic == sorted(by_atomic) and by_split != sorted(by_split)
    # without the atomic constant: still atomic seeds, the dK/dV kernels' best tile pairs at the default launch
    bare = backward_seeds(spec, "m", count=4, gpu="Bare GPU", atomic=True)
    assert all(s.atomic for s in bare) and {s.dkdv.num_warps for s in bare[1:]} <= {seeds[0].dkdv.num_warps}


def _shipped_h100() -> str:
    from maskdsl.simulator.cost import _BUILTIN, _load

    return json.dumps({k: v for k, v in _load(_BUILTIN)[H100].items() if k != "bwd_measurements"})
