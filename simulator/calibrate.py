"""Fit the cost model's per-GPU constants from measured kernel times, and test them out of sample.

Each measurement is one kernel config on one suite case: (spec, mask, tiles, warps, stages,
copies = batch x heads, measured ms, and the case's dense SDPA ms). The simulator gives every
query tile's full / partial / union key-tile counts (`SimResult.work`). The predicted time is
the busiest slot's load after list scheduling (`simulator.schedule`), and for a fixed critical
slot that load is linear in the constants:

    us = a_full * F_full + a_partial * F_partial + a_union * F_union + a_tile * F_tile + launch_us
         + [top-k] (topk_call_us + selection bytes / HBM bandwidth)

(F = the critical slot's feature sums, a = microseconds per unit). So the fit alternates: pick
the critical slots with the current constants, solve a non-negative least-squares problem on
relative errors (each row divided by its measured time, so a 20 us and a 60 ms case weigh the
same), repeat until the critical slots stop changing. The tile-size exponent beta is the best of
a small grid. The dense baseline's two constants (per tile, per CTA) are fitted the same way on
the dense times. The selection's traffic is known (bytes at the spec bandwidth `hbm_gbps`, not
fitted): it is subtracted from a top-k row's target. Few parameters on purpose: 6 + 2 + beta,
against 20+ cases x several configs.

`cross_validate` holds each case out in turn (or k folds of cases), fits on the rest and
predicts the held-out case: the out-of-sample error `maskdsl bench --suite` reports and
docs/SIMULATOR.md tabulates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from maskdsl.simulator.cost import _BUILTIN, DENSE_TILE, LOAD, REFERENCE_TILE, CostModel, _load, _match
from maskdsl.simulator.simulation import simulate

BETAS = (0.6, 0.7, 0.8, 0.9, 1.0)
# us: the K/V tile load latency's grid (simulator.pipeline), searched like beta: its regimes are piecewise, and a
# free column started low stays in the compute-bound regime where no row sees it
LOADS = (0.0, 0.5, 1.0, 1.25, 1.5, 1.75, 2.0)
ITERATIONS = 12
HUBER = 0.15  # relative error beyond which a measurement's weight falls off (the 15% goal)


@dataclass(frozen=True)
class Measurement:
    spec: object  # maskdsl.Spec or a path
    mask: str
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    copies: int
    ms: float
    num_warps: int | None = None  # None: codegen's untuned default
    num_stages: int | None = None
    dense_ms: float | None = None  # the case's dense SDPA baseline, for the dense fit and speedups
    case: str = ""  # the suite case (file:mask); cross-validation holds out whole cases
    path: str | None = None  # the forward that ran: "gluon" or "triton"; None: a run older than the Gluon forward

    @property
    def case_key(self) -> str:
        return self.case or self.mask

    @property
    def config(self) -> str:
        dims = lambda t: "x".join(map(str, t))  # noqa: E731
        return f"q{dims(self.q_tile)}_k{dims(self.kv_tile)}_w{self.num_warps or '-'}_s{self.num_stages or '-'}"


_SIMS: dict = {}


def _sim(m: Measurement):
    """The simulation of a measurement (tile counts only depend on the config; cached). The entry holds
    its spec: keyed by id, a spec freed and another allocated at its address would read the old one's
    simulation (a fit in one test gave another test's fit wrong tile counts that way)."""
    key = (id(m.spec), m.mask, m.q_tile, m.kv_tile, m.num_warps, m.num_stages)
    if key not in _SIMS or _SIMS[key][0] is not m.spec:
        _SIMS[key] = (m.spec, simulate(m.spec, m.mask, m.q_tile, m.kv_tile, num_warps=m.num_warps,
                                       num_stages=m.num_stages))
    return _SIMS[key][1]


def _work(m: Measurement):
    """The launch a measurement timed: its Gluon launch only when the run says the Gluon forward ran
    (`path`), so older template-only runs of eligible masks stay template timings."""
    work = _sim(m).work
    if m.path != "gluon" and work.gluon_work is not None:
        return replace(work, gluon_work=None)
    return work


def path_mismatches(measurements: list[Measurement]) -> list[str]:
    """Measurements whose recorded forward disagrees with the simulator's Gluon rule (`simulator.gluon`)."""
    out = []
    for m in measurements:
        rule = "gluon" if _sim(m).work.gluon_work is not None else "triton"
        if m.path is not None and m.path != rule:
            out.append(f"{m.case_key} {m.config}: ran {m.path}, the rule says {rule}")
    return out


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min |a x - b| with x >= 0, by dropping the most negative coefficient until none is (few columns)."""
    active = [j for j in range(a.shape[1]) if np.any(a[:, j])]
    x = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if sol.min() >= 0:
            x[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return x


def _model(theta: np.ndarray, beta: float, sms: int, gpu: str, hbm_gbps: float | None = None) -> CostModel:
    """A CostModel from fitted microseconds (FEATURES order, then launch, then the top-k call), with the
    shipped entry's spec rates of head_dim's cost (`simulator.headdim`)."""
    a_full, a_partial, a_union, a_tile, a_gluon, load_us, launch, topk_call = theta
    unit = a_full if a_full > 0 else max(a_partial, 1e-9)
    return CostModel(name=gpu, c_full=a_full / unit, c_partial=a_partial / unit, c_tile=a_tile / unit, sms=sms,
                     tile_us=unit, pair_exponent=beta, c_union=(a_union / unit) if a_union > 0 else None,
                     launch_us=launch, topk_call_us=topk_call, hbm_gbps=hbm_gbps,
                     c_gluon=(a_gluon / unit) if a_gluon > 0 else None, load_us=load_us, **spec_rates(gpu))


def spec_bandwidth(gpu: str) -> float | None:
    """The shipped entry's HBM bandwidth (GB/s, a spec number) for `gpu`, if it has one."""
    return _spec(gpu).get("hbm_gbps")


SPEC_RATES = ("tensor_tflops", "sfu_tflops")  # counted from the spec sheet, not fitted (simulator.headdim)


def spec_rates(gpu: str) -> dict:
    """The shipped entry's tensor-core and exponential rates for `gpu` (empty where it has none)."""
    entry = _spec(gpu)
    return {k: entry[k] for k in SPEC_RATES if entry.get(k)}


def _spec(gpu: str) -> dict:
    table = _load(_BUILTIN)
    try:
        return table[_match(gpu, table)]
    except KeyError:
        return {}


def _fit_kernel(meas: list[Measurement], sms: int, gpu: str, betas=BETAS, hbm_gbps: float | None = None,
                loads=LOADS):
    """(rms relative error, beta, theta) of the best beta and load latency (theta[LOAD])."""
    y = np.array([m.ms * 1000.0 for m in meas])
    works = [_work(m) for m in meas]
    probe = CostModel(name=gpu, c_full=1, c_partial=1, c_tile=1, sms=sms, hbm_gbps=hbm_gbps, c_gluon=1.0,
                      **spec_rates(gpu))
    known = np.array([probe.selection_bytes_us(w) for w in works])  # selection traffic: not fitted
    calls = np.array([float(w.selection is not None) for w in works])
    if len({m.case_key for m, w in zip(meas, works) if w.selection is not None}) < 2:
        # one top-k case cannot tell a per-call cost from its tiles' c_union (a fit puts time on either
        # at will): leave topk_call_us at 0
        calls[:] = 0.0
    best = None
    for beta, load in ((b, x) for b in betas for x in loads):
        coef = np.array([2.0, 2.6, 2.4, 3.6, 1.7, load])  # us; a start: the critical slots and the regimes
        theta, weight = None, np.ones(len(y))
        for _ in range(ITERATIONS):
            feats = [probe.critical_features(w, beta, coef) for w in works]
            rows = [np.append(np.delete(f, LOAD), [1.0, c]) for f, c in zip(feats, calls)]
            a = np.array(rows) / y[:, None]
            target = 1.0 - (known + np.array([f[LOAD] for f in feats]) * load) / y  # waiting at this latency: known
            root = np.sqrt(weight)[:, None]
            new = _nnls(a * root, target * root[:, 0])
            if theta is not None and np.allclose(new, theta, rtol=1e-6, atol=1e-12):
                break
            theta, coef = new, np.append(np.maximum(new[:5], 1e-9), load)
            weight = _huber_weights(a @ theta - target)
        model = _model(np.insert(theta, LOAD, load), beta, sms, gpu, hbm_gbps)
        pred = np.array([model.schedule(w).time * model.tile_us for w in works])
        loss = float(np.mean(_huber(pred / y - 1.0)))
        if best is None or loss < best[0]:
            best = (loss, beta, np.insert(theta, LOAD, load), float(np.sqrt(np.mean((pred / y - 1.0) ** 2))))
    return best[3], best[1], best[2]


def _huber_weights(residual: np.ndarray) -> np.ndarray:
    """Iteratively reweighted least squares for the Huber loss: a row whose relative error exceeds
    HUBER counts linearly, not quadratically. The configs the model has no term for (2 pipeline
    stages, the few-hundred-CTA outliers measured 2-3x apart for the same work) then stop dragging
    the constants every other case is predicted with."""
    r = np.abs(residual)
    return np.where(r <= HUBER, 1.0, HUBER / np.maximum(r, 1e-12))


def _huber(residual: np.ndarray) -> np.ndarray:
    r = np.abs(residual)
    return np.where(r <= HUBER, 0.5 * r**2, HUBER * (r - 0.5 * HUBER))


def _dense_rows(meas: list[Measurement], sms: int):
    """One row per case with a dense time: features [waves * h * n, waves * h] and the measured us."""
    seen, rows, y = set(), [], []
    for m in meas:
        if m.dense_ms is None or m.case_key in seen:
            continue
        seen.add(m.case_key)
        r = _sim(m)
        n = math.ceil(math.prod(r.shape) / DENSE_TILE)
        waves = math.ceil(n * m.copies / sms)
        h = r.work.head_dim / REFERENCE_TILE
        rows.append([waves * h * n, waves * h])
        y.append(m.dense_ms * 1000.0)
    return np.array(rows), np.array(y)


def fit(measurements: list[Measurement], gpu: str, sms: int = 132, source: str = "", betas=BETAS,
        hbm_gbps: float | None = None, loads=LOADS) -> dict:
    """A cost entry (gpu_costs.json shape) fitted to the measurements.

    `hbm_gbps` (the selection pass's bandwidth) defaults to the shipped entry's spec number.
    """
    if len({m.case_key for m in measurements}) < 3 or len(measurements) < 5:
        raise ValueError(f"fitting the cost model needs at least 5 measurements of 3 cases, got "
                         f"{len(measurements)}; hint: run maskdsl bench --suite")
    hbm_gbps = spec_bandwidth(gpu) if hbm_gbps is None else hbm_gbps
    err, beta, theta = _fit_kernel(measurements, sms, gpu, betas, hbm_gbps, loads)
    model = _model(theta, beta, sms, gpu, hbm_gbps)
    entry = {"c_full": model.c_full, "c_partial": model.c_partial, "c_tile": model.c_tile,
             "c_union": model.c_union, "sms": sms, "tile_us": model.tile_us, "pair_exponent": beta,
             "launch_us": model.launch_us, "topk_call_us": model.topk_call_us, "hbm_gbps": hbm_gbps,
             "load_us": model.load_us, **spec_rates(gpu),
             "head_dim": REFERENCE_TILE, "fit_rms_relative_error": err,
             "fitted_cases": sorted({m.case_key for m in measurements}), "source": source}
    if model.c_gluon is not None:  # only a run with Gluon timings (Hopper) fits the Gluon forward's constants
        entry["c_gluon"] = model.c_gluon
    a, y = _dense_rows(measurements, sms)
    if len(y) >= 2:
        sol = _nnls(a / (y - model.launch_us)[:, None], np.ones(len(y)))
        if sol[0] > 0:
            entry["dense_tile_us"] = float(sol[0])
            entry["dense_cta"] = float(sol[1] / sol[0])
    return entry


def evaluate_fit(measurements: list[Measurement], entry: dict, gpu: str) -> list[dict]:
    """Predicted against measured time (and speedup, when the dense time is known) per measurement."""
    model = CostModel.from_entry(gpu, entry)
    out = []
    for m in measurements:
        r, work = _sim(m), _work(m)
        pred_ms = model.schedule(work).time * model.tile_us / 1000.0
        dense = model.dense_schedule(math.prod(r.shape), r.work.copies, r.work.head_dim, r.q_tiles, r.kv_tiles,
                                     r.work.block_m, r.work.block_n)
        row = {"case": m.case_key, "mask": m.mask, "config": m.config, "q_tile": m.q_tile, "kv_tile": m.kv_tile,
               "measured_ms": m.ms, "predicted_ms": pred_ms, "ratio": m.ms / pred_ms,
               "gluon": model.kernel_work(work).gluon,
               "predicted_dense_ms": dense.time * model.tile_us / 1000.0,
               "worst_tile_speedup": r.worst_tile_speedup, "upper_bound_speedup": r.upper_bound_speedup}
        row["predicted_speedup"] = row["predicted_dense_ms"] / pred_ms
        if m.dense_ms:
            row["dense_ms"] = m.dense_ms
            row["measured_speedup"] = m.dense_ms / m.ms
            row["speedup_ratio"] = row["measured_speedup"] / row["predicted_speedup"]
        out.append(row)
    return out


def cross_validate(measurements: list[Measurement], gpu: str, sms: int = 132, folds="loo",
                   betas=BETAS, hbm_gbps: float | None = None) -> list[dict]:
    """Out-of-sample predictions: each case predicted by constants fitted without it.

    `folds="loo"` holds out one case at a time; an int k splits the sorted cases round-robin into
    k folds. Returns `evaluate_fit` rows (measured, predicted, ratio, speedups) for every
    measurement, each from the fit that did not see its case, with `fold` naming that fit.
    """
    cases = sorted({m.case_key for m in measurements})
    if folds == "loo":
        groups = [[c] for c in cases]
    elif isinstance(folds, int) and 2 <= folds <= len(cases):
        groups = [cases[i::folds] for i in range(folds)]
    else:
        raise ValueError(f"folds must be 'loo' or an int between 2 and {len(cases)} (the cases), got {folds!r}")
    out = []
    for i, held in enumerate(groups):
        train = [m for m in measurements if m.case_key not in held]
        test = [m for m in measurements if m.case_key in held]
        entry = fit(train, gpu, sms, source=f"cross-validation fold {i}", betas=betas, hbm_gbps=hbm_gbps)
        for row in evaluate_fit(test, entry, gpu):
            out.append({**row, "fold": i})
    return out


def summarize(rows: list[dict], best_only: bool = True) -> dict:
    """Worst and median out-of-sample errors (|ratio - 1|), on each case's fastest measured config."""
    if best_only:
        best = {}
        for r in rows:
            if r["case"] not in best or r["measured_ms"] < best[r["case"]]["measured_ms"]:
                best[r["case"]] = r
        rows = list(best.values())
    time_err = [abs(r["ratio"] - 1.0) for r in rows]
    speed_err = [abs(r["speedup_ratio"] - 1.0) for r in rows if "speedup_ratio" in r]
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1.0)) if rows else None
    return {"cases": len(rows), "median_time_error": float(np.median(time_err)) if rows else None,
            "worst_time_error": float(max(time_err)) if rows else None,
            "worst_case": worst and worst["case"],
            "worst_speedup_error": float(max(speed_err)) if speed_err else None,
            "within_15_percent": int(sum(e <= 0.15 for e in time_err))}


def format_cross_validation(rows: list[dict], best_only: bool = True) -> str:
    """The table `maskdsl bench --suite` prints and docs/SIMULATOR.md shows."""
    if best_only:
        rows = [r for r in rows if r["measured_ms"] == min(x["measured_ms"] for x in rows if x["case"] == r["case"])]
    head = f"{'held-out case':40s} {'config':24s} {'measured ms':>11s} {'predicted':>10s} {'meas/pred':>9s} " \
           f"{'x dense':>8s} {'pred x':>7s} {'worst-tile x':>12s}"
    lines = [head]
    for r in sorted(rows, key=lambda r: r["case"]):
        lines.append(f"{r['case'][:40]:40s} {r['config'][:24]:24s} {r['measured_ms']:11.3f} {r['predicted_ms']:10.3f} "
                     f"{r['ratio']:9.2f} {r.get('measured_speedup', math.nan):8.2f} {r['predicted_speedup']:7.2f} "
                     f"{r['worst_tile_speedup']:12.2f}")
    s = summarize(rows, best_only=False)
    lines.append(f"out of sample: {s['within_15_percent']}/{s['cases']} within 15%, median |error| "
                 f"{s['median_time_error']:.1%}, worst {s['worst_time_error']:.1%} ({s['worst_case']})")
    return "\n".join(lines)


def store(entry: dict, gpu: str, path: str | Path) -> Path:
    """Merge a fitted entry into a cost file (what MASKDSL_GPU_COSTS or CostModel.for_gpu(path=) read)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"gpus": {}}
    data.setdefault("gpus", {})[gpu] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
