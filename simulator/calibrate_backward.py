"""Fit the backward's constants (`CostModel.bwd_*`, `dense_bwd_tile_us`) from measured backward times.

Each measurement is one backward config on one case with its measured backward time (the
`bwd_ms` of `maskdsl bench --train`: autograd.grad on a retained graph, do_bench median). As for
the forward (`simulator.calibrate`), the predicted time of each kernel is its busiest slot's load
after list scheduling, linear in the constants for fixed critical slots:

    us = a_product * (4 F_dkdv + 3 F_dq + 5 F_atomic) + a_program * F_program + a_atomic * F_add
         + launches + the atomic backward's buffer passes (bytes at the HBM bandwidth, not fitted)

(F_atomic: the atomic-dQ backward's walked pairs, five products each; F_add: its float32 atomic adds in
128-row x head_dim tiles; a split backward has neither, an atomic one neither F_dkdv nor F_dq),
so the fit alternates picking the critical slots and a non-negative least-squares solve on relative
errors; the tile-size exponent and the partial pairs' premium are the best of small grids. The two
walks share one cost per 128^3 product (`backward_work.PRODUCTS`: a dK/dV pair is 4 products, a dQ
pair 3), so a_dkdv / a_dq = 4 / 3 is not fitted: fitted freely, the split was poorly determined (both
walks visit the same pairs) and came out 5.5 / 2.0. Two linear constants on purpose: the measurements
are 4 cases x 9 configs. The atomic-dQ backward (configs whose key ends in '-atomic') adds one,
`bwd_atomic_us`, left None when no atomic backward was measured.

The dense SDPA backward's one constant (per 128x128 tile) is fitted on the cases that measured it.

Measurements are recorded in gpu_costs.json with their source (`bwd_measurements`); their configs
are 'bwd-...' keys, parsed by whoever calls `measurements_from_records` (codegen owns the parser and
the simulator does not import codegen). `records_from_bench` turns a `maskdsl bench --train --json`
file into such records; `maskdsl simulate --calibrate-backward` refits from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from maskdsl.simulator.backward import KERNELS, atomic_pass_bytes, backward_work
from maskdsl.simulator.calibrate import _nnls
from maskdsl.simulator.backward_work import PRODUCTS
from maskdsl.simulator.cost import DENSE_TILE, REFERENCE_TILE, CostModel
from maskdsl.simulator.schedule import shared_schedule
from maskdsl.lang.parser import as_spec

BETAS = (0.6, 0.7, 0.8, 0.9, 1.0)
PARTIAL = (1.0, 1.25, 1.5, 2.0)
ITERATIONS = 8


@dataclass(frozen=True)
class BackwardMeasurement:
    spec: object  # maskdsl.Spec or a path
    mask: str
    config: object  # a BackwardConfig (or anything with .dkdv/.dq configs)
    ms: float  # measured backward time
    case: str = ""
    dense_bwd_ms: float | None = None  # the dense SDPA backward on the same problem, when measured


def records_from_bench(results: list[dict], source: str = "", root=".") -> list[dict]:
    """`bwd_measurements` records (gpu_costs.json's shape) from the `results` of a `maskdsl bench --train
    --json` file: per case the backward configs whose gradients passed the bench's check (as its
    `ours_best`), each with its `bwd_ms`, and the dense SDPA backward it picked (`dense_best`); a top-k case
    (its backward config 'topk', the forward's tiles) is not the static backward modelled here. A case is
    the spec file's stem; its path is kept relative to `root` (the repository) where it lies under it or
    under a `bench/` folder (a run in another copy of the repository)."""
    out = []
    for r in results:
        good = [e for e in r.get("ours", []) if "bwd_ms" in e and not e.get("grad_nan")
                and str(e.get("backward_config", "")).startswith("bwd-")
                and max(e.get("dq_error", 0.0), e.get("dk_error", 0.0), e.get("dv_error", 0.0)) < 3e-2]
        if not good:
            continue
        path = Path(r["file"])
        spec = _repo_path(path, Path(root))
        dtype = str(r.get("dtype", "")).removeprefix("torch.")
        record = {"case": path.stem, "spec": spec, "mask": r["mask"],
                  "dtype": {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype),
                  "fwd_config": good[0]["config"], "fwd_ms": round(float(good[0]["fwd_ms"]), 4),
                  "backward_ms": {e["backward_config"]: round(float(e["bwd_ms"]), 4) for e in good}}
        dense = r.get("dense_best")
        if dense and "bwd_ms" in dense:
            record["dense_bwd_ms"] = round(float(dense["bwd_ms"]), 4)
        if source:
            record["source"] = source
        out.append(record)
    return out


def _repo_path(path, root) -> str:
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        parts = path.parts
        return str(Path(*parts[len(parts) - 1 - parts[::-1].index("bench"):])) if "bench" in parts else str(path)


def measurements_from_records(records: list[dict], parse_config, root=".") -> list[BackwardMeasurement]:
    """gpu_costs.json's `bwd_measurements` -> measurements; `parse_config` turns a 'bwd-...' key into a
    config (codegen.config.BackwardConfig.from_key). Spec paths are relative to `root` (the repository)."""
    out = []
    for r in records:
        for cfg, ms in r["backward_ms"].items():
            out.append(BackwardMeasurement(str(Path(root) / r["spec"]), r["mask"], parse_config(cfg), float(ms),
                                           r["case"], r.get("dense_bwd_ms")))
    return out


_WORKS: dict = {}


def _atomic(m: BackwardMeasurement) -> bool:
    return bool(getattr(m.config, "atomic", False))


def _works(m: BackwardMeasurement):
    """The kernels the config launches: dK/dV and dQ, or the atomic-dQ backward's dK/dV alone."""
    key = (str(m.spec), m.mask, repr(m.config))
    if key not in _WORKS:
        atomic = _atomic(m)
        kernels = zip(KERNELS[:1] if atomic else KERNELS, (m.config.dkdv, m.config.dq))
        _WORKS[key] = [backward_work(m.spec, m.mask, name, c.q_tile, c.kv_tile, c.num_warps, c.num_stages,
                                     atomic=atomic) for name, c in kernels]
    return _WORKS[key]


def _passes_us(model: CostModel, m: BackwardMeasurement) -> float:
    """The atomic backward's buffer passes (zero-fill, cast): their bytes at the HBM bandwidth."""
    return model.memory_pass_us(*atomic_pass_bytes(m.spec, m.mask)) if _atomic(m) else 0.0


def _fixed_us(model: CostModel, m: BackwardMeasurement) -> float:
    """What no fitted constant pays: a launch per kernel, and the buffer passes."""
    return len(_works(m)) * model.launch_us + _passes_us(model, m)


def _critical(work, beta: float, partial: float, coef: np.ndarray, sms: int) -> np.ndarray:
    """Feature sums (BACKWARD_FEATURES, slot factor included) of the slot finishing last."""
    k = work.ctas_per_sm
    feats = work.features(beta, partial) * k
    jobs = np.tile(feats @ coef, work.copies)
    return shared_schedule(jobs, jobs / k, sms, k, feats=np.tile(feats, (work.copies, 1)))[1]


def _with(model: CostModel, theta, beta, partial, atomic: bool) -> CostModel:
    return replace(model, bwd_dkdv_us=float(theta[0]), bwd_dq_us=float(theta[1]), bwd_program_us=float(theta[2]),
                   bwd_partial=partial, bwd_pair_exponent=beta, bwd_atomic_us=float(theta[4]) if atomic else None)


def predict_ms(model: CostModel, m: BackwardMeasurement) -> float:
    kernels = [model.backward_kernel_us(w) for w in _works(m)]
    if None in kernels:
        raise ValueError(f"{m.case} {_label(m.config)}: the model has no constant for this backward; hint: fit "
                         "bwd_atomic_us on atomic-dQ measurements (config keys ending in '-atomic')")
    return (sum(kernels) + _passes_us(model, m)) / 1000.0


def fit_backward(measurements: list[BackwardMeasurement], model: CostModel, source: str = "",
                 betas=BETAS, partials=PARTIAL) -> dict:
    """The backward fields of a cost entry (gpu_costs.json shape), fitted to the measurements;
    `model` gives the SM count, the launch cost (the forward's) and the HBM bandwidth of the atomic
    backward's buffer passes. `bwd_atomic_us` is None unless some measurement is of the atomic backward."""
    if len({m.case for m in measurements}) < 2 or len(measurements) < 4:
        raise ValueError(f"fitting the backward needs at least 4 measurements of 2 cases, got {len(measurements)}; "
                         "hint: run maskdsl bench --train")
    atomic = any(_atomic(m) for m in measurements)
    y = np.array([m.ms * 1000.0 - _fixed_us(model, m) for m in measurements])
    if y.min() <= 0:
        worst = measurements[int(np.argmin(y))]
        raise ValueError(f"{worst.case} {_label(worst.config)} measured {worst.ms} ms, no more than its launches "
                         "and buffer passes; hint: check the bench file's bwd_ms")
    # per BACKWARD_FEATURES column, its 128^3 products per walked pair (0: not a walk)
    products = np.array([PRODUCTS["dkdv"], PRODUCTS["dq"], 0, PRODUCTS["atomic"], 0], np.float64)
    best = None
    for beta in betas:
        for partial in partials:
            coef, theta = products + np.array([0, 0, 1.0, 0, 1.0]), None
            for _ in range(ITERATIONS):
                rows = np.array([sum(_critical(w, beta, partial, coef, model.sms) for w in _works(m))
                                 for m in measurements])
                # one cost per 128^3 product: the walks differ by their products per pair, not by a constant
                sol = _nnls(np.stack([rows @ products, rows[:, 2], rows[:, 4]], axis=1) / y[:, None], np.ones(len(y)))
                new = np.array([sol[0] * products[0], sol[0] * products[1], sol[1], sol[0] * products[3], sol[2]])
                if theta is not None and np.allclose(new, theta, rtol=1e-6, atol=1e-12):
                    break
                theta, coef = new, np.maximum(new, 1e-9)
            fitted = _with(model, theta, beta, partial, atomic)
            err = _rms([predict_ms(fitted, m) / m.ms - 1.0 for m in measurements])
            if best is None or err < best[0]:
                best = (err, beta, partial, theta)
    err, beta, partial, theta = best
    entry = {"bwd_dkdv_us": float(theta[0]), "bwd_dq_us": float(theta[1]), "bwd_program_us": float(theta[2]),
             "bwd_atomic_us": float(theta[4]) if atomic else None,
             "bwd_partial": partial, "bwd_pair_exponent": beta, "bwd_fit_rms_relative_error": err,
             "bwd_fitted_cases": sorted({m.case for m in measurements}), "bwd_source": source}
    dense = _fit_dense(measurements, model)
    if dense is not None:
        entry["dense_bwd_tile_us"] = dense
    return entry


def _fit_dense(measurements, model: CostModel) -> float | None:
    """us per 128x128 tile of the dense backward, least squares on relative errors over the cases measuring it."""
    seen, a = {}, []
    for m in measurements:
        if m.dense_bwd_ms is None or m.case in seen:
            continue
        seen[m.case] = m
        w = _works(m)[-1]  # the dQ kernel, or the atomic walk: batch x heads programs either way
        tokens = as_spec(m.spec).mask(m.mask).layout.tokens
        n = math.ceil(tokens / DENSE_TILE)
        copies = w.copies
        waves = math.ceil(n * copies / model.sms)
        a.append(waves * n * w.head_dim / REFERENCE_TILE / (m.dense_bwd_ms * 1000.0 - model.launch_us))
    if not a:
        return None
    a = np.array(a)
    return float(a.sum() / (a**2).sum())


def evaluate_backward(measurements: list[BackwardMeasurement], model: CostModel) -> list[dict]:
    """Measured against predicted backward time per measurement (and the dense backward where measured)."""
    rows = []
    for m in measurements:
        pred = predict_ms(model, m)
        row = {"case": m.case, "config": _label(m.config), "mode": "atomic" if _atomic(m) else "split",
               "measured_ms": m.ms, "predicted_ms": pred,
               "ratio": m.ms / pred, "error": pred / m.ms - 1.0}
        if m.dense_bwd_ms is not None:
            w = _works(m)[-1]  # the dQ kernel, or the atomic walk: batch x heads programs either way
            tokens = as_spec(m.spec).mask(m.mask).layout.tokens
            row["dense_bwd_ms"] = m.dense_bwd_ms
            row["predicted_dense_bwd_ms"] = model.dense_backward_us(tokens, w.copies, w.head_dim) / 1000.0
        rows.append(row)
    return rows


def cross_validate_backward(measurements: list[BackwardMeasurement], model: CostModel) -> list[dict]:
    """Leave one case out: each case's timings predicted by backward constants fitted on the other cases
    (`evaluate_backward` rows, with `fold` naming the held-out case); `model` gives the forward's constants."""
    rows = []
    for case in sorted({m.case for m in measurements}):
        train = [m for m in measurements if m.case != case]
        fitted = replace(model, **{k: v for k, v in fit_backward(train, model).items() if k in _FIELDS})
        rows += [{**r, "fold": case} for r in evaluate_backward([m for m in measurements if m.case == case], fitted)]
    return rows


_FIELDS = ("bwd_dkdv_us", "bwd_dq_us", "bwd_program_us", "bwd_atomic_us", "bwd_partial", "bwd_pair_exponent",
           "dense_bwd_tile_us")


def format_evaluation(rows: list[dict]) -> str:
    """The rows as a table, then the errors' summary: of all rows and, where both backwards were
    measured, of each ('split:', 'atomic:')."""
    lines = [f"{'case':22s} {'backward config':55s} {'measured ms':>11s} {'predicted':>10s} {'meas/pred':>9s}"]
    for r in rows:
        lines.append(f"{r['case'][:22]:22s} {r['config'][:55]:55s} {r['measured_ms']:11.3f} {r['predicted_ms']:10.3f} "
                     f"{r['ratio']:9.2f}")
    lines.append(_summary(rows))
    modes = sorted({r.get("mode", "split") for r in rows}, reverse=True)
    if len(modes) > 1:
        lines += [f"{mode}: " + _summary([r for r in rows if r.get("mode", "split") == mode]) for mode in modes]
    return "\n".join(lines)


def _summary(rows: list[dict]) -> str:
    errs = [abs(r["error"]) for r in rows]
    worst = rows[int(np.argmax(errs))]
    return (f"rms relative error {_rms(errs):.1%}, median |error| {float(np.median(errs)):.1%}, "
            f"{sum(e <= 0.15 for e in errs)}/{len(errs)} within 15%, worst {max(errs):.1%} "
            f"({worst['case']} {worst['config']})")


def _label(config) -> str:
    key = getattr(config, "key", None)
    return key() if callable(key) else repr(config)


def _rms(values) -> float:
    return float(np.sqrt(np.mean(np.square(values))))
