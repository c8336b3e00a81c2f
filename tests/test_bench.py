"""The benchmark's steps on the CPU: a small spec through the interpreter, with the GPU timer stood in for.

`maskdsl bench` measures on a GPU; here every step but the timing runs for real (inputs, the poisoned
run and row check of each config, the TMA/pointer pairs, FlexAttention eager, the simulator), so a
broken step fails here and not first on the GPU machine.
"""

import pytest

import maskdsl
from maskdsl.harness import measure as harness
from maskdsl.bench.report import print_paths, print_table
from maskdsl.bench.run import bench_mask
from maskdsl.codegen.config import KernelConfig

SPEC = """\
layout g = grid(9, 13)
mask m = neighborhood(window=(5, 6), stride=(1, 2))
attention a(mask=m, heads=2, kv_heads=1, head_dim=16, dtype=fp32)
"""


@pytest.fixture
def fake_timer(monkeypatch):
    """Call each timed function once (it must run) and report 1 ms; the dense baselines 4 ms."""
    def time_ms(fn, warmup=25, rep=100):
        fn()
        return 1.0

    monkeypatch.setattr(harness, "time_ms", time_ms)
    monkeypatch.setattr(harness, "dense_times", lambda q, k, v, **kw: ({"cudnn": 4.0, "flash": None}, {"flash": "no"}))


def test_bench_steps_check_every_config_and_pair_the_load_paths(fake_timer, capsys):
    spec = maskdsl.parse(SPEC)
    result = bench_mask(spec, "m", [KernelConfig((4, 4), (4, 8))], rows=40, paths=True, device="cpu",
                        flex_gather=True)
    assert [(e["config"], e["tma"]) for e in result["ours"]] == [("q4x4_k4x8_w4_s2", True), ("q4x4_k4x8_w4_s2", False)]
    for e in result["ours"]:
        assert "failed" not in e, e
        assert e["unwritten"] == 0 and e["error"] < 2e-3 and e["speedup_vs_dense"] == 4.0
    assert result["dense_best_ms"] == 4.0 and result["dense_flash_error"] == "no"
    assert result["ours_best"]["config"] == "q4x4_k4x8_w4_s2" and result["speedup_vs_dense"] == 4.0
    assert result["flex_error"] < 1e-5 and result["flex_gather_error"] < 1e-5, result
    assert result["speedup_vs_flex"] == 1.0 and result["speedup_vs_flex_gather"] == 1.0
    assert result["sim_upper_bound"] > 1
    assert "single_call_ms" not in result["ours_best"]  # one call from idle: timed on a GPU only
    result["file"] = "small.mask"
    result["ours_best"]["single_call_ms"], result["dense_single_call_ms"] = 0.5, 2.0
    print_table([result])
    print_paths([result])
    out = capsys.readouterr().out
    assert "flex gather" in out and "small:m" in out
    single = out.split("one call from an idle GPU")[1].splitlines()[2].split()
    assert single == ["small:m", "2.000", "0.500", "4.00"], single
    assert "q4x4_k4x8_w4_s2" in out.split("pointer ms")[1]


def test_a_wrong_kernel_is_never_the_best(fake_timer, monkeypatch):
    """A config whose output is wrong is recorded with its error and not picked."""
    spec = maskdsl.parse(SPEC)
    from maskdsl.codegen import compiled

    real = compiled.CompiledAttention.launch

    def broken(self, q, k, v, scale, out, lse, tiles=None):
        real(self, q, k, v, scale, out, lse, tiles)
        if self.config.q_tile == (4, 4):
            out[:, :, :5] = 0.0  # wrong rows, all of them written

    monkeypatch.setattr(compiled.CompiledAttention, "launch", broken)
    result = bench_mask(spec, "m", [KernelConfig((4, 4), (4, 8)), KernelConfig((2, 8), (2, 8))], rows=117,
                        with_flex=False, device="cpu")
    bad, good = result["ours"]
    assert bad["unwritten"] == 0 and bad["error"] > 1e-2
    assert good["error"] < 2e-3 and result["ours_best"]["config"] == good["config"]


def test_fit_from_takes_the_latest_files_entry_of_a_case(tmp_path):
    """`bench --fit-from A B`: a case measured in both counts once, with B's entry (a re-measurement)."""
    from maskdsl.bench.report import latest_per_case

    old = {"results": [{"file": "bench/suite/dense_32k.mask", "mask": "dense", "ours": [{"ms": 2.0}]},
                       {"file": "bench/suite/window_1d_32k.mask", "mask": "window", "ours": [{"ms": 3.0}]}]}
    new = {"results": [{"file": "/elsewhere/bench/suite/dense_32k.mask", "mask": "dense", "ours": [{"ms": 1.0}]}]}
    got = {(r["file"].split("/")[-1], r["ours"][0]["ms"]) for r in latest_per_case([old, new])}
    assert got == {("dense_32k.mask", 1.0), ("window_1d_32k.mask", 3.0)}
    assert {r["ours"][0]["ms"] for r in latest_per_case([new, old])} == {2.0, 3.0}


def test_best_configs_takes_the_last_run_of_each_case():
    from maskdsl.bench.run import best_configs

    runs = [{"results": [{"file": "bench/suite/gna_3d.mask", "mask": "gna", "ours_best": {"config": "q2x8x8_k2x8x8_w8_s3"}},
                         {"file": "bench/suite/dense_32k.mask", "mask": "full", "ours_best": None}]},
            {"results": [{"file": "/x/bench/suite/gna_3d.mask", "mask": "gna", "ours_best": {"config": "q1x8x16_k2x8x8_w8_s2"}}]}]
    assert best_configs(runs) == {"gna_3d:gna": "q1x8x16_k2x8x8_w8_s2"}


def test_train_configs_from_a_saved_run_retimes_each_modes_best_pair():
    from maskdsl.bench.training import _configs, best_training_configs

    run = {"results": [
        {"file": "bench/suite/window_1d_32k.mask", "mask": "window",
         "ours_best_split": {"config": "q128_k128_w8_s3", "backward_config": "bwd-q64_k64_w4_s2-q128_k64_w8_s2"},
         "ours_best_atomic": {"config": "q128_k128_w8_s3", "backward_config": "bwd-q64_k128_w8_s2-q128_k64_w8_s2-atomic"}},
        {"file": "bench/suite/topk_32k.mask", "mask": "t",
         "ours_best_split": {"config": "q128_k128_w8_s3", "backward_config": "topk"}},
        {"file": "bench/suite/failed.mask", "mask": "f"}]}
    best = best_training_configs([run])
    assert set(best) == {"window_1d_32k:window", "topk_32k:t"}
    (fwd, split), (_, atomic) = _configs(best["window_1d_32k:window"])
    assert fwd.key() == "q128_k128_w8_s3" and not split.atomic and atomic.atomic and atomic.dkdv.kv_tile == (128,)
    (topk,) = _configs(best["topk_32k:t"])
    assert topk.key() == "q128_k128_w8_s3"
