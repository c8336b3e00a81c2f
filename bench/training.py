"""Training benchmark: forward, backward and forward+backward of maskdsl against dense cuDNN SDPA and
FlexAttention with the same mask, all measured in one process on the same inputs (GPU).

Gradients are checked before timing, without ever building an [L, L] mask: dQ rows are local to
their query row, so the float64 reference of a sample of rows (`reference_attention_rows`) gives
them exactly; and with dO zero outside those rows, dK and dV of the whole grid are exactly the
sample's contributions, which the same reference gives by autograd. On the CPU (Triton's
interpreter) only the check runs, which is what the tests exercise.
"""

from __future__ import annotations

import math
import time
from pathlib import Path


# (dK/dV kernel, dQ kernel) as (query tile, key tile, warps, stages) in tokens: the split backward's
# neighbours of the default worth timing, then the atomic-dQ backward's dK/dV kernels (its dQ kernel does not run)
SPLIT_OPTIONS = ()
ATOMIC_OPTIONS = ((64, 128, 8, 2),)


def backward_candidates(mask, head_dim: int, modes=("split", "atomic")):
    """The default backward config of each dQ mode and a few neighbours worth timing (tuning replaces this
    list); every kernel's tiles are the simulator's best at its block sizes (near-cubes only where it cannot rank)."""
    from dataclasses import replace

    from maskdsl.autotune.policy import ranked_backward_default, ranked_tiles
    from maskdsl.codegen.config import BackwardConfig, KernelConfig
    from maskdsl.analysis.tiles import split

    def kernel(block_m, block_n, warps, stages):
        tiles = ranked_tiles(mask, block_m, block_n) or (split(block_m, mask.layout.shape),
                                                        split(block_n, mask.layout.shape))
        return KernelConfig(*tiles, warps, stages)

    default = ranked_backward_default(mask, head_dim)
    out = []
    if "split" in modes:
        out.append(default)
        out += [BackwardConfig(kernel(*dkdv), kernel(*dq)) for dkdv, dq in SPLIT_OPTIONS]
    if "atomic" in modes:
        out.append(replace(default, atomic=True))
        out += [BackwardConfig(kernel(*dkdv), default.dq, True) for dkdv in ATOMIC_OPTIONS]
    return list(dict.fromkeys(out))


def _err(got, ref) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def check_gradients(fn, spec, mask_name, q, k, v, rows, scale=None) -> dict:
    """Relative errors of dQ (sampled rows), dK and dV (whole grid) against the float64 reference."""
    import torch

    from maskdsl.harness.reference import reference_attention_rows

    idx = rows.to(torch.int64).cpu()
    gen = torch.Generator().manual_seed(1)
    dout = torch.zeros(q.shape, dtype=q.dtype)
    dout[:, :, idx] = torch.randn(q.shape[0], q.shape[1], len(idx), q.shape[3], generator=gen).to(q.dtype)
    dout = dout.to(q.device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, scale=scale)
    got = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    ref = reference_attention_rows(*ref_leaves, spec, mask_name, idx, scale=scale)
    want = torch.autograd.grad(ref, ref_leaves, dout[:, :, idx.to(q.device)].to(torch.float64))
    nan = any(bool(torch.isnan(g).any()) for g in got)
    return {"dq_error": _err(got[0][:, :, idx.to(q.device)], want[0][:, :, idx.to(q.device)]),
            "dk_error": _err(got[1], want[1]), "dv_error": _err(got[2], want[2]), "grad_nan": nan}


def _timings(bench, forward, inputs, dout) -> dict:
    """fwd, bwd (on a retained graph) and fwd+bwd medians (ms) of `forward()` -> output."""
    import torch

    with torch.no_grad():
        fwd = bench(forward)
    out = forward()
    bwd = bench(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))

    def step():
        torch.autograd.grad(forward(), inputs, dout)
    return {"fwd_ms": fwd, "bwd_ms": bwd, "fwd_bwd_ms": bench(step)}


def bench_training(spec, mask_name: str, configs=None, with_flex: bool = True, rows: int = 64, seed: int = 0,
                   device: str = "cuda", modes=("split", "atomic")) -> dict:
    """Time maskdsl, dense SDPA and FlexAttention training steps of one mask; `configs` lists
    KernelConfigs or (KernelConfig, BackwardConfig) pairs (default: tuned/default forward x
    backward_candidates of the dQ `modes`). `ours_best` is the fastest checked config of any mode,
    `ours_best_split` (deterministic) and `ours_best_atomic` each mode's.
    """
    import torch

    from maskdsl.bench.run import density as bench_density
    from maskdsl.api import lookup_config
    from maskdsl.codegen.build import compile_attention
    from maskdsl.harness.measure import torch_dtype

    mask = spec.mask(mask_name)
    att = spec.attention_for(mask_name)
    heads, kv_heads, dim = (att.heads, att.kv_heads, att.head_dim) if att else (8, 8, 128)
    batch = att.batch if att else 1
    dtype = torch_dtype(att.dtype if att else "bf16")
    gpu = device != "cpu"
    if not gpu:  # the interpreter: a small slice of heads, check only
        batch, heads, kv_heads, dtype = 1, min(heads, 2), 1, torch.float32
    tokens = mask.layout.tokens
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, dout = (torch.randn(batch, h, tokens, dim, device=device, dtype=dtype, generator=gen)
                     for h in (heads, kv_heads, kv_heads, heads))
    sample = torch.randperm(tokens, device=device, generator=gen)[:rows].sort().values.cpu()
    density = bench_density(mask)  # top-k: the picked fraction of key blocks
    result = {"mask": mask_name, "expr": mask.expr.fmt(), "grid": list(mask.layout.shape), "tokens": tokens,
              "batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "dtype": str(dtype),
              "density": density, "flop_ideal": 1 / density}
    if configs is None:
        fwd_cfg = lookup_config(mask, att)
        # a top-k mask's backward takes its forward's tiles (codegen.topk.backward): one config to time
        configs = [fwd_cfg] if mask.dynamic else [(fwd_cfg, b) for b in backward_candidates(mask, dim, modes)]
    kvh = 1 if kv_heads == 1 or heads < 2 else max(1, kv_heads * 2 // heads)
    small = [t[:1, :h].contiguous() for t, h in ((q, 2), (k, kvh), (v, kvh))]

    def bench(fn):
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ours = []
    for item in configs:
        fwd_cfg, bwd_cfg = item if isinstance(item, tuple) else (item, None)
        entry = {"config": fwd_cfg.key(),
                 "backward_config": bwd_cfg.key() if bwd_cfg else ("topk" if mask.dynamic else "default")}
        try:
            start = time.perf_counter()
            fn = compile_attention(spec, mask_name, fwd_cfg, bwd_cfg)
            entry.update(check_gradients(fn, spec, mask_name, *small, sample))
            entry["compile_and_check_s"] = time.perf_counter() - start
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                torch.autograd.grad(fn(*leaves), leaves, dout)
                torch.cuda.synchronize()
                grads = sum(t.numel() * t.element_size() for t in leaves)
                # beyond the gradients themselves: O, LSE, delta and allocator slack
                entry["extra_bytes_per_head_token"] = (torch.cuda.max_memory_allocated() - base - grads) / (
                    batch * heads * tokens)
                entry.update(_timings(bench, lambda: fn(*leaves), leaves, dout))
        except Exception as exc:  # a config that fails must not hide the others
            entry["failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        ours.append(entry)
        print(f"    {mask_name} {entry}", flush=True)
    result["ours"] = ours
    good = [e for e in ours if "fwd_bwd_ms" in e and not e["grad_nan"]
            and max(e["dq_error"], e["dk_error"], e["dv_error"]) < 3e-2]
    if good:
        result["ours_best"] = min(good, key=lambda e: e["fwd_bwd_ms"])
    for mode in ("split", "atomic"):
        picked = [e for e in good if e["backward_config"].endswith("-atomic") == (mode == "atomic")]
        if picked:
            result[f"ours_best_{mode}"] = min(picked, key=lambda e: e["fwd_bwd_ms"])
    if not gpu:
        return result

    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = heads // kv_heads
    dense_leaves = [leaves[0], *(t.detach().repeat_interleave(group, 1).requires_grad_() for t in leaves[1:])]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dense = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                dense[name] = _timings(bench, lambda: sdpa(*dense_leaves), dense_leaves, dout)
        except RuntimeError as exc:
            result[f"dense_{name}_error"] = str(exc)[:200]
    result["dense"] = dense
    if dense:
        best = min(dense, key=lambda n: dense[n]["fwd_bwd_ms"])
        result["dense_best"] = {"backend": best, **dense[best]}
        if "ours_best" in result:
            result["speedup_vs_dense_fwd_bwd"] = dense[best]["fwd_bwd_ms"] / result["ours_best"]["fwd_bwd_ms"]
            result["speedup_vs_dense_bwd"] = dense[best]["bwd_ms"] / result["ours_best"]["bwd_ms"]
    if with_flex and mask.dynamic:
        result["flex_skipped"] = ("a top-k selection is made per call from q and k; a BlockMask built from it "
                                  "per step is not FlexAttention as an expert writes it for a static mask")
    elif with_flex:
        try:
            result.update(_flex(mask, leaves, dout, bench, result))
        except Exception as exc:
            result["flex_failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return result


def _flex(mask, leaves, dout, bench, result) -> dict:
    """FlexAttention on tile-major tokens with the BlockMask from the same closed-form analysis
    (bench.flex); the permutation is done once, outside the timed region, like the forward bench."""
    import torch

    from maskdsl.bench.flex import FlexRunner
    from maskdsl.bench.run import _flex_tile

    # the backward is timed on a retained graph (bench `bwd_ms`), which compiled FlexAttention refuses while
    # it donates its saved buffers; donation only saves memory, so turn it off for the measurement
    torch._functorch.config.donated_buffer = False
    tile = _flex_tile(mask)
    start = time.perf_counter()
    runner = FlexRunner(mask, tile, leaves[0].device)
    out = {"flex_tile": list(tile), "flex_blockmask_s": time.perf_counter() - start}
    perm = [runner.permute(t.detach()).requires_grad_() for t in leaves]
    dout_p = runner.permute(dout)
    start = time.perf_counter()
    torch.autograd.grad(runner.attend_permuted(*perm), perm, dout_p)
    torch.cuda.synchronize()
    out["flex_compile_s"] = time.perf_counter() - start
    out["flex"] = _timings(bench, lambda: runner.attend_permuted(*perm), perm, dout_p)
    if "ours_best" in result:
        out["speedup_vs_flex_fwd_bwd"] = out["flex"]["fwd_bwd_ms"] / result["ours_best"]["fwd_bwd_ms"]
    if "dense_best" in result:
        out["flex_speedup_vs_dense_fwd_bwd"] = result["dense_best"]["fwd_bwd_ms"] / out["flex"]["fwd_bwd_ms"]
    return out


def format_row(result) -> str:
    """One line per mask: fwd+bwd ms of each contender and the speedups."""
    best = result.get("ours_best", {})
    dense = result.get("dense_best", {})
    flex = result.get("flex", {})
    return (f"{result['mask']:>14s} ours {best.get('fwd_bwd_ms', math.nan):8.3f} ms  "
            f"dense {dense.get('fwd_bwd_ms', math.nan):8.3f} ms  flex {flex.get('fwd_bwd_ms', math.nan):8.3f} ms  "
            f"x{result.get('speedup_vs_dense_fwd_bwd', math.nan):.2f} vs dense  "
            f"x{result.get('speedup_vs_flex_fwd_bwd', math.nan):.2f} vs flex  "
            f"(split {result.get('ours_best_split', {}).get('fwd_bwd_ms', math.nan):.3f} / atomic "
            f"{result.get('ours_best_atomic', {}).get('fwd_bwd_ms', math.nan):.3f} ms)")


def best_training_configs(runs: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """{'file stem:mask': [(forward key, backward key) of each dQ mode's best]} of saved `--train` runs (a case
    in several: the last run's), so a later call re-times exactly those pairs (`--configs-from`)."""
    from pathlib import Path

    best = {}
    for run in runs:
        for r in run["results"]:
            pairs = [(r[k]["config"], r[k]["backward_config"]) for k in ("ours_best_split", "ours_best_atomic")
                     if r.get(k)]
            if pairs:
                best[f"{Path(r['file']).stem}:{r['mask']}"] = pairs
    return best


def _configs(pairs):
    from maskdsl.codegen.config import BackwardConfig, KernelConfig

    return [KernelConfig.from_key(f) if b in ("topk", "default") else (KernelConfig.from_key(f), BackwardConfig.from_key(b))
            for f, b in pairs]


def run_training(files, out_json: str | None = None, only: str | None = None, with_flex: bool = True,
                 configs_from: dict | None = None) -> list[dict]:
    """`maskdsl bench --train`: every attention statement of the files (matching `only`; top-k ones too, whose
    backward takes the forward's tiles), one process."""
    from maskdsl.bench.cases import suite_cases
    from maskdsl.bench.run import environment, save_run

    env = environment()
    print(f"# {env}", flush=True)
    results = []
    for path, spec, att in suite_cases(files, only):
        configs = None
        if configs_from is not None:  # a re-measurement: each mode's saved best pair, cases it names only
            pairs = configs_from.get(f"{Path(path).stem}:{att.mask}")
            if not pairs:
                continue
            configs = _configs(pairs)
        print(f"== {path} mask {att.mask} (training)", flush=True)
        r = bench_training(spec, att.mask, configs=configs, with_flex=with_flex)
        r["file"] = str(path)
        results.append(r)
        print(format_row(r), flush=True)
        if out_json:
            save_run(out_json, env, results)
    print("\nforward+backward, do_bench medians:")
    for r in results:
        print(format_row(r))
    return results
