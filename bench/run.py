"""`maskdsl bench`: correctness, then in one run dense SDPA, FlexAttention and our kernels (GPU only).

Every number is a `triton.testing.do_bench` median in milliseconds, all baselines measured in
the same process on the same inputs. Correctness is checked on a random sample of rows
against the float64 reference (rows only: the 115,200-token cases fit that way).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

SUITE = Path(__file__).parent / "suite"


def candidate_configs(mask, head_dim: int, limit: int = 6, attention=None):
    """The tuned config (tuning database) if any, the default, and the configs that measured best on an
    H200 for each rank (docs/BENCHMARKS.md), clipped to the grid."""
    from maskdsl.api import lookup_config
    from maskdsl.codegen.config import KernelConfig, default_config

    shape = mask.layout.shape
    out = [lookup_config(mask, attention)]
    if default_config(mask, head_dim) not in out:
        out.append(default_config(mask, head_dim))
    by_rank = {
        1: [((128,), (128,), 8, 3), ((128,), (64,), 8, 3), ((64,), (64,), 4, 3)],
        2: [((8, 8), (8, 8), 4, 3), ((8, 8), (4, 8), 4, 3), ((8, 16), (8, 8), 8, 3)],
        3: [((2, 8, 8), (1, 8, 8), 8, 3), ((1, 8, 8), (1, 8, 8), 4, 3), ((4, 4, 4), (4, 4, 4), 4, 3),
            ((2, 8, 8), (2, 4, 8), 8, 2)],
    }
    for q, k, warps, stages in by_rank.get(len(shape), []):
        if head_dim > 128 and math.prod(k) > 64:
            continue  # the K/V stages would not fit in shared memory
        try:
            cfg = KernelConfig(_clip(q, shape), _clip(k, shape), warps, stages)
            cfg.validate(len(shape))
        except ValueError:
            continue
        if cfg not in out:
            out.append(cfg)
    return out[:limit]


def _clip(tile, shape):
    """A tile no longer than the grid in any dimension (rounded up to a power of two)."""
    return tuple(min(t, 1 << max(0, (n - 1).bit_length())) for t, n in zip(tile, shape))


def _flex_tile(mask):
    shape = mask.layout.shape
    if len(shape) == 1:
        return (128,)
    if len(shape) == 2:
        return (8, 16)
    return (2, 8, 8)


def _err(got, ref) -> float:
    return ((got.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def bench_mask(spec, mask_name: str, configs=None, with_flex: bool = True, rows: int = 128, seed: int = 0) -> dict:
    import torch
    import triton

    from maskdsl.codegen.compiled import compile_attention
    from maskdsl.analysis import attended_pairs
    from maskdsl.reference import reference_attention_rows

    mask = spec.mask(mask_name)
    att = spec.attention_for(mask_name)
    heads, kv_heads, dim = (att.heads, att.kv_heads, att.head_dim) if att else (8, 8, 128)
    batch = att.batch if att else 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[att.dtype if att else "bf16"]
    tokens = mask.layout.tokens
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, heads, tokens, dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(batch, kv_heads, tokens, dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(batch, kv_heads, tokens, dim, device="cuda", dtype=dtype, generator=gen)
    sample = torch.randperm(tokens, device="cuda", generator=gen)[:rows].sort().values.cpu()
    kvh = max(1, kv_heads * 2 // heads) if heads >= 2 else 1
    ref = reference_attention_rows(q[:1, :2].float(), k[:1, :kvh].float(), v[:1, :kvh].float(), spec, mask_name, sample)
    if mask.dynamic:  # expected density: the picked fraction of key blocks (the static part counted exactly on top)
        from maskdsl.topk import normal_form

        topk = normal_form(mask.expr).topk
        nb = math.ceil(tokens / topk.block)
        density = min(topk.k, nb) / nb
    else:
        density = attended_pairs(mask.expr, mask.layout.shape) / tokens**2
    dense_flops = 4 * batch * heads * tokens * tokens * dim
    result = {"mask": mask_name, "expr": mask.expr.fmt(), "grid": list(mask.layout.shape), "tokens": tokens,
              "batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "dtype": str(dtype),
              "density": density, "flop_ideal": 1 / density}

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")

    # dense baselines: each SDPA backend alone, the best one is the baseline
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kq = k.repeat_interleave(heads // kv_heads, 1) if kv_heads != heads else k
    vq = v.repeat_interleave(heads // kv_heads, 1) if kv_heads != heads else v
    dense = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                dense[name] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, kq, vq))
        except RuntimeError as exc:
            dense[name] = None
            result[f"dense_{name}_error"] = str(exc)[:200]
    best_dense = min(t for t in dense.values() if t)
    result["dense_ms"] = dense
    result["dense_best_ms"] = best_dense

    ours = []
    if configs is None and mask.dynamic:
        from maskdsl.codegen.compiled import untuned_config
        from maskdsl.codegen.config import KernelConfig

        base = untuned_config(mask, dim)
        configs = [base] + [KernelConfig(base.q_tile, base.kv_tile, w, s) for w, s in ((4, 2), (8, 3)) if
                            (w, s) != (base.num_warps, base.num_stages)]
    configs = configs or candidate_configs(mask, dim, attention=att)
    for cfg in configs:
        entry = {"config": cfg.key()}
        try:
            start = time.perf_counter()
            fn = compile_attention(spec, mask_name, cfg)
            out = torch.full_like(q, float("nan"))
            fn(q, k, v, out=out)
            torch.cuda.synchronize()
            entry["compile_and_first_call_s"] = time.perf_counter() - start
            entry["unwritten"] = int(torch.isnan(out).any(-1).sum())
            entry["error"] = _err(out[:1, :2, sample.cuda()], ref)
            entry["ms"] = bench(lambda: fn(q, k, v))
            entry["speedup_vs_dense"] = best_dense / entry["ms"]
            entry["tflops_dense_equivalent"] = dense_flops / entry["ms"] / 1e9
            entry["tflops_actual"] = dense_flops * density / entry["ms"] / 1e9
        except Exception as exc:  # a config that fails must not hide the others
            entry["failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        ours.append(entry)
        print(f"    {mask_name} {entry}", flush=True)
    result["ours"] = ours
    good = [e for e in ours if "ms" in e and e["unwritten"] == 0 and e["error"] < 2e-2]
    if good:
        best = min(good, key=lambda e: e["ms"])
        result["ours_best"] = best
        result["speedup_vs_dense"] = best_dense / best["ms"]

    if with_flex and mask.dynamic:
        try:
            result.update(_flex_topk(spec, mask_name, q, k, v, sample, ref, best_dense, bench, result))
        except Exception as exc:
            result["flex_failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if with_flex and not mask.dynamic:
        try:
            from maskdsl.bench.flex import FlexRunner

            tile = _flex_tile(mask)
            start = time.perf_counter()
            runner = FlexRunner(mask, tile, "cuda")
            result["flex_blockmask_from_analysis_s"] = time.perf_counter() - start
            qp, kp, vp = runner.permute(q), runner.permute(k), runner.permute(v)
            start = time.perf_counter()
            out_p = runner.attend_permuted(qp, kp, vp)
            torch.cuda.synchronize()
            result["flex_compile_s"] = time.perf_counter() - start
            out = torch.empty_like(q)
            out[:, :, runner.perm[runner.valid]] = out_p[:, :, runner.valid]
            result["flex_error"] = _err(out[:1, :2, sample.cuda()], ref)
            result["flex_tile"] = list(tile)
            result["flex_ms"] = bench(lambda: runner.attend_permuted(qp, kp, vp))
            result["flex_speedup_vs_dense"] = best_dense / result["flex_ms"]
            if "ours_best" in result:
                result["speedup_vs_flex"] = result["flex_ms"] / result["ours_best"]["ms"]
        except Exception as exc:
            result["flex_failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        from maskdsl.simulator import simulate

        if "ours_best" in result:
            best_cfg = next(c for c in configs if c.key() == result["ours_best"]["config"])
            sim = simulate(spec, mask=mask_name, q_tile=best_cfg.q_tile, kv_tile=best_cfg.kv_tile)
            result["sim_upper_bound"] = sim.upper_bound_speedup
            result["sim_full_tiles"] = int(sim.full_tiles)
            result["sim_partial_tiles"] = int(sim.partial_tiles)
            result["sim_dense_tiles"] = int(sim.dense_tiles)
    except Exception as exc:
        result["sim_failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return result


def _flex_topk(spec, mask_name, q, k, v, sample, ref, best_dense, bench, result) -> dict:
    """FlexAttention with a BlockMask built from the same selection (pure top-k: picked blocks are full)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from maskdsl.codegen.compiled import compile_attention

    fn = compile_attention(spec, mask_name, None)
    if fn.form.static is not None or type(fn.form.restrict).__name__ != "Full":
        return {"flex_note": "flex comparison implemented for pure top-k only"}
    block = fn.form.topk.block

    def block_mask():
        picked, _, count = fn.select(q, k)
        # full-width index rows, picked blocks first (FlexAttention reads only the first `count`)
        order = torch.argsort((picked == 0).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return BlockMask.from_kv_blocks(torch.zeros_like(count), order, count, order, BLOCK_SIZE=block, mask_mod=None)

    flex = torch.compile(flex_attention, dynamic=False)
    bm = block_mask()
    gqa = q.shape[1] != k.shape[1]
    out = flex(q, k, v, block_mask=bm, enable_gqa=gqa)
    out_ours = fn(q, k, v)
    res = {"flex_error": _err(out[:1, :2, sample.cuda()], ref),
           "flex_vs_ours_max_diff": (out.float() - out_ours.float()).abs().max().item(),
           "flex_ms": bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=gqa)),
           "flex_with_selection_ms": bench(lambda: flex(q, k, v, block_mask=block_mask(), enable_gqa=gqa)),
           "selection_ms": bench(lambda: fn.select(q, k))}
    res["flex_speedup_vs_dense"] = best_dense / res["flex_with_selection_ms"]
    if "ours_best" in result:
        res["speedup_vs_flex"] = res["flex_with_selection_ms"] / result["ours_best"]["ms"]
    return res


def environment() -> dict:
    import torch
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_suite(paths, out_json: str | None, only: str | None = None) -> list[dict]:
    from maskdsl.parser import load

    env = environment()
    print(f"# {env}", flush=True)
    results = []
    for path in paths:
        spec = load(path)
        for att in spec.attentions:
            if only and only not in f"{Path(path).stem}:{att.mask}":
                continue
            print(f"== {path} mask {att.mask}", flush=True)
            r = bench_mask(spec, att.mask)
            r["file"] = str(path)
            results.append(r)
            if out_json:
                Path(out_json).write_text(json.dumps({"environment": env, "results": results}, indent=1))
    print_table(results)
    fitted = calibrate(results, env["gpu"])
    if out_json:  # the fit goes with the run, so the shipped simulator/gpu_costs.json can be updated from it
        Path(out_json).write_text(json.dumps({"environment": env, "results": results, "cost_fit": fitted}, indent=1))
    return results


def calibrate(results, gpu: str) -> dict | None:
    """Fit the simulator's cost constants to this run, store them, and report predicted vs measured."""
    from maskdsl.parser import load
    from maskdsl.codegen.config import KernelConfig
    from maskdsl.simulator.calibrate import Measurement, evaluate_fit, fit, store
    from maskdsl.simulator.cost import fitted_path

    meas = []
    for r in results:
        spec = load(r["file"])
        if spec.mask(r["mask"]).dynamic:
            continue
        for e in r["ours"]:
            if "ms" in e:
                cfg = KernelConfig.from_key(e["config"])
                meas.append(Measurement(spec, r["mask"], cfg.q_tile, cfg.kv_tile, r["batch"] * r["heads"], e["ms"]))
    if len(meas) < 3:
        return None
    entry = fit(meas, gpu, source=f"fitted by maskdsl bench --suite on {time.strftime('%Y-%m-%d')}, "
                                  f"{len(meas)} measurements")
    path = store(entry, gpu, fitted_path())
    print(f"\nfitted cost constants for {gpu} -> {path}: {entry}")
    for r in results:
        best = r.get("ours_best")
        if not best or spec_is_dynamic(r):
            continue
        cfg = KernelConfig.from_key(best["config"])
        ev = evaluate_fit([Measurement(load(r["file"]), r["mask"], cfg.q_tile, cfg.kv_tile, r["batch"] * r["heads"],
                                       best["ms"])],
                          entry, gpu)[0]
        r["predicted_ms"] = ev["predicted_ms"]
        r["measured_over_predicted"] = ev["ratio"]
        r["predicted_speedup_vs_dense"] = r["dense_best_ms"] / ev["predicted_ms"]
        print(f"  {Path(r['file']).stem}:{r['mask']}: measured {best['ms']:.3f} ms, predicted {ev['predicted_ms']:.3f} ms "
              f"(measured/predicted {ev['ratio']:.2f})")
    return entry


def spec_is_dynamic(result) -> bool:
    return "topk(" in result["expr"]


def print_table(results) -> None:
    print(f"\n{'case':34s} {'dense':>9s} {'flex':>9s} {'ours':>9s} {'x dense':>8s} {'x flex':>7s} {'ideal':>7s} "
          f"{'bound':>7s} {'err':>8s}  config")
    for r in results:
        best = r.get("ours_best", {})
        fmt = lambda x, p=3: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
        print(f"{Path(r['file']).stem + ':' + r['mask']:34s} {fmt(r.get('dense_best_ms')):>9s} "
              f"{fmt(r.get('flex_ms')):>9s} {fmt(best.get('ms')):>9s} {fmt(r.get('speedup_vs_dense'), 2):>8s} "
              f"{fmt(r.get('speedup_vs_flex'), 2):>7s} {fmt(r.get('flop_ideal'), 1):>7s} "
              f"{fmt(r.get('sim_upper_bound'), 2):>7s} {fmt(best.get('error'), 5) if best else '-':>8s}  "
              f"{best.get('config', '-')}")


def suite_files() -> list[Path]:
    return sorted(SUITE.glob("*.mask"))


__all__ = ["bench_mask", "run_suite", "suite_files", "candidate_configs"]
