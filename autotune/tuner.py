"""`maskdsl tune`: one Optuna study per (GPU, Triton, mask, problem), resumable, seeded by the simulator.

The study is created with load_if_exists, so a second run on the same storage continues it.
A fresh study first gets the simulator's top predictions enqueued, then TPE samples the rest of
the (categorical) space. Configs that fail to compile or compute the wrong output are pruned
with their reason stored on the trial; nothing crashes the study.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import optuna

from maskdsl.autotune import space
from maskdsl.autotune.space import decode, encode, tiles_label
from maskdsl.autotune.database import open_storage
from maskdsl.autotune.keys import Device, current_device, study_name
from maskdsl.harness import Problem
from maskdsl.autotune.measure import Bench, WrongOutput
from maskdsl.codegen.config import KernelConfig
from maskdsl import ir


@dataclass(frozen=True)
class TuneResult:
    study: str
    device: Device
    best: KernelConfig | None
    best_ms: float | None
    default_ms: float | None
    trials: int
    pruned: int


def tune(spec: ir.Spec, mask: str, trials: int = 50, storage: str | None = None, timeout: float | None = None,
         seed: int | None = None, progress: bool = False, per_volume: int = 3) -> TuneResult:
    optuna.logging.set_verbosity(logging.WARNING)
    mdef = spec.mask(mask)
    device = current_device()
    problem = Problem.of(spec, mask)
    name = study_name(device, mdef, problem)
    configs = space.configs(spec, mask, per_volume)
    tiles = sorted({tiles_label(c.q_tile, c.kv_tile) for c in configs})
    study = optuna.create_study(study_name=name, storage=open_storage(storage), direction="minimize",
                                load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=seed))
    if not study.user_attrs:
        study.set_user_attr("spec", spec.fmt())
        study.set_user_attr("mask", mask)
        study.set_user_attr("mask_text", mdef.expr.fmt())
        study.set_user_attr("grid", list(mdef.layout.shape))
        study.set_user_attr("interpreted", device.interpreted)
    if not study.trials:
        for cfg in space.seeds(spec, mask, count=min(4, trials), per_volume=per_volume):
            study.enqueue_trial(encode(cfg), user_attrs={"seed": "simulator"})
    bench = Bench(spec, mask, problem, device)

    def objective(trial: optuna.Trial) -> float:
        cfg = decode({"tiles": trial.suggest_categorical("tiles", tiles),
                      "num_warps": trial.suggest_categorical("num_warps", list(space.WARPS)),
                      "num_stages": trial.suggest_categorical("num_stages", list(space.STAGES))})
        try:
            return bench.time_ms(cfg)
        except WrongOutput as exc:
            trial.set_user_attr("pruned_reason", f"wrong output: {exc}")
        except Exception as exc:  # does not compile, out of shared memory, unsupported shape, ...
            trial.set_user_attr("pruned_reason", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        raise optuna.TrialPruned()

    study.optimize(objective, n_trials=trials, timeout=timeout, show_progress_bar=progress, catch=())
    if "default_ms" not in study.user_attrs:
        default = space.ranked_default(mdef, problem.head_dim)
        study.set_user_attr("default_config", encode(default))
        try:
            study.set_user_attr("default_ms", bench.time_ms(default))
        except Exception as exc:
            study.set_user_attr("default_error", f"{type(exc).__name__}: {str(exc)[:300]}")
    return summarize(study, device)


def summarize(study, device: Device) -> TuneResult:
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    best = min(done, key=lambda t: t.value) if done else None
    return TuneResult(study.study_name, device, decode(best.params) if best else None, best.value if best else None,
                      study.user_attrs.get("default_ms"), len(done) + len(pruned), len(pruned))


def exhaustive(spec: ir.Spec, mask: str, per_volume: int = 3, on_result=None) -> list[tuple[KernelConfig, float | None, str]]:
    """Time every config of the same space (the yardstick the tuner is checked against)."""
    device = current_device()
    bench = Bench(spec, mask, Problem.of(spec, mask), device)
    out = []
    for cfg in space.configs(spec, mask, per_volume):
        try:
            out.append((cfg, bench.time_ms(cfg), ""))
        except Exception as exc:
            out.append((cfg, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
        if on_result:
            on_result(*out[-1])
    return out
