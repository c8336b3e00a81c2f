"""One measurement harness: the problem, its inputs, the row check and the timer.

The main job (`maskdsl run`), the tuner's trials (`maskdsl.autotune.measure`) and the benchmarks
(`maskdsl.bench`) all run a kernel on random inputs, check sampled rows against the float64 reference
and time it. They share these pieces so that they agree on what the default problem is, on what
"correct" means (no unwritten row, a relative error under the tolerance of the device) and on how a
time is taken (a `triton.testing.do_bench` median).

It sits in the language layer because it knows nothing of kernels: anything callable is timed,
any output tensor is checked. torch and triton load on first use, so `Problem` stays light for the
tuning database's keys.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from maskdsl.spec import ir


def torch_dtype(name: str):
    """The torch dtype of a spec's dtype name (`bf16`, `fp16`, `fp32`)."""
    import torch

    if name not in ir.TORCH_DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; hint: use one of {', '.join(ir.SPEC_DTYPES)}")
    return getattr(torch, ir.TORCH_DTYPE_NAMES[name])


@dataclass(frozen=True)
class Problem:
    """Batch, heads and head_dim of one attention call: the spec's `attention` statement, or the default.

    The default (batch 1, 8 heads, head_dim 128, bf16) is the one problem every tool assumes when a
    spec names none: the tuner keys its studies by it and `compile` looks configs up with it.
    """

    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bf16"

    @classmethod
    def of(cls, spec: ir.Spec, mask: str) -> "Problem":
        return cls.for_attention(spec.attention_for(mask))

    @classmethod
    def for_attention(cls, attention: ir.Attention | None) -> "Problem":
        if attention is None:
            return cls()
        return cls(attention.batch, attention.heads, attention.kv_heads, attention.head_dim, attention.dtype)

    def label(self) -> str:
        return f"B{self.batch}H{self.heads}K{self.kv_heads}D{self.head_dim}-{self.dtype}"

    def interpreter_slice(self) -> "Problem":
        """One head of one batch in float32: what Triton's interpreter runs in seconds (same head_dim)."""
        return replace(self, batch=1, heads=1, kv_heads=1, dtype="fp32")

    def describe(self) -> str:
        return f"batch {self.batch}, {self.heads} heads ({self.kv_heads} kv), head_dim {self.head_dim}, {self.dtype}"


def make_inputs(problem: Problem, tokens: int, device="cpu", seed: int = 0):
    """q [B, H, L, D] and k, v [B, H_kv, L, D], standard normal, drawn on `device` from `seed`.

    Drawn on the device itself: the 115,200-token cases would take seconds to draw on the CPU.
    """
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch_dtype(problem.dtype)
    q_shape = (problem.batch, problem.heads, tokens, problem.head_dim)
    kv_shape = (problem.batch, problem.kv_heads, tokens, problem.head_dim)
    return tuple(torch.randn(shape, generator=gen, device=device, dtype=dtype)
                 for shape in (q_shape, kv_shape, kv_shape))


def sample_rows(tokens: int, count: int, seed: int = 0):
    """`count` distinct query rows (all if fewer), sorted, as a CPU int64 tensor."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(tokens, generator=gen)[:count].sort().values


def tolerance(device) -> float:
    """Largest relative error that passes: float32 in the interpreter, bf16/fp16 output rounding on a GPU."""
    return 2e-3 if str(device).startswith("cpu") else 2e-2


def relative_error(got, ref, dtype=None) -> float:
    """||got - ref|| / ||ref|| (Frobenius), in float64 unless `dtype` says otherwise; NaN anywhere gives NaN."""
    import torch

    dtype = dtype or torch.float64
    ref = ref.to(dtype)
    return ((got.to(dtype) - ref).norm() / ref.norm().clamp(min=1e-30)).item()


@dataclass(frozen=True)
class RowCheck:
    """The outcome of comparing a poisoned-then-written output with the reference rows."""

    rows: int  # query rows compared with the reference
    unwritten: int  # (batch, head, row) outputs still NaN where the kernel had to write
    stray: int  # (batch, head, row) outputs written where the kernel had not to (a slice that leaked)
    error: float  # relative error of the compared rows (NaN when any was unwritten)

    def ok(self, tol: float) -> bool:
        return self.unwritten == 0 and self.stray == 0 and self.error < tol  # NaN fails

    def describe(self) -> str:
        text = f"{self.rows} rows, relative error vs float64 reference {self.error:.2e}"
        if self.unwritten or self.stray:
            text += f"; {self.unwritten} unwritten and {self.stray} stray output rows"
        return text


@dataclass(frozen=True)
class RowReference:
    """The float64 reference for some query rows of batch 0 and the first few heads, built once."""

    rows: object  # CPU int64 tensor of flat query indices
    heads: int
    values: object  # [1, heads, len(rows), D] float64

    def check(self, out, slice_only: bool = False) -> RowCheck:
        """Compare `out` (poisoned with NaN before the run) with the reference rows.

        Every row of `out` must have been written, or with `slice_only` exactly the reference rows
        (the kernel ran only the query tiles that hold them).
        """
        import torch

        written = ~torch.isnan(out).any(-1)  # [B, H, L]
        idx = self.rows.to(out.device)
        if slice_only:
            inside = torch.zeros(out.shape[2], dtype=torch.bool, device=out.device)
            inside[idx] = True
            unwritten = int((~written[:, :, idx]).sum())
            stray = int((written & ~inside).sum())
        else:
            unwritten, stray = int((~written).sum()), 0
        error = relative_error(out[:1, :self.heads, idx], self.values)
        return RowCheck(len(self.rows), unwritten, stray, error)


def reference_rows(q, k, v, spec: ir.Spec, mask: str, rows, heads: int = 2) -> RowReference:
    """The reference for `rows` of batch 0 and up to `heads` query heads (with the kv heads they use)."""
    from maskdsl.harness.reference import reference_attention_rows

    group = q.shape[1] // k.shape[1]
    heads = min(heads, q.shape[1])
    if heads > group:
        heads -= heads % group  # whole groups, so the reference pairs query and kv heads as the kernel does
    kv = max(1, heads // group)
    values = reference_attention_rows(q[:1, :heads].float(), k[:1, :kv].float(), v[:1, :kv].float(), spec, mask,
                                      rows)
    return RowReference(rows.to("cpu"), heads, values)


def check_rows(out, q, k, v, spec: ir.Spec, mask: str, rows, heads: int = 2, slice_only: bool = False) -> RowCheck:
    """`reference_rows(...).check(out)` in one step, for a single output."""
    return reference_rows(q, k, v, spec, mask, rows, heads).check(out, slice_only)


def time_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Milliseconds per call of `fn()`: the median of `triton.testing.do_bench` (GPU only)."""
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


GRAPH_BELOW_MS = 1.0  # calls faster than this are also timed from a CUDA graph (kernel time, no host launch)


def graph_time_ms(fn, calls: int = 20, warmup: int = 25, rep: int = 100) -> float | None:
    """Milliseconds per call of `fn()` replayed from a CUDA graph of `calls` calls: the GPU's time alone.

    A call of a small problem (one head, 32k tokens) costs about as much again on the
    host (Python, the launcher, TMA descriptor encoding), so do_bench measures the host. NATTEN's
    published times are kernel times (its profiler), and a server replays graphs: this is the number to
    set beside them. None if the call cannot be captured.
    """
    import torch
    import triton

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") / calls
    except RuntimeError:
        return None


def single_call_ms(fn, warmup: int = 10, calls: int = 5, idle_s: float = 0.1) -> float | None:
    """The GPU time of one call of `fn()` from an idle GPU: after `warmup` calls (each followed by a
    synchronize), `calls` times: `idle_s` seconds of idle, then the call under torch.profiler (CUDA
    activity), its kernels' CUPTI durations summed (kernel time, no host launch). The median.

    NATTEN's published kernel times are single profiled calls. The same kernel's time depends on
    what ran just before (an idle GPU, back-to-back calls and short gaps between calls each give a
    different time: docs/BENCHMARKS.md), so this number fixes the state: a call from idle. Speedups
    stay do_bench ratios (back to back, the sustained clock). None without CUDA kernels to time.
    """
    import statistics

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return None
    for _ in range(warmup):
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        time.sleep(idle_s)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        if not kernels:
            return None
        times.append(sum(e.time_range.elapsed_us() for e in kernels) / 1000)
    return statistics.median(times)


def host_us(fn, calls: int = 200, sync=None, every: int = 20) -> float:
    """Warm host time of one call of `fn()` in microseconds: the median over `calls` of the wall time each
    call takes to return, without waiting for the GPU (`sync`, e.g. torch.cuda.synchronize, runs only
    between groups of `every` calls, so the launch queue stays short and never holds the host back).
    What a decode step or a small layer pays on the CPU on top of its kernels."""
    import statistics

    for _ in range(10):
        fn()
    times = []
    for i in range(calls):
        if sync is not None and i % every == 0:
            sync()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if sync is not None:
        sync()
    return statistics.median(times) * 1e6


DENSE_BACKENDS = ("cudnn", "flash")


def dense_call(q, k, v, backend: str):
    """A call of dense SDPA on `backend` ("cudnn" or "flash") alone, GQA's kv heads repeated once here (not
    per call); what every dense baseline times."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    kq = k.repeat_interleave(group, 1) if group != 1 else k
    vq = v.repeat_interleave(group, 1) if group != 1 else v
    kind = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def call():
        with sdpa_kernel(kind):
            return torch.nn.functional.scaled_dot_product_attention(q, kq, vq)

    return call


def dense_times(q, k, v, warmup: int = 25, rep: int = 100) -> tuple[dict[str, float | None], dict[str, str]]:
    """Dense SDPA with each backend alone: ({backend: ms or None}, {backend: why it could not run}).

    The baseline of every speedup is the best of these, measured in the same process on the same inputs.
    """
    times, errors = {}, {}
    for name in DENSE_BACKENDS:
        try:
            call = dense_call(q, k, v, name)
            times[name] = time_ms(call, warmup, rep)
            if times[name] < GRAPH_BELOW_MS:
                times[f"{name}_graph"] = graph_time_ms(call, warmup=warmup, rep=rep)
        except RuntimeError as exc:
            times[name] = None
            errors[name] = str(exc)[:200]
    return times, errors


def best_dense(times: dict[str, float | None]) -> tuple[str, float]:
    """(backend, ms) of the fastest dense backend that ran."""
    ran = {name: ms for name, ms in times.items() if ms and not name.endswith("_graph")}
    if not ran:
        raise RuntimeError(f"no dense SDPA backend ran ({', '.join(times)})")
    name = min(ran, key=ran.get)
    return name, ran[name]
