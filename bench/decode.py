"""`maskdsl bench --decode`: decode steps against a KV cache, ours beside SDPA and FlexAttention's decoding.

Each case is a batch of sequences at one context length, GQA heads, a few new tokens per sequence
(issue 27's targets: 64 query / 8 kv heads, head_dim 128, bf16, contexts 8k-128k, batch 1-64, q_len
1-8, and a window of 4096 with sinks at 128k). Per case, in one process on the same tensors:

* correctness first: our output (contiguous and paged cache) against the float64 reference of the
  new rows over the whole cached sequence, for the first and last sequence; a case that fails is
  reported and not timed;
* ours, contiguous and paged (shuffled pages), `check_values=False` as a server that captures graphs
  runs it: do_bench's median (host launch included) and the replay of a CUDA graph (device time);
* dense SDPA over the whole cache (cuDNN, flash and efficient; with `enable_gqa`, else with the kv
  heads repeated outside the timing where that fits; the best reported; q_len > 1 without a mask, a
  timing reference), which reads the whole cache whatever the mask: what a user without a sparse
  decode path runs;
* FlexAttention with the same mask: compiled `flex_attention` at q_len < 128 takes its decoding
  kernel; its BlockMask is built once per case, outside the timing, at the new tokens' positions.

The figure of merit is the K/V bytes the mask reaches per step over the step's time (TB/s), the
bytes from maskdsl.analysis.decode_reach (what the kernel reads), beside the simulator's prediction.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

import maskdsl
from maskdsl.spec import ir

MASKS = {
    "causal": "causal",
    "window_sinks": "(sliding_window(4096, causal=true) | sink(4)) & causal",
    "nsa": "(topk(k=16, block=128) | sliding_window(512, causal=true) | sink(4)) & causal",
}
MAX_CACHED_TOKENS = 2**22  # batch x context: 16 GiB for K and V at 8 kv heads, twice over with the paged copy
PAGE_SIZE = 64


@dataclass(frozen=True)
class DecodeCase:
    mask: str  # a key of MASKS
    context: int  # the grid's length and every sequence's cache length (new tokens included)
    batch: int
    q_len: int
    heads: int = 64
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bf16"

    @property
    def name(self) -> str:
        return f"{self.mask}_ctx{self.context}_b{self.batch}_q{self.q_len}"

    def spec(self) -> ir.Spec:
        return maskdsl.parse(f"layout seq = grid({self.context})\nmask m = {MASKS[self.mask]}\n")


def default_cases() -> list[DecodeCase]:
    """The issue's grid: causal (the whole cache) at 8k-128k, batch 1-64, q_len 1 and 8, within
    MAX_CACHED_TOKENS; the window with sinks at 128k; an NSA-style top-k mask at 32k (its reference is
    computed on the CPU)."""
    cases = [DecodeCase("causal", ctx, batch, q_len) for ctx in (8192, 32768, 131072) for batch in (1, 8, 64)
             for q_len in (1, 8) if ctx * batch <= MAX_CACHED_TOKENS]
    cases += [DecodeCase("window_sinks", 131072, batch, q_len) for batch in (1, 8, 32) for q_len in (1, 8)]
    cases += [DecodeCase("nsa", 32768, batch, q_len) for batch in (1, 8) for q_len in (1, 8)]
    return cases


def select(cases: list[DecodeCase], only: str | None) -> list[DecodeCase]:
    """Cases whose name contains `only` (or any of several, comma-separated)."""
    if not only:
        return cases
    words = [w for w in only.split(",") if w]
    return [c for c in cases if any(w in c.name for w in words)]


def make_inputs(case: DecodeCase, device, seed: int = 0):
    """(q, k_cache, v_cache, cache_seqlens, pool_k, pool_v, page_table): a contiguous cache and the same
    keys in a pool of shuffled pages."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, ir.TORCH_DTYPE_NAMES[case.dtype])
    b, h, hk, d, n = case.batch, case.heads, case.kv_heads, case.head_dim, case.context
    q = torch.randn(b, h, case.q_len, d, generator=gen, device=device, dtype=dtype)
    kc = torch.randn(b, hk, n, d, generator=gen, device=device, dtype=dtype)
    vc = torch.randn(b, hk, n, d, generator=gen, device=device, dtype=dtype)
    lens = torch.full((b,), n, dtype=torch.int32, device=device)
    pages = -(-n // PAGE_SIZE)
    perm = torch.randperm(b * pages, generator=gen, device=device)
    pool_k, pool_v = (_paged(c, perm, pages) for c in (kc, vc))
    return q, kc, vc, lens, pool_k, pool_v, perm.view(b, pages).to(torch.int32)


def _paged(cache: torch.Tensor, perm: torch.Tensor, pages: int) -> torch.Tensor:
    b, hk, n, d = cache.shape
    padded = torch.nn.functional.pad(cache, (0, 0, 0, pages * PAGE_SIZE - n))
    in_order = padded.view(b, hk, pages, PAGE_SIZE, d).permute(0, 2, 1, 3, 4).reshape(b * pages, hk, PAGE_SIZE, d)
    pool = torch.empty_like(in_order)
    pool[perm] = in_order
    return pool


def references(case: DecodeCase, spec, q, kc, vc, sequences) -> dict:
    """{sequence: float64 reference of its new rows} over its whole cache (a top-k mask: the decode
    selection's reference, maskdsl.harness.decode, on the CPU)."""
    from maskdsl.harness.decode import decode_reference
    from maskdsl.harness.reference import reference_attention_block

    n = case.context
    out = {}
    for b in sequences:
        if spec.mask("m").dynamic:
            out[b] = decode_reference(q[b:b + 1], kc[b:b + 1], vc[b:b + 1], spec, "m", [n])
        else:
            out[b] = reference_attention_block(q[b:b + 1], kc[b:b + 1], vc[b:b + 1], spec, "m",
                                               torch.arange(n - case.q_len, n), torch.arange(n))
    return out


def worst_error(got, refs: dict) -> float:
    """The largest relative error of `got` over the referenced sequences (NaN anywhere gives NaN)."""
    from maskdsl.harness.measure import relative_error

    errors = [relative_error(got[b:b + 1], ref.to(got.device)) for b, ref in refs.items()]
    return float("nan") if any(e != e for e in errors) else max(errors)


def reached_keys(fn, case: DecodeCase, q, kc, lens) -> tuple[int, int, int]:
    """(keys of the static part's ranges, keys of picked blocks outside them, keys a top-k selection
    averages), each summed over sequences and kv heads: maskdsl.analysis.decode_reach's ranges and,
    with a top-k term, the blocks the group picked."""
    import numpy as np

    from maskdsl.analysis.decode_reach import step_ranges

    ranges = step_ranges(fn.table, lens.cpu().numpy(), case.q_len)  # [B, slots, 2]
    static = int(np.clip(ranges[..., 1] - ranges[..., 0] + 1, 0, None).sum()) * case.kv_heads
    if fn.selection is None:
        return static, 0, 0
    _, plist = fn.selection.picks(q, kc, lens, None, kc.shape[2])
    owner = fn.selection.owner("cpu")[:case.context].numpy()
    picked_keys = 0
    for b in range(case.batch):
        seen = np.zeros(case.context, bool)
        for lo, hi in ranges[b]:
            if lo <= hi:
                seen[lo:hi + 1] = True
        for h in range(case.kv_heads):
            picked = plist[b, h].cpu().numpy()
            picked_keys += int((np.isin(owner, picked[picked >= 0]) & ~seen).sum())
    return static, picked_keys, case.batch * case.kv_heads * case.context


EXPAND_LIMIT = 16 * 2**30  # bytes: kv heads repeated for a backend without GQA only below this


def sdpa_times(q, kc, vc, timer) -> dict:
    """Dense SDPA over the whole cache with each backend (ms, or why it could not run): with `enable_gqa`,
    and where a backend refuses that, with the kv heads repeated once outside the timing (`_expanded`)
    when the copy fits EXPAND_LIMIT."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // kc.shape[1]
    expanded = None
    out = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def call(backend=backend, k=kc, v=vc, gqa=True):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        try:
            call()
            out[f"sdpa_{name}_ms"] = timer(call)
            continue
        except RuntimeError as exc:
            out[f"sdpa_{name}_failed"] = str(exc).splitlines()[0][:200]
        if group == 1 or kc.numel() * kc.element_size() * 2 * group > EXPAND_LIMIT:
            continue
        try:
            if expanded is None:
                expanded = tuple(c.repeat_interleave(group, 1) for c in (kc, vc))
            call(backend, *expanded, False)
            out[f"sdpa_{name}_expanded_ms"] = timer(lambda backend=backend: call(backend, *expanded, False))
        except RuntimeError as exc:
            out[f"sdpa_{name}_expanded_failed"] = str(exc).splitlines()[0][:200]
    return out


def flex_decoding(case: DecodeCase, mask: ir.MaskDef, device):
    """Compiled flex_attention with a BlockMask of the new tokens' rows (built here, once)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from maskdsl.harness.semantics import attends

    first = case.context - case.q_len
    shape = tuple(mask.layout.shape)

    def mask_mod(b, h, q_idx, kv_idx):
        return attends(mask.expr, shape, [q_idx + first], [kv_idx])

    torch._dynamo.reset()  # a fresh compile cache per case (dynamo's recompile limit, as bench.run says)
    block_mask = create_block_mask(mask_mod, None, None, case.q_len, case.context, device=device)
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True)


DEFAULT_CONFIGS = (None,)  # the decode path's own tiles (codegen.decode.attention.CompiledDecode.tiles)


def run_case(case: DecodeCase, device="cuda", timer=None, graph_timer=None, with_flex: bool = True,
             check_sequences: int = 2, configs=DEFAULT_CONFIGS) -> dict:
    """One case's record (see the module docstring); `timer(fn) -> ms`, `graph_timer(fn) -> ms or None`;
    `configs`: (BLOCK_N, num_warps, num_stages) launch configs to time (None: the defaults), each checked
    first; the headline numbers are the best config's."""
    from maskdsl.codegen.decode import decoder
    from maskdsl.codegen.decode.checks import check_decode
    from maskdsl.harness.measure import tolerance
    from maskdsl.simulator.decode import DecodeStep, predict_decode

    if timer is None:
        from maskdsl.harness.measure import graph_time_ms, time_ms

        timer, graph_timer = time_ms, graph_time_ms
    spec = case.spec()
    mask = spec.mask("m")
    result = {"case": case.name, **asdict(case), "mask_text": MASKS[case.mask], "page_size": PAGE_SIZE}
    start = time.perf_counter()
    fn = decoder(mask)
    result["build_s"] = time.perf_counter() - start
    q, kc, vc, lens, pool_k, pool_v, table = make_inputs(case, device)
    refs = references(case, spec, q, kc, vc, sorted({0, case.batch - 1})[:check_sequences])
    static_keys, picked_keys, selection_keys = reached_keys(fn, case, q, kc, lens)
    row_bytes = case.head_dim * ir.DTYPE_BYTES[case.dtype]
    kv_bytes = (static_keys + picked_keys) * 2 * row_bytes
    result["kv_bytes"], result["selection_bytes"] = kv_bytes, selection_keys * row_bytes
    runs = {"ours": lambda: fn(q, kc, vc, lens, check_values=False),
            "ours_paged": lambda: fn(q, pool_k, pool_v, lens, table, check_values=False)}
    if fn.selection is not None:  # top-k with the block means kept beside the cache: the sparse selection
        means = fn.block_means(kc, lens)
        runs["ours_means"] = lambda: fn(q, kc, vc, lens, check_values=False, block_means=means)
    tol = tolerance(device)
    result["configs"] = []
    try:
        for config in configs:
            fn.configure(config)
            call_shape = check_decode(q, kc, vc, lens, None, mask.layout.tokens)
            block_m, block_n, warps, stages = fn.tiles(call_shape)
            row = {"config": [block_n, warps, stages], "splits": fn.num_splits(call_shape, q.device, block_m, block_n)}
            for name, call in runs.items():
                row[f"{name}_error"] = err = worst_error(call(), refs)
                if not err < tol:
                    row[f"{name}_failed"] = f"relative error {err:.3g} against the float64 reference (tolerance {tol})"
                    continue
                row[f"{name}_ms"] = timer(call)
                if graph_timer is not None:
                    row[f"{name}_graph_ms"] = graph_timer(call)
                for kind in ("ms", "graph_ms"):
                    if row.get(f"{name}_{kind}"):
                        row[f"{name}_{kind.replace('ms', 'tbps')}"] = kv_bytes / (row[f"{name}_{kind}"] * 1e-3) / 1e12
            result["configs"].append(row)
    finally:
        fn.configure(None)
    for name in runs:  # the headline: the best checked config of each cache layout
        timed = [r for r in result["configs"] if r.get(f"{name}_ms")]
        if not timed:
            result[f"{name}_failed"] = "; ".join(r.get(f"{name}_failed", "not timed") for r in result["configs"])
            continue
        best = min(timed, key=lambda r: r[f"{name}_ms"])
        result[f"{name}_config"] = best["config"]
        result[f"{name}_splits"] = best["splits"]
        for key in ("error", "ms", "graph_ms", "tbps", "graph_tbps"):
            if best.get(f"{name}_{key}") is not None:
                result[f"{name}_{key}"] = best[f"{name}_{key}"]
        step = DecodeStep(lengths=(case.context,) * case.batch, heads=case.heads, kv_heads=case.kv_heads,
                          q_len=case.q_len, head_dim=case.head_dim, dtype_bytes=ir.DTYPE_BYTES[case.dtype],
                          splits=best["splits"], page_size=PAGE_SIZE if name == "ours_paged" else 0,
                          picked_keys=picked_keys, selection_keys=0 if name == "ours_means" else selection_keys)
        result[f"{name}_predicted_us"] = predict_decode(fn.table, step).time_us
    result.update(sdpa_times(q, kc, vc, timer))
    sdpa = [v for k, v in result.items() if k.startswith("sdpa_") and k.endswith("_ms")]
    if sdpa:
        result["sdpa_best_ms"] = min(sdpa)
    if with_flex and mask.dynamic:
        result["flex_failed"] = "not run: a top-k selection changes every step, FlexAttention's BlockMask is static"
    elif with_flex:
        try:
            start = time.perf_counter()
            flex = flex_decoding(case, mask, q.device)
            flex(q, kc, vc)
            result["flex_build_s"] = time.perf_counter() - start
            result["flex_ms"] = timer(lambda: flex(q, kc, vc))
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            result["flex_failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    ours = result.get("ours_ms")
    if ours:
        for base in ("sdpa_best", "flex"):
            if result.get(f"{base}_ms"):
                result[f"speedup_vs_{base.split('_')[0]}"] = result[f"{base}_ms"] / ours
    return result


def parse_configs(text: str | None):
    """`64x4x2,128x8x3` -> ((64, 4, 2), (128, 8, 3)); None or empty: DEFAULT_CONFIGS."""
    if not text:
        return DEFAULT_CONFIGS
    try:
        return tuple(tuple(int(x) for x in item.split("x")) for item in text.split(",") if item)
    except ValueError:
        raise ValueError(f"--decode-configs takes BLOCK_NxWARPSxSTAGES items, comma-separated; got {text!r}") from None


def run_decode(out_json: str | None, only: str | None = None, with_flex: bool = True, device="cuda",
               configs=DEFAULT_CONFIGS) -> list[dict]:
    """Every selected case in this process; the JSON (environment and results) rewritten after each case."""
    from maskdsl.bench.run import environment, save_run

    env = environment()
    results = []
    for case in select(default_cases(), only):
        try:
            results.append(run_case(case, device, with_flex=with_flex, configs=configs))
        except torch.cuda.OutOfMemoryError as exc:
            results.append({"case": case.name, "failed": f"out of memory: {str(exc).splitlines()[0][:200]}"})
        torch.cuda.empty_cache()
        print(summary(results[-1]), flush=True)
        if out_json:
            save_run(out_json, env, results)
    return results


def summary(r: dict) -> str:
    """One line of a case's record."""
    if "failed" in r:
        return f"{r['case']}: {r['failed']}"
    cols = [f"{r['case']:34}", f"config {r.get('ours_config')} splits {r.get('ours_splits')}"]
    for key in ("ours", "ours_paged", "ours_means"):
        if f"{key}_failed" in r:
            cols.append(f"{key} FAILED ({r[f'{key}_failed']})")
        elif f"{key}_ms" in r:
            cols.append(f"{key} {r[f'{key}_ms'] * 1e3:.1f} us ({r.get(f'{key}_tbps', 0):.2f} TB/s"
                        + (f", graph {r[f'{key}_graph_tbps']:.2f}" if r.get(f"{key}_graph_tbps") else "") + ")")
    if r.get("sdpa_best_ms"):
        cols.append(f"SDPA {r['sdpa_best_ms'] * 1e3:.1f} us")
    if r.get("flex_ms"):
        cols.append(f"flex {r['flex_ms'] * 1e3:.1f} us")
    for base in ("sdpa", "flex"):
        if r.get(f"speedup_vs_{base}"):
            cols.append(f"{r[f'speedup_vs_{base}']:.2f}x {base}")
    return " | ".join(cols)
