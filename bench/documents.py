"""`maskdsl bench --documents`: packed documents against PyTorch's varlen SDPA and FlexAttention, one process.

Each case draws new document lengths for every call (a data loader's packing), uploads the draws before
timing, and times `calls` consecutive calls with CUDA events: maskdsl's forward and forward+backward
(offsets unchecked, as a training step that trusts its loader would call it), SDPA on nested jagged
tensors (FlashAttention-2 varlen underneath; causal and full only) and FlexAttention with a document
mask_mod whose BlockMask is rebuilt every call (its build time counted). Before timing, maskdsl's output
on sampled rows and its dQ on those rows are checked against the float64 oracle at the real size, and
dK/dV in full at a smaller one. The simulator's prediction and bound for each draw go beside the times.
The baselines are in bench/document_baselines.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
import torch

import maskdsl
from maskdsl.bench.document_baselines import max_relative_error, time_calls
from maskdsl.spec.documents import document_form, draw_offsets


@dataclass(frozen=True)
class DocumentCase:
    name: str
    inner: str  # what `document & (...)` holds
    length: int
    low: int  # document lengths drawn uniformly in [low, high]
    high: int
    heads: int = 16
    kv_heads: int = 16
    head_dim: int = 128
    prefix_share: float = 0.0  # prefix-LM: each document's prefix drawn in [0, share x its length]

    @property
    def text(self) -> str:
        return f"layout seq = grid({self.length})\nmask m = document & ({self.inner})\n"

    def spec(self):
        return maskdsl.parse(self.text, filename=f"<bench --documents {self.name}>")

    def draw(self, rng: random.Random) -> tuple[list[int], list[int] | None]:
        offsets = draw_offsets(self.length, self.low, self.high, rng)
        if not self.prefix_share:
            return offsets, None
        return offsets, [rng.randint(0, int(self.prefix_share * (b - a))) for a, b in zip(offsets, offsets[1:])]

    def scaled(self, length: int, heads: int = 2, head_dim: int = 32) -> "DocumentCase":
        """The same mask at a small size (the CPU check and tests): lengths and windows scaled down."""
        f = length / self.length
        inner = self.inner
        if "4096" in inner:
            inner = inner.replace("4096", str(max(1, int(4096 * f))))
        return replace(self, length=length, low=max(1, int(self.low * f)), high=max(1, int(self.high * f)),
                       heads=heads, kv_heads=heads, head_dim=head_dim, inner=inner)


CASES = {c.name: c for c in [
    DocumentCase("causal_32k", "causal", 32768, 512, 8192),
    DocumentCase("window4096_128k", "sliding_window(4096, causal=true)", 131072, 2048, 32768),
    DocumentCase("prefix_lm_128k", "causal | prefix", 131072, 2048, 32768, prefix_share=0.5),
    DocumentCase("window_sink_32k", "sliding_window(4096, causal=true) | (sink(4) & causal)", 32768, 512, 8192),
]}


def pick_cases(only: str | None) -> list[DocumentCase]:
    if not only:
        return list(CASES.values())
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if not any(n in c for c in CASES)]
    if unknown:
        raise ValueError(f"no document case matches {unknown}; cases: {', '.join(CASES)}")
    return [c for c in CASES.values() if any(n in c.name for n in names)]


def attended_pairs(case: DocumentCase, offsets, prefix) -> int:
    """Exact attended (query, key) pairs of one head: per row the union of its terms' intervals."""
    from maskdsl.simulator.documents import _rows, _token_meta

    s, e, p = _token_meta(offsets, prefix, case.length)
    tok = np.arange(case.length, dtype=np.int64)
    ivs = [_rows(t, tok, s, e, p) for t in document_form(case.spec().mask("m").expr).terms]
    total = np.zeros(case.length, np.int64)
    for size in range(1, len(ivs) + 1):  # inclusion-exclusion: intersections of intervals are intervals
        from itertools import combinations

        for group in combinations(ivs, size):
            lo = np.max([g[0] for g in group], axis=0)
            hi = np.min([g[1] for g in group], axis=0)
            total += (-1) ** (size + 1) * np.maximum(hi - lo, 0)
    return int(total.sum())


def _tensors(case: DocumentCase, offsets, prefix, device):
    off = torch.tensor(offsets, dtype=torch.int32, device=device)
    pre = None if prefix is None else torch.tensor(prefix, dtype=torch.int32, device=device)
    return off, pre


def inputs(case: DocumentCase, device, dtype, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = lambda h: (1, h, case.length, case.head_dim)  # noqa: E731
    return [torch.randn(shape(h), generator=gen).to(device=device, dtype=dtype)
            for h in (case.heads, case.kv_heads, case.kv_heads, case.heads)]


def check(case: DocumentCase, fn, q, k, v, offsets, prefix, rows: int = 64, seed: int = 0) -> dict:
    """Sampled rows of O, the LSE and dQ against the float64 oracle: a row's output and its dQ depend on
    that row alone (and every key), so these are exact at the real size."""
    off, pre = _tensors(case, offsets, prefix, q.device)
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(case.length, generator=gen)[:rows].sort().values
    idx = sample.to(q.device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves, documents=off, prefix=pre, return_lse=True)
    dout = torch.randn(out.shape, generator=gen).to(out)
    dq, = torch.autograd.grad(out, leaves[0], dout)
    q_rows = q.detach()[:, :, idx].cpu().double().requires_grad_()
    ref, ref_lse = _rows_reference(q_rows, k, v, case.spec(), offsets, prefix, sample)
    ref_dq, = torch.autograd.grad(ref, q_rows, dout[:, :, idx].cpu().double())
    return {"rows": rows, "out_err": max_relative_error(out[:, :, idx], ref), "lse_err": max_relative_error(lse[:, :, idx], ref_lse),
            "dq_err": max_relative_error(dq[:, :, idx], ref_dq)}


def _rows_reference(q_rows, k, v, spec, offsets, prefix, sample):
    """The float64 attention of the sampled query rows `q_rows` (differentiable in them) over all keys."""
    from maskdsl.harness.documents import document_mask
    from maskdsl.harness.reference import _attend

    mdef = spec.mask("m")
    mask = document_mask(mdef.expr, mdef.layout.shape, offsets, prefix, rows=sample)
    return _attend(q_rows, k.detach().cpu().double(), v.detach().cpu().double(), mask, None, True)


def check_gradients(case: DocumentCase, fn, q, k, v, offsets, prefix, seed: int = 0) -> dict:
    """dQ, dK, dV in full against autograd through the float64 oracle (small sizes: it is [L, L])."""
    from maskdsl.harness.documents import reference_document_attention

    off, pre = _tensors(case, offsets, prefix, q.device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, documents=off, prefix=pre)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    got = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = reference_document_attention(*ref_leaves, case.spec(), "m", offsets, prefix)
    want = torch.autograd.grad(ref, ref_leaves, dout.cpu().double())
    return {"out_err": max_relative_error(out, ref), **{f"d{n}_err": max_relative_error(g, w) for n, g, w in zip("qkv", got, want)}}


def pad_documents(offsets: list[int], prefix: list[int] | None, count: int):
    """The same layout as `count` documents: empty ones (repeated last offset) appended, so every call of a
    CUDA graph sees offsets of one shape."""
    extra = count - (len(offsets) - 1)
    return offsets + [offsets[-1]] * extra, None if prefix is None else prefix + [0] * extra


def graph_check(case: DocumentCase, fn, q, k, v, draws, device, calls: int) -> dict:
    """Capture one forward in a CUDA graph with static offset buffers (documents padded to one count), then
    for each draw copy its offsets in and replay: the largest difference to an eager call, and the replay
    time. What "capturable, no recompile, no sync" means in practice."""
    count = max(len(o) - 1 for o, _ in draws)
    padded = [pad_documents(o, p, count) for o, p in draws]
    off_buf, pre_buf = _tensors(case, *padded[0], device)
    out_buf = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # warm up (allocations, autotuning) outside the capture
            out_buf.copy_(fn(q, k, v, documents=off_buf, prefix=pre_buf, check_documents=False))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out_buf.copy_(fn(q, k, v, documents=off_buf, prefix=pre_buf, check_documents=False))
    worst = 0.0
    staged = [_tensors(case, o, p, device) for o, p in padded]
    for off, pre in staged:
        off_buf.copy_(off)
        if pre_buf is not None:
            pre_buf.copy_(pre)
        graph.replay()
        with torch.no_grad():
            eager = fn(q, k, v, documents=off, prefix=pre)
        worst = max(worst, (out_buf.float() - eager.float()).abs().max().item())

    def replay(i):
        off_buf.copy_(staged[i][0])
        if pre_buf is not None:
            pre_buf.copy_(staged[i][1])
        graph.replay()

    return {"documents_padded_to": count, "max_diff_to_eager": worst, "replay_ms": time_calls(replay, calls)}


# What `--sweep` tries: (block_m, block_n, warps, stages) of each kernel kind; the defaults first.
# (the ones ptxas reports heavy spills for at head_dim 128 are left out)
SWEEP_FORWARD = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)]
SWEEP_DKDV = [(32, 128, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2)]
SWEEP_DQ = [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 128, 8, 2)]


def sweep_configs(case: DocumentCase, q, k, v, dout, device_draws, calls: int) -> dict:
    """Each forward config timed alone, then each (dK/dV, dQ) pair with the default forward: every config's
    times and the fastest of each kind. One config that fails (resources) is recorded, not fatal."""
    from maskdsl.codegen.build import compile_attention
    from maskdsl.codegen.documents.compiled import DocumentConfig

    spec = case.spec()
    rows = []

    def timed(config, train: bool):
        fn = compile_attention(spec, "m", config)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def step(i):
            off, pre = device_draws[i]
            if train:
                fn(*leaves, documents=off, prefix=pre, check_documents=False).backward(dout)
            else:
                fn(q, k, v, documents=off, prefix=pre, check_documents=False)

        if train:
            return time_calls(step, calls)
        with torch.no_grad():
            return time_calls(step, calls)

    for fwd in SWEEP_FORWARD:
        config = DocumentConfig(forward=fwd)
        try:
            rows.append({"config": config.key(), "forward_ms": timed(config, False)})
        except Exception as exc:  # noqa: BLE001 - out of resources on this GPU: skip the config
            rows.append({"config": config.key(), "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    for dkdv in SWEEP_DKDV:
        for dq in SWEEP_DQ:
            config = DocumentConfig(dkdv=dkdv, dq=dq)
            try:
                rows.append({"config": config.key(), "train_ms": timed(config, True)})
            except Exception as exc:  # noqa: BLE001
                rows.append({"config": config.key(), "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    best_fwd = min((r for r in rows if "forward_ms" in r), key=lambda r: r["forward_ms"], default=None)
    best_train = min((r for r in rows if "train_ms" in r), key=lambda r: r["train_ms"], default=None)
    return {"configs": rows, "best_forward": best_fwd, "best_train": best_train}


def _simulated(case: DocumentCase, spec, draws, device) -> dict:
    """The simulator's mean prediction and bound (us) over the draws, for this GPU's cost constants."""
    from maskdsl.simulator.documents import predict_documents

    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    sims = [predict_documents(spec.mask("m").expr, case.length, o, p, heads=case.heads, head_dim=case.head_dim,
                              gpu=gpu) for o, p in draws]

    def mean(xs):
        return None if any(x is None for x in xs) else float(np.mean(xs))

    return {key: mean([getattr(s, key) for s in sims])
            for key in ("forward_us", "forward_bound_us", "backward_us", "backward_bound_us")}


def run_case(case: DocumentCase, calls: int = 20, with_flex: bool = True, seed: int = 0, device: str = "cuda",
             dtype=torch.bfloat16, sweep: bool = False, check_length: int = 2048) -> dict:
    """One case: checks, then timings; on a machine without a GPU (device "cpu", the interpreter) the same
    steps run at whatever size the case has, without the CUDA-only baselines (SDPA jagged, graphs)."""
    from maskdsl.bench.document_baselines import flex_times, sdpa_times

    spec = case.spec()
    fn = maskdsl.compile(spec, "m")
    rng = random.Random(seed)
    draws = [case.draw(rng) for _ in range(calls)]
    device_draws = [_tensors(case, o, p, device) for o, p in draws]
    q, k, v, dout = inputs(case, device, dtype, seed)
    result = {"case": case.name, "mask": f"document & ({case.inner})", "length": case.length, "heads": case.heads,
              "kv_heads": case.kv_heads, "head_dim": case.head_dim, "dtype": str(dtype).removeprefix("torch."),
              "lengths": [case.low, case.high], "calls": calls,
              "documents_per_call": [len(o) - 1 for o, _ in draws]}
    result["check"] = check(case, fn, q, k, v, *draws[0])
    small = case.scaled(check_length, heads=2, head_dim=case.head_dim)
    sfn = maskdsl.compile(small.spec(), "m")
    sq, sk, sv, _ = inputs(small, device, dtype, seed)
    result["check_small_gradients"] = check_gradients(small, sfn, sq, sk, sv, *small.draw(random.Random(seed)))
    pairs = [attended_pairs(case, o, p) for o, p in draws]
    flops_fwd = 4.0 * case.head_dim * case.heads * float(np.mean(pairs))
    result["flops_forward"] = flops_fwd

    def ours_fwd(i):
        off, pre = device_draws[i]
        fn(q, k, v, documents=off, prefix=pre, check_documents=False)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def ours_train(i):
        off, pre = device_draws[i]
        out = fn(*leaves, documents=off, prefix=pre, check_documents=False)
        out.backward(dout)

    def ours_checked(i):
        off, pre = device_draws[i]
        fn(q, k, v, documents=off, prefix=pre)

    with torch.no_grad():
        fwd = time_calls(ours_fwd, calls)
        checked = time_calls(ours_checked, calls)
    train = time_calls(ours_train, calls)
    bwd = max(train - fwd, 1e-9)
    result["ours"] = {"forward_ms": fwd, "forward_checked_ms": checked, "train_ms": train,
                      "backward_ms": train - fwd, "forward_tflops": flops_fwd / fwd / 1e9,
                      "backward_tflops": 2.5 * flops_fwd / bwd / 1e9}
    try:
        result["simulator"] = _simulated(case, spec, draws, device)
    except (KeyError, ValueError) as exc:  # a GPU without cost constants: the times stand without the bound
        result["simulator"] = {"error": str(exc)[:300]}
    else:
        result["ours"]["forward_of_bound"] = result["simulator"]["forward_bound_us"] / 1e3 / fwd
        if result["simulator"]["backward_bound_us"]:
            result["ours"]["backward_of_bound"] = result["simulator"]["backward_bound_us"] / 1e3 / bwd
    if device != "cuda":
        return result
    try:
        result["cuda_graph"] = graph_check(case, fn, q, k, v, draws, device, calls)
    except Exception as exc:  # noqa: BLE001 - recorded: capture failing is a finding, not a crash
        result["cuda_graph"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if sweep:
        result["sweep"] = sweep_configs(case, q, k, v, dout, device_draws, calls)
    baselines = []
    if case.inner in ("causal", "full") and case.kv_heads == case.heads:
        baselines.append(("sdpa_jagged", lambda: sdpa_times(case, fn, q, k, v, dout, device_draws, calls)))
    if with_flex:
        baselines.append(("flex", lambda: flex_times(case, fn, q, k, v, dout, device_draws, calls, device)))
    for name, timed in baselines:
        try:
            result[name] = timed()
        except Exception as exc:  # noqa: BLE001 - a baseline failing keeps our numbers and says why
            result[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return result


def run_documents(only: str | None = None, out_json: str | None = None, calls: int = 20,
                  with_flex: bool = True, sweep: bool = False) -> list[dict]:
    from maskdsl.bench.run import environment, save_run

    env = environment()
    results = []
    for case in pick_cases(only):
        try:
            r = run_case(case, calls, with_flex, sweep=sweep)
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others' numbers
            r = {"case": case.name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        results.append(r)
        print(format_row(r), flush=True)
        if out_json:
            save_run(out_json, env, results)
    return results


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['case']}: {r['error']}"
    o = r["ours"]
    bound = f", of bound {o['forward_of_bound']:.2f}" if "forward_of_bound" in o else ""
    parts = [f"{r['case']}: ours fwd {o['forward_ms']:.3f} ms ({o['forward_tflops']:.0f} TFLOP/s), "
             f"bwd {o['backward_ms']:.3f} ms ({o['backward_tflops']:.0f}){bound}"]
    for name in ("sdpa_jagged", "flex"):
        if "error" in r.get(name, {}):
            parts.append(f"{name}: {r[name]['error'][:80]}")
    if "forward_ms" in r.get("sdpa_jagged", {}):
        s = r["sdpa_jagged"]
        parts.append(f"sdpa jagged fwd {s['forward_ms']:.3f} bwd {s['backward_ms']:.3f}")
    if "forward_ms" in r.get("flex", {}):
        f = r["flex"]
        parts.append(f"flex fwd {f['forward_ms']:.3f} bwd {f['backward_ms']:.3f} "
                     f"(build {f['block_mask_build_ms']:.3f})")
    parts.append(f"check out {r['check']['out_err']:.1e} dq {r['check']['dq_err']:.1e}")
    return "; ".join(parts)


def cpu_check(only: str | None = None, length: int = 96, seed: int = 0) -> list[dict]:
    """Each case scaled to `length` tokens, run on Triton's interpreter and checked in full (no timing)."""
    from maskdsl.codegen.build import compile_attention
    from maskdsl.codegen.documents.compiled import DocumentConfig

    config = DocumentConfig((16, 16, 4, 1), (16, 16, 4, 1), (16, 16, 4, 1))
    out = []
    for case in pick_cases(only):
        small = case.scaled(length, heads=2, head_dim=16)
        fn = compile_attention(small.spec(), "m", config)
        q, k, v, _ = inputs(small, "cpu", torch.float32, seed)
        draw = small.draw(random.Random(seed))
        out.append({"case": case.name, **check_gradients(small, fn, q, k, v, *draw, seed=seed),
                    "rows": check(small, fn, q, k, v, *draw, rows=8, seed=seed)})
    return out
