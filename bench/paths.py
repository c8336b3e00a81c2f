"""Copy-engine (TMA) against pointer loads, per suite case and config, in one process (GPU only).

    python3 -m maskdsl.bench.paths [CASE ...]      # writes $OUT/paths.json (or /tmp/paths.json)
    ncu --clock-control none --kernel-name regex:attention_fwd --launch-skip 1 --launch-count 1 \
        python3 -m maskdsl.bench.paths --once CASE CONFIG   # three launches of one kernel, for a profiler

Each config runs with MASKDSL_TMA=1 and =0 on the same inputs: unwritten rows and the error against the
float64 reference rows are checked, then do_bench medians, with cuDNN's dense time from the same run.
The numbers behind the TMA table in docs/BENCHMARKS.md.
"""
import json
import os
import sys
import time

import torch
import triton

import maskdsl
from maskdsl.bench.run import _err
from maskdsl.codegen.compiled import compile_attention
from maskdsl.codegen.config import KernelConfig
from maskdsl.reference import reference_attention_rows

OUT = os.environ.get("OUT", "/tmp")


CASES = {  # the configs of the comparison in docs/BENCHMARKS.md
 "dense_32k": ("dense", ["q128_k128_w8_s2", "q128_k64_w8_s3", "q128_k64_w8_s4", "q64_k64_w4_s3", "q64_k64_w4_s4",
                         "q64_k128_w4_s2", "q256_k64_w16_s2", "q128_k128_w8_s3"]),
 "window_1d_32k": ("window", ["q128_k128_w8_s2", "q128_k64_w8_s3", "q64_k64_w4_s3", "q128_k128_w8_s3", "q64_k128_w4_s2"]),
 "blocked_3d": ("blocks", ["q2x8x8_k2x8x8_w8_s2", "q2x8x8_k1x8x8_w8_s3", "q1x8x8_k1x8x8_w4_s3", "q1x8x8_k2x8x8_w4_s2",
                           "q2x8x8_k2x8x8_w8_s3", "q2x8x16_k2x8x8_w16_s2", "q1x8x8_k1x8x8_w4_s4"]),
 "gna_3d": ("gna", ["q2x8x8_k1x8x8_w8_s3", "q2x8x8_k1x8x8_w4_s3", "q1x8x8_k1x8x8_w4_s3", "q2x8x8_k1x8x8_w8_s4",
                    "q2x8x8_k2x8x8_w8_s2"]),
 "neighborhood_3d": ("local", ["q4x4x4_k4x4x4_w4_s3", "q4x4x8_k4x4x4_w8_s3", "q2x8x8_k2x4x8_w8_s2", "q2x8x8_k2x8x8_w8_s2"]),
 "neighborhood_2d": ("local", ["q8x8_k4x8_w4_s3", "q8x16_k8x8_w8_s2", "q8x8_k8x8_w4_s3", "q8x16_k8x8_w8_s3"]),
}

def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def main(only):
    results = []
    for case in only:
        name, cfgs = CASES[case]
        spec = maskdsl.load(os.path.join(os.path.dirname(__file__), "suite", f"{case}.mask"))
        att = spec.attention_for(name)
        heads, dim, tokens = att.heads, att.head_dim, spec.mask(name).layout.tokens
        gen = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        sample = torch.randperm(tokens, device="cuda", generator=gen)[:96].sort().values.cpu()
        ref = reference_attention_rows(q[:1, :2].float(), k[:1, :2].float(), v[:1, :2].float(), spec, name, sample)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        print(f"{case}: cudnn {dense:.3f} ms", flush=True)
        for c in cfgs:
            for tma in ("1", "0"):
                os.environ["MASKDSL_TMA"] = tma
                e = {"case": case, "config": c, "tma": tma == "1", "dense_ms": dense}
                try:
                    fn = compile_attention(spec, name, KernelConfig.from_key(c))
                    out = torch.full_like(q, float("nan"))
                    t0 = time.perf_counter(); fn(q, k, v, out=out); torch.cuda.synchronize(); e["first_s"] = time.perf_counter() - t0
                    e["unwritten"] = int(torch.isnan(out).any(-1).sum())
                    e["err"] = _err(out[:1, :2, sample.cuda()], ref)
                    e["ms"] = bench(lambda: fn(q, k, v))
                    e["x_dense"] = dense / e["ms"]
                    e["shell_free"] = getattr(getattr(fn, "plan", None), "shell_free", None)
                    e["regs"] = getattr(fn.module.attention_fwd, "n_regs", None)
                except Exception as exc:
                    e["failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                results.append(e)
                print(f"  {c:24s} tma={tma} " + (f"{e['ms']:.3f} ms x{e['x_dense']:.2f} err {e['err']:.1e} unwritten {e['unwritten']}" if "ms" in e else e.get("failed")), flush=True)
        json.dump(results, open(f"{OUT}/paths.json", "w"), indent=1)
    os.environ.pop("MASKDSL_TMA", None)
    return results


def once(case: str, config: str) -> None:
    name = CASES[case][0]
    spec = maskdsl.load(os.path.join(os.path.dirname(__file__), "suite", f"{case}.mask"))
    att = spec.attention_for(name)
    tokens = spec.mask(name).layout.tokens
    q, k, v = (torch.randn(1, att.heads, tokens, att.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fn = compile_attention(spec, name, KernelConfig.from_key(config))
    for _ in range(3):
        fn(q, k, v)
    torch.cuda.synchronize()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--once"]:
        once(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1:] or list(CASES))
