"""What a benchmark run says: the table, the TMA / pointer-load comparison, and the simulator's cost fit."""

from __future__ import annotations

import time
from pathlib import Path


def _fmt(x, places: int = 3) -> str:
    return "-" if x is None else f"{x:.{places}f}"


def print_table(results) -> None:
    """One row per case: best dense, FlexAttention (and its gather form when timed), ours, ratios, bound, error."""
    gather = any("flex_gather_ms" in r for r in results)
    print(f"\n{'case':34s} {'dense':>9s} {'flex':>9s} " + (f"{'flex gather':>11s} " if gather else "")
          + f"{'ours':>9s} {'x dense':>8s} {'x flex':>7s} {'ideal':>7s} {'bound':>7s} {'err':>8s} {'host us':>8s}  config")
    for r in results:
        best = r.get("ours_best", {})
        print(f"{Path(r['file']).stem + ':' + r['mask']:34s} {_fmt(r.get('dense_best_ms')):>9s} "
              f"{_fmt(r.get('flex_ms')):>9s} " + (f"{_fmt(r.get('flex_gather_ms')):>11s} " if gather else "")
              + f"{_fmt(best.get('ms')):>9s} {_fmt(r.get('speedup_vs_dense'), 2):>8s} "
              f"{_fmt(r.get('speedup_vs_flex'), 2):>7s} {_fmt(r.get('flop_ideal'), 1):>7s} "
              f"{_fmt(r.get('sim_upper_bound'), 2):>7s} {_fmt(best.get('error'), 5) if best else '-':>8s} "
              f"{_fmt(best.get('host_us'), 1):>8s}  "
              f"{best.get('config', '-')}")
    small = [r for r in results if r.get("dense_graph_ms") or r.get("ours_best", {}).get("graph_ms")]
    if small:
        print(f"\nkernel time from CUDA graphs (host launch excluded) where a call takes < 1 ms:\n"
              f"{'case':34s} {'dense':>9s} {'ours':>9s} {'x dense':>8s}  path")
        for r in small:
            best = r.get("ours_best", {})
            dense, ours = r.get("dense_graph_ms"), best.get("graph_ms")
            print(f"{Path(r['file']).stem + ':' + r['mask']:34s} {_fmt(dense):>9s} {_fmt(ours):>9s} "
                  f"{_fmt(dense / ours if dense and ours else None, 2):>8s}  {best.get('path', '-')}")
    single = [r for r in results if r.get("ours_best", {}).get("single_call_ms")]
    if single:
        print(f"\none call from an idle GPU, kernel time (CUPTI; NATTEN's published times are single profiled calls):\n"
              f"{'case':34s} {'dense':>9s} {'ours':>9s} {'x dense':>8s}")
        for r in single:
            dense, ours = r.get("dense_single_call_ms"), r["ours_best"]["single_call_ms"]
            print(f"{Path(r['file']).stem + ':' + r['mask']:34s} {_fmt(dense):>9s} {_fmt(ours):>9s} "
                  f"{_fmt(dense / ours if dense and ours else None, 2):>8s}")


def print_paths(results) -> None:
    """Per case and config: copy-engine (TMA) against pointer loads, and the time TMA saves."""
    print(f"\n{'case':34s} {'config':24s} {'pointer ms':>10s} {'TMA ms':>9s} {'saved':>7s}")
    for r in results:
        by_config: dict[str, dict] = {}
        for e in r["ours"]:
            by_config.setdefault(e["config"], {})[e.get("tma")] = e.get("ms")
        for config, t in by_config.items():
            on, off = t.get(True), t.get(False)
            saved = f"{1 - on / off:.1%}" if on and off else "-"
            print(f"{Path(r['file']).stem + ':' + r['mask']:34s} {config:24s} {_fmt(off):>10s} {_fmt(on):>9s} "
                  f"{saved:>7s}")


def latest_per_case(runs: list[dict]) -> list[dict]:
    """The results of several runs, a case (file stem and mask) measured in more than one taken from the
    latest run given: a re-measurement replaces the old entry instead of counting twice."""
    by_case = {}
    for run in runs:
        for r in run["results"]:
            by_case[(Path(r["file"]).stem, r["mask"])] = r
    return list(by_case.values())


def _suite_file(path: str) -> str:
    """A run's mask file, or the suite's file of that name when the run was made in another checkout."""
    if Path(path).exists():
        return path
    from maskdsl.bench.cases import suite_files

    named = [f for f in suite_files() if f.name == Path(path).name]
    if not named:
        raise FileNotFoundError(f"{path}: no such mask file, and the suite has none of that name")
    return str(named[0])


def calibrate(results, gpu: str) -> dict | None:
    """Fit the simulator's cost constants to this run, store them, report predicted vs measured, and
    predict each case from a fit on the other cases (leave one case out): the out-of-sample check."""
    from maskdsl.codegen.config import KernelConfig
    from maskdsl.lang.parser import load
    from maskdsl.simulator.calibrate import (Measurement, cross_validate, evaluate_fit, fit,
                                             format_cross_validation, path_mismatches, store, summarize)
    from maskdsl.simulator.cost import fitted_path

    specs = {r["file"]: load(_suite_file(r["file"])) for r in results}

    def measurement(r, e):
        # kernel time: a CUDA-graph replay where the run has one (one-head cases are host-bound under do_bench)
        cfg = KernelConfig.from_key(e["config"])
        return Measurement(specs[r["file"]], r["mask"], cfg.q_tile, cfg.kv_tile, r["batch"] * r["heads"],
                           e.get("graph_ms") or e["ms"], cfg.num_warps, cfg.num_stages,
                           dense_ms=r.get("dense_graph_ms") or r.get("dense_best_ms"),
                           case=f"{Path(r['file']).stem}:{r['mask']}", path=e.get("path"))

    def correct(e):
        return "ms" in e and e.get("unwritten", 0) == 0 and e.get("error", 1.0) < 2e-2

    meas = [measurement(r, e) for r in results for e in r.get("ours", []) if correct(e)]
    if len(meas) < 3:
        return None
    for line in path_mismatches(meas):
        print(f"warning: the simulator's Gluon rule disagrees with the run: {line}")
    entry = fit(meas, gpu, source=f"fitted by maskdsl bench --suite on {time.strftime('%Y-%m-%d')}, "
                                  f"{len(meas)} measurements")
    path = store(entry, gpu, fitted_path())
    print(f"\nfitted cost constants for {gpu} -> {path}: {entry}")
    for r in results:
        best = r.get("ours_best")
        if not best:
            continue
        ev = evaluate_fit([measurement(r, best)], entry, gpu)[0]
        r["predicted_ms"] = ev["predicted_ms"]
        r["measured_over_predicted"] = ev["ratio"]
        r["predicted_speedup_vs_dense"] = r["dense_best_ms"] / ev["predicted_ms"]
        print(f"  {Path(r['file']).stem}:{r['mask']}: measured {ev['measured_ms']:.3f} ms, "
              f"predicted {ev['predicted_ms']:.3f} ms (measured/predicted {ev['ratio']:.2f})")
    try:
        cv = cross_validate(meas, gpu)
    except ValueError as exc:  # too few cases to hold one out
        print(f"\nno out-of-sample check: {exc}")
    else:
        print("\nsimulator out of sample (each case predicted by a fit on the other cases):")
        print(format_cross_validation(cv))
        entry = {**entry, "cross_validation": cv, "cross_validation_summary": summarize(cv)}
    return entry
