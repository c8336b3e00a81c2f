"""`maskdsl bench`: correctness, then in one run dense SDPA, FlexAttention and our kernels (GPU only).

Every number is a `triton.testing.do_bench` median in milliseconds, all baselines measured in
the same process on the same inputs. Correctness is checked on a random sample of rows against
the float64 reference (rows only: the 115,200-token cases fit that way). `bench_mask` runs the
steps in order: the case (inputs and reference rows), the dense baselines, our configs, FlexAttention,
the simulator's view of the best config; each step writes its part of one result record.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from maskdsl.bench.cases import suite_cases
from maskdsl.bench.configs import PATH_CONFIGS, candidate_configs

TIMER = {"warmup": 50, "rep": 300}  # do_bench settings of every benchmark number

def _flex_tile(mask):
    return {1: (128,), 2: (8, 16)}.get(mask.layout.rank, (2, 8, 8))


def _failure(exc: Exception, limit: int = 300) -> str:
    return f"{type(exc).__name__}: {str(exc)[:limit]}"


@dataclass
class Case:
    """One mask's benchmark problem: the inputs on the GPU and the float64 reference of sampled rows."""

    spec: object
    mask: object  # ir.MaskDef
    attention: object  # ir.Attention | None
    problem: object  # maskdsl.harness.measure.Problem
    q: object
    k: object
    v: object
    reference: object  # maskdsl.harness.measure.RowReference
    device: str = "cuda"

    def synchronize(self) -> None:
        import torch

        if self.device != "cpu":
            torch.cuda.synchronize()


def make_case(spec, mask_name: str, rows: int = 128, seed: int = 0, device: str = "cuda") -> Case:
    from maskdsl.api import resolve
    from maskdsl.harness.measure import Problem, make_inputs, reference_rows, sample_rows

    spec, mask, attention = resolve(spec, mask_name)
    problem = Problem.for_attention(attention)
    tokens = mask.layout.tokens
    q, k, v = make_inputs(problem, tokens, device, seed)
    reference = reference_rows(q, k, v, spec, mask.name, sample_rows(tokens, rows, seed))
    return Case(spec, mask, attention, problem, q, k, v, reference, device)


def density(mask) -> float:
    """Exact density of a static mask; for top-k, the picked fraction of key blocks."""
    from maskdsl.analysis.counts import attended_pairs

    tokens = mask.layout.tokens
    if not mask.dynamic:
        return attended_pairs(mask.expr, mask.layout.shape) / tokens**2
    from maskdsl.harness.topk import block_count, normal_form

    topk = normal_form(mask.expr).topk
    blocks = block_count(mask.layout.shape, topk.block)
    return min(topk.k, blocks) / blocks


def record(case: Case) -> dict:
    """The result record's header: what was measured."""
    from maskdsl.harness.measure import torch_dtype

    p, mask = case.problem, case.mask
    d = density(mask)
    return {"device": case.device, "mask": mask.name, "expr": mask.expr.fmt(), "grid": list(mask.layout.shape), "tokens": mask.layout.tokens,
            "batch": p.batch, "heads": p.heads, "kv_heads": p.kv_heads, "head_dim": p.head_dim,
            "dtype": str(torch_dtype(p.dtype)), "density": d, "flop_ideal": 1 / d}


def dense_step(case: Case, result: dict) -> float:
    """Each SDPA backend alone; the best one is the baseline of every speedup."""
    from maskdsl.harness.measure import best_dense, dense_times

    times, errors = dense_times(case.q, case.k, case.v, **TIMER)
    for name, message in errors.items():
        result[f"dense_{name}_error"] = message
    result["dense_ms"] = times
    result["dense_best_ms"] = best_dense(times)[1]
    graphs = [ms for name, ms in times.items() if name.endswith("_graph") and ms]
    if graphs:
        result["dense_graph_ms"] = min(graphs)
    return result["dense_best_ms"]


def configs_for(case: Case, configs=None) -> list:
    """The configs to time: those given, else the candidates (top-k: its own tile with a few launch knobs)."""
    if configs is not None:
        return configs
    if case.mask.dynamic:
        from maskdsl.codegen.build import untuned_config
        from maskdsl.codegen.config import KernelConfig

        base = untuned_config(case.mask, case.problem.head_dim)
        return [base] + [KernelConfig(base.q_tile, base.kv_tile, w, s) for w, s in ((4, 2), (8, 3))
                         if (w, s) != (base.num_warps, base.num_stages)]
    return candidate_configs(case.mask, case.problem.head_dim, attention=case.attention)


def run_config(case: Case, cfg, best_dense: float, tma: bool | None = None) -> dict:
    """Compile, run once into a poisoned output, check the sampled rows, time. `tma` forces MASKDSL_TMA."""
    import torch

    from maskdsl.codegen.build import compile_attention
    from maskdsl.harness.measure import GRAPH_BELOW_MS, graph_time_ms, host_us, time_ms

    entry = {"config": cfg.key()}
    if tma is not None:
        entry["tma"] = tma
    saved = os.environ.get("MASKDSL_TMA")
    try:
        if tma is not None:
            os.environ["MASKDSL_TMA"] = "1" if tma else "0"
        start = time.perf_counter()
        fn = compile_attention(case.spec, case.mask.name, cfg)
        out = torch.full_like(case.q, float("nan"))
        fn(case.q, case.k, case.v, out=out)
        case.synchronize()
        entry["compile_and_first_call_s"] = time.perf_counter() - start
        check = case.reference.check(out)
        entry["unwritten"] = check.unwritten
        entry["error"] = check.error
        entry["ms"] = time_ms(lambda: fn(case.q, case.k, case.v), **TIMER)
        if case.device == "cuda" and entry["ms"] < GRAPH_BELOW_MS:  # host-bound: the kernel's own time too
            entry["graph_ms"] = graph_time_ms(lambda: fn(case.q, case.k, case.v), **TIMER)
        if case.device == "cuda":  # the warm host time of a call, its own column
            entry["host_us"] = host_us(lambda: fn(case.q, case.k, case.v), sync=torch.cuda.synchronize)
        if hasattr(fn, "gluon_blocker"):
            entry["path"] = "gluon" if fn.gluon_blocker(case.q, case.k, case.v) is None else "triton"
        dense_flops = 4 * case.problem.batch * case.problem.heads * case.mask.layout.tokens**2 * case.problem.head_dim
        entry["speedup_vs_dense"] = best_dense / entry["ms"]
        entry["tflops_dense_equivalent"] = dense_flops / entry["ms"] / 1e9
        entry["tflops_actual"] = dense_flops * density(case.mask) / entry["ms"] / 1e9
        if tma is not None:  # what the comparison explains the difference with
            entry["shell_free"] = getattr(getattr(fn, "plan", None), "shell_free", None)
            entry["regs"] = getattr(fn.module.attention_fwd, "n_regs", None)
    except Exception as exc:  # a config that fails must not hide the others
        entry["failed"] = _failure(exc)
    finally:
        if saved is None:
            os.environ.pop("MASKDSL_TMA", None)
        else:
            os.environ["MASKDSL_TMA"] = saved
    return entry


def pick_best(result: dict, best_dense: float) -> None:
    """The fastest config whose output is complete and within the GPU tolerance."""
    from maskdsl.harness.measure import tolerance

    tol = tolerance(result["device"])
    good = [e for e in result["ours"] if "ms" in e and e["unwritten"] == 0 and e["error"] < tol]
    if good:
        best = min(good, key=lambda e: e["ms"])
        result["ours_best"] = best
        result["speedup_vs_dense"] = best_dense / best["ms"]


def single_call_step(case: Case, result: dict, configs) -> None:
    """The best config and the best dense backend timed one call from an idle GPU (kernel time,
    maskdsl.harness.measure.single_call_ms), as NATTEN's published kernel times are single profiled calls: the
    column set beside NATTEN's figures."""
    from maskdsl.codegen.build import compile_attention
    from maskdsl.harness.measure import best_dense, dense_call, single_call_ms

    try:
        if "ours_best" in result:
            cfg = next(c for c in configs if c.key() == result["ours_best"]["config"])
            fn = compile_attention(case.spec, case.mask.name, cfg)
            result["ours_best"]["single_call_ms"] = single_call_ms(lambda: fn(case.q, case.k, case.v))
        backend = best_dense(result["dense_ms"])[0]
        result["dense_single_call_ms"] = single_call_ms(dense_call(case.q, case.k, case.v, backend))
    except Exception as exc:  # noqa: BLE001 - a timing that fails must not lose the case's other numbers
        result["single_call_failed"] = _failure(exc, 200)


def flex_step(case: Case, result: dict, best_dense: float, form: str = "arithmetic") -> None:
    """FlexAttention with the same mask on tile-major tokens; `form` is its mask_mod's (bench.flex).

    The arithmetic form writes the flex_* keys (the comparison "x Flex" uses); another form writes
    flex_<form>_* keys beside them.
    """
    from maskdsl.bench.flex import FlexRunner
    from maskdsl.harness.measure import time_ms

    prefix = "flex" if form == "arithmetic" else f"flex_{form}"
    try:
        import torch

        # Each case compiles flex_attention anew; past dynamo's recompile limit (8) it silently runs the
        # unfused eager path, which materializes [L, L] scores (out of memory, or 10-100x slower): a suite
        # run measured that on its 9th case onwards. Start each case from a clean compile cache.
        torch._dynamo.reset()
        tile = _flex_tile(case.mask)
        start = time.perf_counter()
        runner = FlexRunner(case.mask, tile, case.device, compile=case.device != "cpu", form=form)
        result[f"{prefix}_blockmask_from_analysis_s"] = time.perf_counter() - start
        qp, kp, vp = runner.permute(case.q), runner.permute(case.k), runner.permute(case.v)
        start = time.perf_counter()
        out_p = runner.attend_permuted(qp, kp, vp)
        case.synchronize()
        result[f"{prefix}_compile_s"] = time.perf_counter() - start
        result[f"{prefix}_error"] = case.reference.check(runner.unpermute(out_p, case.q)).error
        result[f"{prefix}_tile"] = list(tile)
        result[f"{prefix}_ms"] = time_ms(lambda: runner.attend_permuted(qp, kp, vp), **TIMER)
        result[f"{prefix}_speedup_vs_dense"] = best_dense / result[f"{prefix}_ms"]
        if "ours_best" in result:
            key = "speedup_vs_flex" if form == "arithmetic" else f"speedup_vs_flex_{form}"
            result[key] = result[f"{prefix}_ms"] / result["ours_best"]["ms"]
    except Exception as exc:
        result[f"{prefix}_failed"] = _failure(exc)


def flex_topk_step(case: Case, result: dict, best_dense: float) -> None:
    """FlexAttention with a BlockMask built from the same selection (pure top-k: picked blocks are full)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from maskdsl.codegen.build import compile_attention
    from maskdsl.harness.measure import time_ms

    try:
        fn = compile_attention(case.spec, case.mask.name, None)
        if fn.form.static is not None or type(fn.form.restrict).__name__ != "Full":
            result["flex_note"] = "flex comparison implemented for pure top-k only"
            return
        q, k, v = case.q, case.k, case.v
        block = fn.form.topk.volume
        shape = case.mask.layout.shape
        if len(shape) > 1:
            # FlexAttention's blocks are runs of consecutive tokens: lay the grid out block-major (each box
            # of the grid contiguous), once, outside the timings; our kernel reads the row-major grid
            from maskdsl.harness.topk import token_blocks

            if any(n % b for n, b in zip(shape, fn.form.topk.block)):
                result["flex_note"] = "flex comparison needs blocks that divide the grid"
                return
            perm = torch.sort(token_blocks(shape, fn.form.topk.block), stable=True).indices.to(q.device)
            q, k, v = (x[:, :, perm].contiguous() for x in (q, k, v))
            result["flex_layout"] = "block-major permutation (not timed)"

        def block_mask():
            picked, _, count = fn.select(case.q, case.k)  # on the row-major grid, as our kernel's; same block order
            # full-width index rows, picked blocks first (FlexAttention reads only the first `count`)
            order = torch.argsort((picked == 0).to(torch.int8), dim=-1, stable=True).to(torch.int32)
            return BlockMask.from_kv_blocks(torch.zeros_like(count), order, count, order, BLOCK_SIZE=block,
                                            mask_mod=None)

        flex = torch.compile(flex_attention, dynamic=False)
        bm = block_mask()
        gqa = q.shape[1] != k.shape[1]
        out = flex(q, k, v, block_mask=bm, enable_gqa=gqa)
        if len(shape) > 1:
            out = torch.empty_like(out).index_copy_(2, perm, out)  # back to row-major for the checks
        result["flex_error"] = case.reference.check(out).error
        result["flex_vs_ours_max_diff"] = (out.float() - fn(case.q, case.k, case.v).float()).abs().max().item()
        result["flex_ms"] = time_ms(lambda: flex(q, k, v, block_mask=bm, enable_gqa=gqa), **TIMER)
        result["flex_with_selection_ms"] = time_ms(lambda: flex(q, k, v, block_mask=block_mask(), enable_gqa=gqa),
                                                   **TIMER)
        result["selection_ms"] = time_ms(lambda: fn.select(case.q, case.k), **TIMER)
        result["flex_speedup_vs_dense"] = best_dense / result["flex_with_selection_ms"]
        if "ours_best" in result:
            result["speedup_vs_flex"] = result["flex_with_selection_ms"] / result["ours_best"]["ms"]
    except Exception as exc:
        result["flex_failed"] = _failure(exc)


def simulator_step(case: Case, result: dict, configs) -> None:
    """The simulator's tile counts and upper bound at the best measured config."""
    from maskdsl.simulator import simulate

    if "ours_best" not in result:
        return
    try:
        best_cfg = next(c for c in configs if c.key() == result["ours_best"]["config"])
        sim = simulate(case.spec, mask=case.mask.name, q_tile=best_cfg.q_tile, kv_tile=best_cfg.kv_tile,
                       num_warps=best_cfg.num_warps, num_stages=best_cfg.num_stages)
        result["sim_upper_bound"] = sim.upper_bound_speedup
        result["sim_worst_tile_speedup"] = sim.worst_tile_speedup
        result["sim_predicted_speedup"] = sim.predicted_speedup
        result["sim_full_tiles"] = int(sim.full_tiles)
        result["sim_partial_tiles"] = int(sim.partial_tiles)
        result["sim_dense_tiles"] = int(sim.dense_tiles)
    except Exception as exc:
        result["sim_failed"] = _failure(exc, 200)


def bench_mask(spec, mask_name: str, configs=None, with_flex: bool = True, rows: int = 128, seed: int = 0,
               flex_gather: bool = False, paths: bool = False, device: str = "cuda") -> dict:
    """One mask, every step; `paths` runs each config with copy-engine (TMA) loads and with pointer loads.

    `device="cpu"` runs the same steps through the interpreter on a small spec (the steps' test).
    """
    case = make_case(spec, mask_name, rows, seed, device)
    result = record(case)
    best_dense = dense_step(case, result)
    configs = configs_for(case, configs)
    result["ours"] = []
    for cfg in configs:
        for tma in ((True, False) if paths else (None,)):
            result["ours"].append(run_config(case, cfg, best_dense, tma))
            print(f"    {case.mask.name} {result['ours'][-1]}", flush=True)
    pick_best(result, best_dense)
    if case.device == "cuda":
        single_call_step(case, result, configs)
    if with_flex and case.mask.dynamic:
        flex_topk_step(case, result, best_dense)
    elif with_flex:
        flex_step(case, result, best_dense)
        if flex_gather:
            flex_step(case, result, best_dense, form="gather")
    simulator_step(case, result, configs)
    return result


def environment() -> dict:
    import torch
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def save_run(out_json, env: dict, results: list[dict], **extra) -> None:
    """A run as every bench command writes it, after each case (a run cut short keeps what finished)."""
    import json

    Path(out_json).write_text(json.dumps({"environment": env, "results": results, **extra}, indent=1))


def best_configs(runs: list[dict]) -> dict[str, str]:
    """{'file stem:mask': the best config's key} of saved suite runs (a case in several: the last run's),
    so a later call can re-time exactly the configs a table was made of (`--configs-from`)."""
    best = {}
    for run in runs:
        for r in run["results"]:
            if r.get("ours_best"):
                best[f"{Path(r['file']).stem}:{r['mask']}"] = r["ours_best"]["config"]
    return best


def run_suite(files, out_json: str | None, only: str | None = None, flex_gather: bool = False,
              paths: bool = False, with_flex: bool = True, configs_from: dict[str, str] | None = None) -> list[dict]:
    """Every attention statement of the suite files in one process; the cost fit from the run (not with paths).

    `configs_from` ({'stem:mask': config key}, `best_configs`): time only that config of each case it names
    (and skip the cases it does not): a re-measurement of a saved table without its whole search."""
    from maskdsl.bench.report import calibrate, print_table
    from maskdsl.codegen.config import KernelConfig

    env = environment()
    print(f"# {env}", flush=True)
    results = []
    for path, spec, att in suite_cases(files, only):
        if paths and Path(path).stem not in PATH_CONFIGS:
            continue
        configs = [KernelConfig.from_key(c) for c in PATH_CONFIGS[Path(path).stem]] if paths else None
        if configs_from is not None:
            key = configs_from.get(f"{Path(path).stem}:{att.mask}")
            if key is None:
                continue
            configs = [KernelConfig.from_key(key)]
        print(f"== {path} mask {att.mask}", flush=True)
        r = bench_mask(spec, att.mask, configs, with_flex=with_flex, flex_gather=flex_gather, paths=paths)
        r["file"] = str(path)
        results.append(r)
        if out_json:
            save_run(out_json, env, results)
    print_table(results)
    if paths:
        return results
    fitted = calibrate(results, env["gpu"])
    if out_json:  # the fit goes with the run, so the shipped simulator/gpu_costs.json can be updated from it
        save_run(out_json, env, results, cost_fit=fitted)
    return results


def profile_launches(spec, mask_name: str, config, launches: int = 3) -> None:
    """Launch one kernel a few times and nothing else, for a profiler (ncu --launch-skip 1 --launch-count 1)."""
    import torch

    from maskdsl.codegen.build import compile_attention
    from maskdsl.harness.measure import Problem, make_inputs

    fn = compile_attention(spec, mask_name, config)
    q, k, v = make_inputs(Problem.of(spec, mask_name), spec.mask(mask_name).layout.tokens, "cuda")
    for _ in range(launches):
        fn(q, k, v)
    torch.cuda.synchronize()


__all__ = ["bench_mask", "run_suite", "best_configs", "profile_launches"]
