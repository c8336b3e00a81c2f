"""Autotuning under the interpreter, on a real SQLite storage in a temp dir."""

import os
import subprocess
import sys
from pathlib import Path

import optuna

import maskdsl
from maskdsl.autotune import space
from maskdsl.autotune.database import clear_cache, list_studies
from maskdsl.autotune.tuner import tune

SPEC = """\
layout g = grid(12, 10)
mask m = neighborhood(window=(5, 3), stride=(1, 2))
attention a(mask=m, heads=2, head_dim=16, dtype=fp32)
"""


def test_tune_resume_and_lookup(storage):
    spec = maskdsl.parse(SPEC)
    first = tune(spec, "m", trials=3, storage=storage, seed=1)
    assert first.trials == 3 and first.best is not None and first.best_ms > 0
    second = tune(spec, "m", trials=2, storage=storage, seed=2)
    assert second.study == first.study and second.trials == 5, "a second run resumes the same study"
    rows = list_studies(storage)
    assert len(rows) == 1 and rows[0]["trials"] == 5 and rows[0]["interpreted"]
    study = optuna.load_study(study_name=first.study, storage=storage)
    assert any(t.user_attrs.get("seed") == "simulator" for t in study.trials), "seeded from the simulator"
    assert study.user_attrs["default_ms"] > 0
    clear_cache()
    fn = maskdsl.compile(spec, "m")  # no config: the database's best, no tuning
    assert fn.config == second.best


def test_impossible_configs_are_pruned_with_a_reason(storage, monkeypatch):
    monkeypatch.setattr(space, "WARPS", (3,))  # not a valid warp count: every trial must be pruned, not crash
    result = tune(maskdsl.parse(SPEC), "m", trials=3, storage=storage, seed=0)
    assert result.pruned == 3 and result.best is None
    study = optuna.load_study(study_name=result.study, storage=storage)
    assert all("num_warps=3" in t.user_attrs["pruned_reason"] for t in study.trials)


def test_lookup_without_database_returns_nothing(storage):
    from maskdsl.autotune.database import best_config

    spec = maskdsl.parse(SPEC)
    assert best_config(spec.mask("m"), spec.attention_for("m"), storage) is None
    assert not Path(storage[len("sqlite:///"):]).exists(), "a lookup must not create the database"


def test_two_concurrent_workers_share_one_sqlite_study(storage, tmp_path):
    path = tmp_path / "tiny.mask"
    path.write_text(SPEC)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "maskdsl.cli", "tune", str(path), "--mask", "m", "--trials", "3",
           "--storage", storage, "--quiet"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    failed = [f"worker {i} exited {p.returncode}\nstdout: {o[-2000:]}\nstderr: {e[-4000:]}"
              for i, (p, (o, e)) in enumerate(zip(procs, outs)) if p.returncode]
    assert not failed, "\n".join(failed)  # the whole stderr of a failed worker, not pytest's cut repr
    rows = list_studies(storage)
    assert len(rows) == 1, "both workers must land in one study"
    assert rows[0]["trials"] == 6
