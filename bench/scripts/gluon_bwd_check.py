"""The Gluon backward (codegen.gluon_bwd) against the Triton backward and cuDNN's dense backward (GPU).

For each case: the mask compiled with the Gluon forward's config (autotune.policy.gluon_pair, as the
bench), gradients of a slice of heads (batch 0; a whole GQA group) checked against the float64
reference with dO on sampled rows (bench.training.check_gradients: dQ on those rows, dK and dV on the
whole grid), once through the Triton backward (its atomic-dQ mode: maskdsl.compile's default) and
once through the Gluon backward of each variant (MASKDSL_GLUON_BWD=1 in this process). Then on the
whole problem: every backward once more into outputs poisoned with NaN, the Gluon variants' dQ, dK,
dV compared with the Triton atomic backward's, and `triton.testing.do_bench` medians of each
backward (with its delta pass and the dQ conversion; the Triton split, deterministic mode too), of
our forward and of cuDNN's dense backward (SDPA, SDPBackend.CUDNN_ATTENTION, on a retained graph, KV
heads repeated for GQA), all in one process per case (a hang is stopped after --case-timeout seconds,
a fault leaves the next case a clean context). A case or variant that fails is recorded and the run
goes on; a small smoke case runs first, and a hang or fault there skips the Gluon variants of the
rest. Writes $OUT/gluon_bwd.json (the working directory without OUT) and prints a table; exits 1
when a gradient check failed.

    python bench/scripts/gluon_bwd_check.py [--only dense_32k,blocked_3d | --only all] [--heads N]
    python bench/scripts/gluon_bwd_check.py --dry-run   # CPU: compile every variant for sm_90, ptxas' report
"""

import argparse
import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SUITE = ROOT / "bench" / "suite"

# name -> (suite file, Problem fields to override): the whole-tile suite cases, MHA and GQA, head_dim 128
# and 64, and the 1-D window (the "runs" mode: the Gluon backward refuses it; Triton and cuDNN timed)
CASES = {
    # a small case run first, alone: a kernel that hangs or faults shows here in seconds, and the Gluon
    # variants of the other cases are then skipped
    "smoke": ("layout seq = grid(2048)\nmask m = block(1024)\nattention main(mask=m, heads=4, kv_heads=2, "
              "head_dim=128, dtype=bf16)", {}),
    "dense_32k": ("dense_32k", {}),
    "dense_32k_gqa": ("dense_32k", {"kv_heads": 8}),
    "dense_32k_d64": ("dense_32k", {"head_dim": 64}),
    "blocked_3d": ("blocked_3d", {}),
    "hunyuan_gna_stride": ("hunyuan_gna_stride", {}),
    "flux_gna": ("flux_gna", {}),
    "cosmos_gna_ragged": ("cosmos_gna_ragged", {}),
    "block_2048_1head": ("block_2048_1head", {}),
    "window_1d_32k": ("window_1d_32k", {}),
}
# what a run without --only covers (a few minutes on an H100, compiles included); --only all: every case
DEFAULT = ("dense_32k", "dense_32k_gqa", "blocked_3d")
# name -> keyword arguments of gluon_bwd.gluon_backward
VARIANTS = {"gluon": {}, "gluon_pp": {"pingpong": True}, "gluon_pp_w2": {"pingpong": True, "writer_warps": 2}}
VARIANTS_D64 = {"gluon_pp_s3": {"pingpong": True, "stages": 3}}
TIMER = {"warmup": 25, "rep": 100}
# GLUON_BWD_DEVICE=cpu with TRITON_INTERPRET=1 runs the script's logic on the CPU (a check of the script:
# the Gluon kernel cannot run there, so its variants are recorded as failed)
DEVICE = os.environ.get("GLUON_BWD_DEVICE", "cuda")
ROWS = 64  # rows whose dO is nonzero in the gradient check
TOLERANCE = 3e-2  # relative error of dQ, dK, dV against the float64 reference (bench --train's)


def variants(head_dim: int) -> dict:
    if os.environ.get("GLUON_BWD_SKIP"):  # the smoke case failed: the Triton and cuDNN backwards only
        return {}
    return {**VARIANTS, **(VARIANTS_D64 if head_dim == 64 else {})}


def build(name: str, heads: int | None = None):
    """(spec, mask, problem, compiled attention) of a case, with the atomic-dQ backward (the one the Gluon
    backward stands in for: maskdsl.compile's default, deterministic=False)."""
    from maskdsl.api import resolve
    from maskdsl.autotune.policy import gluon_pair, ranked_backward_default
    from maskdsl.codegen.build import compile_attention
    from maskdsl.harness.measure import Problem
    from maskdsl.lang.parser import load, parse

    source, override = CASES[name]
    spec, mask, attention = resolve(parse(source) if source.startswith("layout") else load(SUITE / f"{source}.mask"))
    problem = replace(Problem.for_attention(attention), **override)
    if heads is not None:
        problem = replace(problem, heads=heads, kv_heads=max(1, heads * problem.kv_heads // problem.heads))
    pair = gluon_pair(mask, problem.head_dim, attention)
    backward = replace(ranked_backward_default(mask, problem.head_dim), atomic=True)
    return spec, mask, problem, compile_attention(spec, mask.name, pair and pair[0], backward)


def schedule_of(fn):
    """The Gluon backward's schedule, or why the mask has none."""
    ranges = fn.gluon_schedule.ranges
    if not ranges.ok or ranges.mode != "whole":
        return None, ranges.reason or f"the forward's {ranges.mode!r} mode (the Gluon backward runs whole tiles)"
    return fn.gluon_backward_schedule, None


# ---- the dry run: compile for sm_90 on the CPU -------------------------------------------------------

def dry_run(names, heads) -> list[dict]:
    import torch
    from triton.runtime import driver

    sys.path.insert(0, str(ROOT / "tests"))
    from gluon_compile import Sm90Driver, ptxas

    from maskdsl.codegen import gluon_bwd

    entries = []
    for name in names:
        entry = {"case": name}
        try:
            spec, mask, problem, fn = build(name, heads)
            sched, why = schedule_of(fn)
            entry.update(mode=fn.gluon_schedule.ranges.mode, config=fn.config.key(), problem=problem.label())
            if sched is None:
                entry["refused"] = why
                entries.append(entry)
                print_dry(entry)
                continue
            entry.update(key_tiles=len(sched.keys), pairs=sched.pairs)
            r = sched.ranges
            dtype = torch.float16 if problem.dtype == "fp16" else torch.bfloat16
            group = problem.heads // problem.kv_heads
            tokens = mask.layout.tokens
            q = torch.zeros(1, group, tokens, problem.head_dim, dtype=dtype)
            kv = torch.zeros(1, 1, tokens, problem.head_dim, dtype=dtype)
            f32 = torch.zeros(1, group, tokens, problem.head_dim)
            lse = torch.zeros(1, group, tokens)
            keys, visits, _ = sched.on("cpu")
            driver.set_active(Sm90Driver())
            for variant, kwargs in variants(problem.head_dim).items():
                try:
                    grid, args, kw = gluon_bwd.kernel_args(q, kv, kv, q, lse, lse, f32, q if group > 1 else kv,
                                                           q if group > 1 else kv, 0.1, keys, visits, r.shape,
                                                           r.q_tile, r.kv_tile, **kwargs)
                    kernel = gluon_bwd.attention_bwd.warmup(*args, grid=grid, **kw)
                    report, _ = ptxas(kernel.asm["ptx"])
                    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
                    entry[variant] = {"spill_stores": int(spills[1]), "spill_loads": int(spills[2]),
                                      "shared": kernel.metadata.shared}
                except Exception as exc:  # noqa: BLE001 - a variant that fails must not hide the others
                    entry[variant] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
        except Exception as exc:  # noqa: BLE001
            entry["failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        entries.append(entry)
        print_dry(entry)
    return entries


def print_dry(e: dict) -> None:
    if "failed" in e:
        print(f"{e['case']:20} FAILED {e['failed']}", flush=True)
    elif "refused" in e:
        print(f"{e['case']:20} {e['mode']!s:6} refused: {e['refused']}", flush=True)
    else:
        parts = []
        for name, v in e.items():
            if isinstance(v, dict):
                parts.append(f"{name}: " + (f"FAILED {v['failed']}" if "failed" in v else
                                            f"spills {v['spill_stores']}/{v['spill_loads']} smem {v['shared']}"))
        print(f"{e['case']:20} {e['problem']:18} {e['config']:24} pairs {e['pairs']:7}  " + "; ".join(parts),
              flush=True)


# ---- the GPU run ----------------------------------------------------------------------------------

def set_gluon_backward(on: bool) -> None:
    os.environ["MASKDSL_GLUON_BWD"] = "1" if on else "0"


def check(fn, spec, mask, problem, q, k, v, sample, backward: str, kwargs=None) -> dict:
    """Gradients of a head slice through one backward ("triton" or a Gluon variant) against the reference."""
    from maskdsl.bench.training import check_gradients
    from maskdsl.codegen import dispatch, gluon_bwd

    group = problem.heads // problem.kv_heads
    hq = group if group > 1 else min(2, problem.heads)  # a whole GQA group: its dK, dV sum runs
    hk = 1 if group > 1 else hq
    small = [t[:1, :h].contiguous() for t, h in ((q, hq), (k, hk), (v, hk))]
    set_gluon_backward(backward != "triton")
    original = gluon_bwd.gluon_backward
    if kwargs:
        gluon_bwd.gluon_backward = lambda *a, **kw: original(*a, **kw, **kwargs)
    try:
        chosen = dispatch.choose_backward(fn, *small[:3], small[0], small[0])
        result = check_gradients(fn, spec, mask.name, *small, sample)
    finally:
        gluon_bwd.gluon_backward = original
        set_gluon_backward(False)
    worst = max(result["dq_error"], result["dk_error"], result["dv_error"])
    return {**result, "chosen": chosen, "ok": (not result["grad_nan"]) and worst < TOLERANCE
            and chosen == ("triton" if backward == "triton" else "gluon")}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def run_case(name: str, heads: int | None) -> dict:
    import torch
    import triton

    from maskdsl.analysis.counts import attended_pairs
    from maskdsl.codegen import gluon_bwd
    from maskdsl.harness.measure import make_inputs

    spec, mask, problem, fn = build(name, heads)
    sched, why = schedule_of(fn)
    tokens = mask.layout.tokens
    entry = {"case": name, "problem": problem.label(), "grid": list(mask.layout.shape), "config": fn.config.key(),
             "mode": fn.gluon_schedule.ranges.mode}
    q, k, v = make_inputs(problem, tokens, DEVICE, 0)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    dout = torch.randn(q.shape, device=DEVICE, dtype=q.dtype, generator=gen)
    sample = torch.randperm(tokens, device=DEVICE, generator=gen)[:ROWS].sort().values.cpu()
    scale = 1.0 / problem.head_dim ** 0.5
    pairs = attended_pairs(mask.expr, mask.layout.shape)
    fwd_flop = 4.0 * problem.batch * problem.heads * pairs * problem.head_dim
    entry["bwd_flop"] = 2.5 * fwd_flop
    if sched is not None:
        entry.update(key_tiles=len(sched.keys), tile_pairs=sched.pairs)
    else:
        entry["gluon_refused"] = why

    entry["checks"] = {}
    for backward, kwargs in (("triton", None), *((variant, kw) for variant, kw in variants(problem.head_dim).items()
                                                  if sched is not None)):
        try:
            entry["checks"][backward] = check(fn, spec, mask, problem, q, k, v, sample, backward, kwargs)
        except Exception as exc:  # noqa: BLE001 - a backward that fails must not hide the others
            entry["checks"][backward] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}", "ok": False}

    def bench(call):
        if DEVICE != "cuda":  # the script's check on the CPU: one call's wall time
            start = time.perf_counter()
            call()
            return (time.perf_counter() - start) * 1e3
        return triton.testing.do_bench(call, return_mode="median", **TIMER)

    with torch.no_grad():
        out, lse = fn(q, k, v, scale=scale, return_lse=True)
        entry["fwd_ms"] = bench(lambda: fn(q, k, v, scale=scale))
    times, grads = {}, {}
    from maskdsl.codegen.backward import BackwardKernels

    atomic = fn.backward_kernels(problem.head_dim)
    split = BackwardKernels(mask, replace(fn.backward_config, atomic=False))
    runs = {"triton": lambda dq, dk, dv: atomic.launch(q, k, v, out, lse, dout, scale, dq, dk, dv),
            "triton_split": lambda dq, dk, dv: split.launch(q, k, v, out, lse, dout, scale, dq, dk, dv)}
    if sched is not None:
        for variant, kwargs in variants(problem.head_dim).items():
            runs[variant] = (lambda kw: lambda dq, dk, dv: gluon_bwd.gluon_backward(
                q, k, v, out, lse, dout, scale, dq, dk, dv, sched, **kw))(kwargs)
    for backward, call in runs.items():
        try:
            dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
            start = time.perf_counter()
            call(dq, dk, dv)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - start
            nan = any(bool(t.isnan().any()) for t in (dq, dk, dv))
            times[backward] = {"ms": bench(lambda: call(dq, dk, dv)), "first_call_s": first, "nan": nan}
            grads[backward] = (dq, dk, dv)
        except Exception as exc:  # noqa: BLE001
            times[backward] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if "triton" in grads:
        for backward, (dq, dk, dv) in grads.items():
            if backward not in ("triton", "triton_split"):
                t = grads["triton"]
                times[backward]["vs_triton"] = {"dq": rel(dq, t[0]), "dk": rel(dk, t[1]), "dv": rel(dv, t[2])}
    for t in times.values():
        if "ms" in t:
            t["tflops"] = entry["bwd_flop"] / t["ms"] / 1e9
    entry["backward"] = times
    del grads
    entry["cudnn"] = cudnn_backward(q, k, v, dout, scale, bench, problem)
    if "ms" in entry["cudnn"]:
        dense_flop = 2.5 * 4.0 * problem.batch * problem.heads * tokens * tokens * problem.head_dim
        entry["cudnn"]["tflops_dense"] = dense_flop / entry["cudnn"]["ms"] / 1e9
        for t in times.values():
            if "ms" in t:
                t["over_cudnn"] = entry["cudnn"]["ms"] / t["ms"]  # > 1: faster than cuDNN's dense backward
    entry["ok"] = all(c.get("ok") for c in entry["checks"].values()) and not any(
        t.get("nan") for t in times.values())
    return entry


def cudnn_backward(q, k, v, dout, scale, bench, problem) -> dict:
    """cuDNN's dense backward on a retained graph (KV heads repeated for GQA), or why it did not run."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = problem.heads // problem.kv_heads
    leaves = [q.detach().requires_grad_(), *(t.detach().repeat_interleave(group, 1).requires_grad_() for t in (k, v))]
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(*leaves, scale=scale)
            ms = bench(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True))
        return {"ms": ms}
    except Exception as exc:  # noqa: BLE001
        return {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}


MARK = "@@gluon_bwd_check "


def run_child(name: str, heads, env: dict, timeout: float) -> dict:
    """One case in a process of its own: a kernel that hangs is stopped after `timeout` seconds, and one
    that faults leaves the next case a clean CUDA context."""
    import subprocess

    cmd = [sys.executable, __file__, "--child", name] + ([f"--heads={heads}"] if heads else [])
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-1500:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-1500:]
        return {"case": name, "failed": f"timed out after {timeout:.0f} s (a hang?)", "output": str(tail), "ok": False}
    for line in reversed(run.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"case": name, "failed": f"exit {run.returncode} without a result", "stderr": run.stderr[-3000:],
            "ok": False}


def print_row(e: dict) -> None:
    if "failed" in e:
        print(f"{e['case']:20} FAILED {e['failed']}", flush=True)
        return
    cudnn = e.get("cudnn", {}).get("ms", float("nan"))
    line = f"{e['case']:20} {e['problem']:16} fwd {e['fwd_ms']:8.3f}  cudnn bwd {cudnn:8.3f}"
    for name, t in e["backward"].items():
        c = e["checks"].get(name)
        if "ms" in t:
            line += f" | {name} {t['ms']:8.3f} ms {t['tflops']:5.0f} TF/s x{t.get('over_cudnn', float('nan')):.2f}"
            if c is not None and "failed" not in c:
                err = max(c["dq_error"], c["dk_error"], c["dv_error"])
                line += f" err {err:.1e}{' OK' if c['ok'] else ' BAD'}"
            elif c is not None:
                line += " check FAILED"
        else:
            line += f" | {name} FAILED"
    if "gluon_refused" in e:
        line += f" | gluon refused: {e['gluon_refused'][:60]}"
    print(line, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated case names, or all (default: {','.join(DEFAULT)})")
    parser.add_argument("--heads", type=int, help="run every case with this many query heads (a quicker check)")
    parser.add_argument("--dry-run", action="store_true", help="compile every variant for sm_90 on the CPU only")
    parser.add_argument("--case-timeout", type=float, default=240, help="seconds a case may take (default 240)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one case, in a process of its own
    args = parser.parse_args(argv)
    names = list(CASES) if args.only == "all" else [n for n in args.only.split(",") if n] or list(DEFAULT)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") == "1":
            parser.error("the dry run compiles for sm_90: unset TRITON_INTERPRET")
        result = {"device": "dry run (sm_90 compile on the CPU)", "cases": dry_run(names, args.heads)}
        ok = all("failed" not in e and all("failed" not in v for v in e.values() if isinstance(v, dict))
                 for e in result["cases"])
    elif args.child:
        try:
            entry = run_case(args.child, args.heads)
        except Exception as exc:  # noqa: BLE001 - reported to the parent as the case's failure
            entry = {"case": args.child, "failed": f"{type(exc).__name__}: {str(exc)[:300]}", "ok": False}
        print(MARK + json.dumps(entry), flush=True)
        return 0
    else:
        import torch

        device = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
        result = {"device": device, "torch": torch.__version__, "cases": []}
        print(f"# {result['device']}", flush=True)
        env = dict(os.environ)
        for name in (["smoke"] if "smoke" not in names else []) + names:
            entry = run_child(name, args.heads, env, args.case_timeout)
            # a smoke case that hung or faulted skips the Gluon variants after it (wrong numbers do not:
            # their timings still say something, and every check is in the table)
            if name == "smoke" and ("failed" in entry or any("failed" in t for t in entry["backward"].values())):
                env["GLUON_BWD_SKIP"] = "1"
                print("# the smoke case failed: the other cases time the Triton and cuDNN backwards only", flush=True)
            result["cases"].append(entry)
            print_row(entry)
        ok = all(e.get("ok") for e in result["cases"])
    path = Path(os.environ.get("OUT", ".")) / "gluon_bwd.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
