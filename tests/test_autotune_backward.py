"""Tuning the backward under the interpreter: the study key's pass, a short study, the lookup compile does."""

import warnings

import optuna
import pytest
import torch

import maskdsl
from maskdsl.autotune import database
from maskdsl.autotune.database import best_backward_config, best_config, clear_cache, list_studies
from maskdsl.autotune.keys import Device, parse_study_name, study_name
from maskdsl.autotune.measure import BackwardBench, WrongOutput
from maskdsl.autotune.policy import ranked_backward_default
from maskdsl.autotune.space import decode_backward, encode_backward
from maskdsl.autotune.tuner import tune
from maskdsl.cli import main
from maskdsl.codegen.compiled import _REGISTRY
from maskdsl.codegen.config import BackwardConfig, KernelConfig
from maskdsl.harness.measure import Problem

SPEC = """\
layout g = grid(11, 10)
mask m = neighborhood(window=(5, 3), stride=(1, 2))
attention a(mask=m, heads=2, head_dim=16, dtype=fp32)
"""


def test_study_key_round_trips_with_and_without_the_pass():
    spec = maskdsl.parse(SPEC)
    device, mdef, problem = Device("NVIDIA H100 80GB HBM3", "sm90", "3.6.0"), spec.mask("m"), Problem.of(spec, "m")
    fwd, bwd = study_name(device, mdef, problem), study_name(device, mdef, problem, "bwd")
    old = f"maskdsl|NVIDIA H100 80GB HBM3|sm90|triton-3.6.0|{mdef.content_hash()}|B1H2K2D16-fp32"
    assert fwd == old, "forward names keep the pre-backward form, so stored forward studies resume"
    assert bwd == old + "|bwd"
    want = {"tool": "maskdsl", "gpu": "NVIDIA H100 80GB HBM3", "capability": "sm90", "triton": "triton-3.6.0",
            "mask_hash": mdef.content_hash(), "problem": "B1H2K2D16-fp32"}
    assert parse_study_name(old) == {**want, "pass": "fwd"}
    assert parse_study_name(bwd) == {**want, "pass": "bwd"}
    assert parse_study_name(old + "|fwd") == {**want, "pass": "fwd"}
    assert parse_study_name(old + "|sideways") is None and parse_study_name("someone-else|x") is None
    with pytest.raises(ValueError, match="pass must be one of"):
        study_name(device, mdef, problem, "backward")


def test_backward_params_round_trip():
    cfg = BackwardConfig(KernelConfig((2, 8), (4, 8), 8, 3), KernelConfig((8, 16), (4, 8), 4, 2))
    params = encode_backward(cfg)
    assert params["dkdv_tiles"] == "2x8/4x8" and params["dq_num_warps"] == 4
    assert decode_backward(params) == cfg


def _best_stored(storage, name):
    """The best complete trial's config, read from Optuna directly (not through the lookup under test)."""
    study = optuna.load_study(study_name=name, storage=storage)
    p = min((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value).params
    kernel = lambda n: KernelConfig.from_key(  # noqa: E731
        "q{}_k{}_w{}_s{}".format(*p[f"{n}_tiles"].split("/"), p[f"{n}_num_warps"], p[f"{n}_num_stages"]))
    return BackwardConfig(kernel("dkdv"), kernel("dq")), study


def test_backward_study_stores_trials_and_compile_takes_the_best(storage, monkeypatch):
    spec = maskdsl.parse(SPEC)
    mdef, att = spec.mask("m"), spec.attention_for("m")
    default = ranked_backward_default(mdef, 16)
    measure = BackwardBench.time_ms

    def scored(bench, cfg):  # measured and checked as usual, then scored so the default cannot win by noise
        measure(bench, cfg)
        return 10.0 if cfg == default else 1.0 + 0.1 * cfg.dq.num_stages + 0.01 * cfg.dkdv.num_warps

    monkeypatch.setattr(BackwardBench, "time_ms", scored)
    forward = tune(spec, "m", trials=1, storage=storage, seed=0)
    clear_cache()
    assert best_backward_config(mdef, att, storage) is None, "a forward study is not a backward one"
    result = tune(spec, "m", trials=3, storage=storage, seed=1, backward=True, deterministic=True)
    assert result.study.endswith("|bwd") and result.trials == 3 and result.pruned == 0
    best, study = _best_stored(storage, result.study)
    assert result.best == best != default and study.user_attrs["default_ms"] == 10.0
    assert study.user_attrs["pass"] == "bwd"
    seeded = [t for t in study.trials if t.user_attrs.get("seed") == "simulator"]
    assert decode_backward(seeded[0].params) == default, "the untuned backward goes first"
    rows = {r["pass"]: r for r in list_studies(storage)}
    assert set(rows) == {"fwd", "bwd"} and rows["bwd"]["trials"] == 3 and rows["bwd"]["best_config"] == best.key()
    clear_cache()
    assert best_backward_config(mdef, att, storage) == best
    assert best_config(mdef, att, storage) == forward.best, "a backward study is not a forward one"
    fn = maskdsl.compile(spec, "m", deterministic=True)
    assert fn.backward_config == best and fn.config == forward.best
    assert _REGISTRY[fn.key] is fn and fn.key.endswith(best.key())
    # the atomic-dQ backward is a study of its own; compile takes each mode's best for that mode
    atomic = tune(spec, "m", trials=2, storage=storage, seed=2, backward=True, deterministic=False)
    assert atomic.study.endswith("|bwd-atomic") and atomic.best.atomic and atomic.best.dq == default.dq
    clear_cache()
    assert maskdsl.compile(spec, "m", deterministic=False).backward_config == atomic.best
    assert maskdsl.compile(spec, "m", deterministic=True).backward_config == best


def test_cli_tunes_the_backward_and_lists_the_pass(storage, tmp_path, capsys):
    path = tmp_path / "tiny.mask"
    path.write_text(SPEC)
    assert main(["tune", str(path), "--mask", "m", "--backward", "--deterministic", "--trials", "2", "--storage",
                 storage, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "backward study maskdsl|" in out and "|bwd: 2 trials" in out and "best bwd-" in out
    assert main(["tune", str(path), "--mask", "m", "--backward", "--atomic", "--trials", "1", "--storage",
                 storage, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "|bwd-atomic: 1 trials" in out and "-atomic" in out.split("best ")[-1]
    assert main(["tune", "--list", "--storage", storage]) == 0
    listing = capsys.readouterr().out
    assert "2 study(ies)" in listing and "| backward |" in listing and "| backward (atomic dQ) |" in listing


def test_wrong_gradients_are_caught_before_timing():
    spec = maskdsl.parse(SPEC)
    bench = BackwardBench(spec, "m", Problem.of(spec, "m"), Device("triton-interpreter", "cpu", "x"), rows=8)
    default = ranked_backward_default(spec.mask("m"), 16)
    assert bench.time_ms(default) > 0
    dq, dk, dv = bench.expected
    bench.expected = (dq, dk * 1.01, dv)  # a 1% error in dK must not pass
    with pytest.raises(WrongOutput, match=r"dK differs from the float64 reference"):
        bench.time_ms(default)
    bench.expected = (dq, dk, torch.full_like(dv, float("nan")))
    with pytest.raises(WrongOutput, match="dV"):
        bench.time_ms(default)


def test_the_interpreter_refuses_a_grid_too_big_for_it():
    spec = maskdsl.parse("layout s = grid(8192)\nmask w = sliding_window(65)\n")
    with pytest.raises(ValueError, match="8,192 tokens.*hint: tune on a GPU"):
        BackwardBench(spec, "w", Problem.of(spec, "w"), Device("triton-interpreter", "cpu", "x"))
    with pytest.raises(ValueError, match="top-k"):
        tune(maskdsl.parse("layout s = grid(256)\nmask t = topk(2, block=64)\n"), "t", trials=1, backward=True)


def test_a_failing_lookup_warns_once_and_compile_falls_back(storage, monkeypatch):
    spec = maskdsl.parse(SPEC)
    mdef, att = spec.mask("m"), spec.attention_for("m")
    tune(spec, "m", trials=1, storage=storage, seed=0)  # a database exists, so the lookup reads it
    real = database._lookup

    def broken(*args):
        if args[-1] == "bwd":
            raise RuntimeError("database is locked")
        return real(*args)

    broken.cache_clear = real.cache_clear  # the fixture clears the cache after the test
    monkeypatch.setattr(database, "_lookup", broken)
    monkeypatch.setattr(database, "_warned", set())
    with pytest.warns(UserWarning, match="could not read tuned backward configs.*database is locked"):
        assert best_backward_config(mdef, att) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second failure stays quiet
        fn = maskdsl.compile(spec, "m", deterministic=True)
    assert fn.backward_config == ranked_backward_default(mdef, 16)


def test_a_stored_backward_config_that_does_not_fit_the_mask_is_not_used(monkeypatch):
    spec = maskdsl.parse(SPEC)
    mdef = spec.mask("m")
    wrong_rank = BackwardConfig.from_key("bwd-q64_k64_w4_s2-q128_k64_w8_s2")  # 1-D tiles for a 2-D grid
    monkeypatch.setattr(database, "best_config", lambda *a, **k: wrong_rank)
    monkeypatch.setattr(database, "_warned", set())
    with pytest.warns(UserWarning, match="2 dimensions"):
        assert best_backward_config(mdef, spec.attention_for("m")) is None
