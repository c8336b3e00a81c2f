"""The main job: compile a spec's mask, check it against the reference, and time it.

On a GPU it runs the spec's whole problem, checks a sample of rows against the float64
reference and times kernel and dense SDPA with do_bench medians. Without a GPU it runs a
slice of query tiles through Triton's interpreter and says so.
"""

from __future__ import annotations

import os
import time


def _pick_mask(spec, name):
    if name:
        return spec.mask(name)
    if spec.attentions:
        return spec.mask(spec.attentions[0].mask)
    return spec.masks[0]


def _problem(spec, mask):
    from maskdsl import ir

    att = spec.attention_for(mask.name)
    return att or ir.Attention("default", mask.name, heads=8, kv_heads=8, head_dim=64, dtype="bf16", batch=1)


def _check_rows(fn, spec, mask, q, k, v, out, tiles):
    """Compare the rows the given query tiles wrote against the reference for exactly those rows."""
    import torch

    from maskdsl.codegen.plan import tile_rows
    from maskdsl.reference import reference_attention_rows

    rows = sorted({r for t in tiles for r in tile_rows(fn.plan, t)})
    written = torch.nonzero(~torch.isnan(out[0, 0]).any(-1)).flatten().tolist()
    if written != rows:
        raise RuntimeError(f"the kernel wrote rows {written[:8]}... but tiles {tiles} hold rows {rows[:8]}...")
    idx = torch.tensor(rows)
    ref = reference_attention_rows(q, k, v, spec, mask.name, idx)
    got = out[:, :, idx.to(out.device)].to(torch.float64)
    err = ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    return len(rows), err


def run_main_job(path, mask_name=None, _config_factory=None, tiles=2, seed=0) -> int:
    import torch

    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported by the kernel module
    from maskdsl.api import compile as compile_attention
    from maskdsl.describe import density_line, describe
    from maskdsl.parser import load

    spec = load(path)
    mask = _pick_mask(spec, mask_name)
    prob = _problem(spec, mask)
    if mask.dynamic:
        print(f"mask {mask.name!r} has a top-k part; the dynamic kernel is not available yet")
        return 2
    start = time.perf_counter()
    config = _config_factory(mask, spec.attention_for(mask.name)) if _config_factory else None
    fn = compile_attention(spec, mask.name, config)
    compile_s = time.perf_counter() - start
    lay = mask.layout
    print(f"mask {mask.name} = {mask.expr.fmt()}")
    print(f"  on grid{lay.shape} ({lay.tokens:,} tokens): {describe(mask.expr, lay.rank)}; {density_line(mask)}")
    print(f"  kernel {fn.config.key()}, {fn.plan.q_tiles} query tiles per head, source {fn.source_path}"
          f" (rendered in {compile_s * 1000:.0f} ms)")
    gen = torch.Generator().manual_seed(seed)
    if not gpu:
        dim = prob.head_dim
        print(f"no GPU found: running the kernel through Triton's interpreter on a small problem: {tiles} of "
              f"{fn.plan.q_tiles} query tiles, batch 1, 1 head, head_dim {dim}, float32 (timings would mean nothing)")
        q, k, v = (torch.randn(1, 1, lay.tokens, dim, generator=gen) for _ in range(3))
        out = torch.full_like(q, float("nan"))
        lse = torch.empty(1, 1, lay.tokens)
        chosen = sorted({0, fn.plan.q_tiles // 2, fn.plan.q_tiles - 1})[:max(tiles, 1)]
        start = time.perf_counter()
        for t in chosen:
            fn.launch(q, k, v, dim ** -0.5, out, lse, tiles=range(t, t + 1))
        n_rows, err = _check_rows(fn, spec, mask, q, k, v, out, chosen)
        print(f"  interpreter ran query tiles {chosen} in {time.perf_counter() - start:.1f} s: {n_rows} rows, "
              f"relative error vs float64 reference {err:.2e}")
        ok = err < 2e-3
        print("ok" if ok else "FAILED: error above 2e-3")
        return 0 if ok else 1
    return _run_gpu(fn, spec, mask, prob, gen)


def _run_gpu(fn, spec, mask, prob, gen) -> int:
    import torch
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[prob.dtype]
    shape = (prob.batch, prob.heads, mask.layout.tokens, prob.head_dim)
    kv_shape = (prob.batch, prob.kv_heads, mask.layout.tokens, prob.head_dim)
    q = torch.randn(shape, generator=gen).to("cuda", dtype)
    k = torch.randn(kv_shape, generator=gen).to("cuda", dtype)
    v = torch.randn(kv_shape, generator=gen).to("cuda", dtype)
    out = torch.full_like(q, float("nan"))
    fn(q, k, v, out=out)
    torch.cuda.synchronize()
    if torch.isnan(out).any():
        print("FAILED: the kernel left unwritten (NaN) outputs")
        return 1
    sample = torch.randperm(mask.layout.tokens, generator=gen)[:256].sort().values
    from maskdsl.reference import reference_attention_rows

    ref = reference_attention_rows(q[:1, :2].float(), k[:1, :max(1, 2 * prob.kv_heads // prob.heads)].float(),
                                   v[:1, :max(1, 2 * prob.kv_heads // prob.heads)].float(), spec, mask.name, sample)
    got = out[:1, :2, sample.to("cuda")].double()
    err = ((got - ref).norm() / ref.norm()).item()
    ms = triton.testing.do_bench(lambda: fn(q, k, v), return_mode="median")
    kq = k.repeat_interleave(prob.heads // prob.kv_heads, 1) if prob.kv_heads != prob.heads else k
    vq = v.repeat_interleave(prob.heads // prob.kv_heads, 1) if prob.kv_heads != prob.heads else v
    dense = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, kq, vq),
                                    return_mode="median")
    print(f"  {torch.cuda.get_device_name()}: batch {prob.batch}, {prob.heads} heads, head_dim {prob.head_dim}, "
          f"{prob.dtype}; error on 256 sampled rows {err:.2e}")
    print(f"  maskdsl {ms:.3f} ms, dense SDPA {dense:.3f} ms: {dense / ms:.2f}x (do_bench medians)")
    return 0 if err < 2e-2 else 1
