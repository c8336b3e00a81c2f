"""The main job (`maskdsl run`): compile a spec's mask, check it against the reference, and time it.

On a GPU it runs the spec's whole problem, checks a sample of rows against the float64 reference
and times the kernel and the best dense SDPA backend with do_bench medians. Without a GPU it runs
a slice of query tiles through Triton's interpreter and says so. Inputs, checks and timings are
the shared harness's (`maskdsl.harness.measure`), so `maskdsl run`, `maskdsl tune` and `maskdsl bench`
measure the same problem the same way.
"""

from __future__ import annotations

import os
import time


def run_main_job(path, mask_name=None, config_factory=None, tiles=2, seed=0) -> int:
    import torch

    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported by the kernel module
    from maskdsl.api import compile as compile_attention, resolve
    from maskdsl.describe import density_line, describe
    from maskdsl.harness.measure import Problem

    spec, mask, attention = resolve(path, mask_name)
    problem = Problem.for_attention(attention)
    start = time.perf_counter()
    config = config_factory(mask, attention) if config_factory else None
    fn = compile_attention(spec, mask.name, config)
    compile_s = time.perf_counter() - start
    lay = mask.layout
    print(f"mask {mask.name} = {mask.expr.fmt()}")
    print(f"  on grid{lay.shape} ({lay.tokens:,} tokens): {describe(mask.expr, lay.rank)}; {density_line(mask)}")
    q_tiles = _query_tiles(fn)
    print(f"  kernel {fn.config.key()}, {q_tiles} query tiles per head, source {fn.source_path}"
          f" (rendered in {compile_s * 1000:.0f} ms)")
    if not gpu:
        return _run_interpreted(fn, spec, mask, problem, tiles, seed)
    return _run_gpu(fn, spec, mask, problem, seed)


def _query_tiles(fn) -> int:
    return getattr(fn, "q_tiles", None) or fn.plan.q_tiles


def _run_interpreted(fn, spec, mask, problem, tiles, seed) -> int:
    from maskdsl.autotune.measure import run_slice, slice_rows
    from maskdsl.harness.measure import make_inputs, reference_rows, tolerance

    q_tiles = _query_tiles(fn)
    small = problem.interpreter_slice()
    print(f"no GPU found: running the kernel through Triton's interpreter on a small problem: {tiles} of "
          f"{q_tiles} query tiles, batch 1, 1 head, head_dim {small.head_dim}, float32 (timings would mean nothing)")
    q, k, v = make_inputs(small, mask.layout.tokens, "cpu", seed)
    chosen = sorted({0, q_tiles // 2, q_tiles - 1})[:max(tiles, 1)]
    start = time.perf_counter()
    out = run_slice(fn, q, k, v, chosen)
    elapsed = time.perf_counter() - start
    check = reference_rows(q, k, v, spec, mask.name, slice_rows(fn, chosen)).check(out, slice_only=True)
    print(f"  interpreter ran query tiles {chosen} in {elapsed:.1f} s: {check.describe()}")
    tol = tolerance("cpu")
    ok = check.ok(tol)
    print("ok" if ok else f"FAILED: unwritten rows or error above {tol:.0e}")
    return 0 if ok else 1


def _run_gpu(fn, spec, mask, problem, seed) -> int:
    import torch

    from maskdsl.harness.measure import best_dense, check_rows, dense_times, make_inputs, sample_rows, time_ms, tolerance

    tokens = mask.layout.tokens
    q, k, v = make_inputs(problem, tokens, "cuda", seed)
    out = torch.full_like(q, float("nan"))
    fn(q, k, v, out=out)
    torch.cuda.synchronize()
    check = check_rows(out, q, k, v, spec, mask.name, sample_rows(tokens, 256, seed))
    ms = time_ms(lambda: fn(q, k, v))
    backend, dense = best_dense(dense_times(q, k, v)[0])
    print(f"  {torch.cuda.get_device_name()}: {problem.describe()}; sampled {check.describe()}")
    print(f"  maskdsl {ms:.3f} ms, dense SDPA ({backend}, the faster of cuDNN and Flash) {dense:.3f} ms: "
          f"{dense / ms:.2f}x (do_bench medians)")
    tol = tolerance("cuda")
    if not check.ok(tol):
        print(f"FAILED: unwritten rows or error above {tol:.0e}")
        return 1
    return 0
