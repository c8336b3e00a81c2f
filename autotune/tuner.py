"""`maskdsl tune`: one Optuna study per (GPU, Triton, mask, problem, pass), resumable, seeded by the simulator.

The forward and the backward are tuned apart (`--backward`): the backward's two kernels have their
own tiles, warps and stages, and its objective is the backward's time alone.

The study is created with load_if_exists, so a second run on the same storage continues it.
A fresh study first gets the simulator's top predictions enqueued, then TPE samples the rest of
the (categorical) space. Configs that fail to compile or compute the wrong output are pruned
with their reason stored on the trial; nothing crashes the study.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import optuna

from typing import Callable

from maskdsl.autotune import policy, space
from maskdsl.codegen.config import DETERMINISTIC
from maskdsl.autotune.space import decode, decode_any, decode_backward, encode, encode_backward, tiles_label
from maskdsl.autotune.database import TuningDatabaseError, open_storage, redact, storage_url
from maskdsl.autotune.keys import Device, current_device, study_name
from maskdsl.harness.measure import Problem
from maskdsl.autotune.measure import BackwardBench, Bench, WrongOutput
from maskdsl.codegen.config import BackwardConfig, KernelConfig
from maskdsl.spec import ir


@dataclass(frozen=True)
class TuneResult:
    study: str
    device: Device
    best: KernelConfig | BackwardConfig | None
    best_ms: float | None
    default_ms: float | None
    trials: int
    pruned: int


@dataclass(frozen=True)
class Search:
    """One pass's search: the categorical choices a trial samples, how parameters map to a config,
    what a fresh study tries first, and the config its speedup is measured against."""

    pass_: str  # the study key's pass: "fwd", "bwd" or "bwd-atomic" (keys.PASSES)
    choices: dict
    decode: Callable[[dict], object]
    encode: Callable[[object], dict]
    seeds: list
    default: object


def forward_search(spec: ir.Spec, mask: str, problem: Problem, trials: int, per_volume: int) -> Search:
    configs = space.configs(spec, mask, per_volume)
    tiles = sorted({tiles_label(c.q_tile, c.kv_tile) for c in configs})
    return Search("fwd", {"tiles": tiles, "num_warps": list(space.WARPS), "num_stages": list(space.STAGES)},
                  decode, encode, space.seeds(spec, mask, count=min(4, trials), per_volume=per_volume),
                  policy.ranked_default(spec.mask(mask), problem.head_dim))


def backward_search(spec: ir.Spec, mask: str, problem: Problem, trials: int, per_volume: int,
                    device: Device | None = None, atomic: bool = False) -> Search:
    """Each backward kernel's tiles (the simulator's best at its block sizes), warps and stages; seeds
    ranked with this GPU's backward constants (the default GPU's in the interpreter).

    `atomic`: the atomic-dQ backward's study (pass 'bwd-atomic'): only the dK/dV kernel runs, so only
    its knobs are searched (the dQ kernel's stay the default's, one choice each, and `atomic` is a
    one-choice parameter so that a stored trial says which backward it timed)."""
    gpu = None if device is None or device.interpreted else device.name
    seeds = space.backward_seeds(spec, mask, problem.head_dim, count=min(4, trials), per_volume=per_volume, gpu=gpu,
                                 atomic=atomic)
    default = seeds[0]  # ranked_backward_default: the untuned backward
    pairs = space.backward_tile_pairs(spec, mask, per_volume)
    choices = {}
    for name in space.KERNELS:
        labels = [tiles_label(q, k) for q, k in pairs[name]]
        for cfg in seeds:  # a seed outside the ranked pairs (a near-cube fallback) must still be a choice
            kernel = getattr(cfg, name)
            labels.append(tiles_label(kernel.q_tile, kernel.kv_tile))
        choices[f"{name}_tiles"] = sorted(set(labels))
        choices[f"{name}_num_warps"] = list(space.BWD_WARPS)
        choices[f"{name}_num_stages"] = list(space.BWD_STAGES)
    if atomic:
        choices.update({key: [value] for key, value in encode_backward(default).items() if key.startswith("dq_")})
        choices["atomic"] = [True]
    return Search("bwd-atomic" if atomic else "bwd", choices, decode_backward, encode_backward, seeds, default)


def tune(spec: ir.Spec, mask: str, trials: int = 50, storage: str | None = None, timeout: float | None = None,
         seed: int | None = None, progress: bool = False, per_volume: int = 3, backward: bool = False,
         deterministic: bool | None = None) -> TuneResult:
    """Run (or resume) the study of `mask`'s forward kernel, or with `backward` of its backward kernels:
    the deterministic split's, or the atomic-dQ backward's with `deterministic=False` (None: the one
    `maskdsl.compile` runs by default, codegen.config.DETERMINISTIC).

    A database that fails mid-run (a server gone, a dropped connection) is a TuningDatabaseError naming the
    storage (never its password) and what failed: what finished is stored, and the same call resumes.
    """
    try:
        return _tune(spec, mask, trials, storage, timeout, seed, progress, per_volume, backward,
                     DETERMINISTIC if deterministic is None else deterministic)
    except TuningDatabaseError:
        raise
    except Exception as exc:
        cause = _database_failure(exc)
        if cause is None:
            raise
        what = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise TuningDatabaseError(
            f"the tuning database {redact(storage_url(storage))} failed while tuning mask {mask!r} "
            f"({type(cause).__name__}: {what[:300]}); the trials that finished are stored: run the same command "
            "again to resume the study (a trial this run left running is marked failed then)") from exc


def _database_failure(exc: BaseException) -> BaseException | None:
    """The storage error behind `exc`, if any: Optuna can fail on its own afterwards (an UnboundLocalError
    while recording a trial whose state could not be written), with the driver's error as its context."""
    import sqlalchemy.exc

    seen, found = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)):
            found.append(exc)
        exc = exc.__cause__ or exc.__context__
    # the driver's own error says what happened; Optuna's wrapper only that a commit failed
    return next((e for e in found if isinstance(e, sqlalchemy.exc.SQLAlchemyError)), found[0] if found else None)


def _tune(spec: ir.Spec, mask: str, trials: int, storage: str | None, timeout: float | None, seed: int | None,
          progress: bool, per_volume: int, backward: bool, deterministic: bool) -> TuneResult:
    optuna.logging.set_verbosity(logging.WARNING)
    mdef = spec.mask(mask)
    if mdef.documents:
        raise ValueError(f"mask {mask!r} is a document mask: its tiles are fixed by codegen.documents' DocumentConfig "
                         "and the tuning database has no study for it yet (its time depends on each call's lengths); "
                         "hint: `maskdsl bench --documents --sweep` times its candidate tiles")
    if backward and mdef.dynamic:
        raise ValueError(f"mask {mask!r} has a top-k term: backward tuning covers static masks "
                         "(the top-k backward takes the forward's tiles); hint: tune its forward instead")
    device = current_device()
    problem = Problem.of(spec, mask)
    search = (backward_search(spec, mask, problem, trials, per_volume, device, atomic=not deterministic) if backward
              else forward_search(spec, mask, problem, trials, per_volume))
    name = study_name(device, mdef, problem, search.pass_)
    study = optuna.create_study(study_name=name, storage=open_storage(storage), direction="minimize",
                                load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=seed))
    if not study.user_attrs:
        study.set_user_attr("spec", spec.fmt())
        study.set_user_attr("mask", mask)
        study.set_user_attr("mask_text", mdef.expr.fmt())
        study.set_user_attr("grid", list(mdef.layout.shape))
        study.set_user_attr("interpreted", device.interpreted)
        study.set_user_attr("pass", search.pass_)
    fail_dead_tuners_trials(study)
    if not study.trials:
        for cfg in search.seeds:
            study.enqueue_trial(search.encode(cfg), user_attrs={"seed": "simulator"})
    bench = (BackwardBench if backward else Bench)(spec, mask, problem, device)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(TUNER_ATTR, _this_tuner())  # whose trial: a resume on this host can tell it died
        cfg = search.decode({key: trial.suggest_categorical(key, choices) for key, choices in search.choices.items()})
        try:
            return bench.time_ms(cfg)
        except WrongOutput as exc:
            trial.set_user_attr("pruned_reason", f"wrong output: {exc}")
        except Exception as exc:  # does not compile, out of shared memory, unsupported shape, ...
            trial.set_user_attr("pruned_reason", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        raise optuna.TrialPruned()

    study.optimize(objective, n_trials=trials, timeout=timeout, show_progress_bar=progress, catch=())
    if "default_ms" not in study.user_attrs:
        study.set_user_attr("default_config", search.encode(search.default))
        try:
            study.set_user_attr("default_ms", bench.time_ms(search.default))
        except Exception as exc:
            study.set_user_attr("default_error", f"{type(exc).__name__}: {str(exc)[:300]}")
    return summarize(study, device)


TUNER_ATTR = "tuner"  # a trial's user attribute: "host pid start", the tuner process running it


def _this_tuner() -> str:
    return f"{socket.gethostname()} {os.getpid()} {_process_start(os.getpid())}"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (so a reused pid is not taken for the tuner)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def fail_dead_tuners_trials(study) -> list[int]:
    """Mark FAIL the trials left RUNNING by a tuner process of this host that is gone (killed, or ended by
    a database that went away): Optuna would keep them RUNNING forever. Trials of live tuners (a fleet
    sharing the study) and of other hosts are left alone. Returns the numbers of the trials failed."""
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = str(t.user_attrs.get(TUNER_ATTR, "")).split()
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit():
            continue
        pid = int(owner[1])
        if _process_start(pid) is not None and _process_start(pid) == owner[2]:
            continue  # still running (in another tuner process on this host)
        try:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", f"its tuner (pid {pid}) died")
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            failed.append(t.number)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
            pass  # another resuming tuner got there first
    return failed


def summarize(study, device: Device) -> TuneResult:
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    best = min(done, key=lambda t: t.value) if done else None
    return TuneResult(study.study_name, device, decode_any(best.params) if best else None,
                      best.value if best else None, study.user_attrs.get("default_ms"), len(done) + len(pruned),
                      len(pruned))


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
