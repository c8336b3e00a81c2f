"""The baselines of `maskdsl bench --documents` (bench/documents.py): PyTorch's varlen SDPA on nested jagged
tensors and FlexAttention with a document mask rebuilt per call, each timed over the same draws as ours and
compared with our output on the first draw; and the timer and error measure every part of the run shares.
"""

from __future__ import annotations

import math
import time

import torch

from maskdsl.spec.documents import document_form


def max_relative_error(got, ref) -> float:
    """Largest error relative to the reference's largest magnitude (0 rows: exact zeros compare as 0)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(got)):
        return math.inf
    scale = ref[finite].abs().max().item() if finite.any() else 1.0
    return (got[finite] - ref[finite]).abs().max().item() / max(scale, 1e-30) if finite.any() else 0.0


def _events_ms(step, calls: int) -> float:
    """Mean ms of `step(i)` over i in range(calls), timed with CUDA events around all of them (wall clock
    on a machine without a GPU: the CPU smoke run of the whole case)."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for i in range(calls):
            step(i)
        return (time.perf_counter() - t) * 1e3 / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for i in range(calls):
        step(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def time_calls(step, calls: int, warmup: int = 3) -> float:
    for i in range(warmup):
        step(i % calls)
    return _events_ms(step, calls)


def sdpa_jagged(case, q, k, v, offsets):
    """SDPA on nested jagged tensors (FlashAttention varlen underneath): q, k, v are [L, H, D] (varlen's own
    layout, made once outside the timing) and offsets int64 shared by all three (one ragged dimension).
    The output is [L, H, D]. None where the mask is not plain causal or full per document (what varlen
    serves); on the CPU PyTorch has no causal jagged backend."""
    if case.inner not in ("causal", "full") or case.kv_heads != case.heads:
        return None
    nest = lambda t: torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(nest(q), nest(k), nest(v), is_causal=case.inner == "causal")
    return out.transpose(1, 2).values()


class FlexDocuments:
    """FlexAttention's document mask for a case: one mask_mod over buffers that each call refills, then a
    BlockMask built for the new offsets (`block_mask`).

    The mask_mod and its buffers are the same objects every call (FlexAttention's recipe for masks that
    change per step), so the build compiles once; `compile_mask` builds with create_block_mask(_compile=True),
    its advice for long sequences (the eager build evaluates the mask_mod over all L x L pairs: 17 G at 128k).
    """

    def __init__(self, case, device, compile_mask: bool = True):
        self.case, self.device, self.compile_mask = case, device, compile_mask
        length = case.length
        self.pos = torch.arange(length, device=device, dtype=torch.int32)
        self.doc = torch.zeros(length, device=device, dtype=torch.int64)
        self.start = torch.zeros(length, device=device, dtype=torch.int32)
        self.end = torch.zeros(length, device=device, dtype=torch.int32)
        self.plen = torch.zeros(length, device=device, dtype=torch.int32)
        terms = document_form(case.spec().mask("m").expr).terms
        doc, start, end, plen = self.doc, self.start, self.end, self.plen

        def term_mod(t, qi, ki):
            s, e = start[qi], end[qi]
            keep = ki >= s
            if t.causal:
                keep = keep & (ki <= qi)
            if t.window_causal:
                keep = keep & (ki <= qi) & (qi - ki < t.window_causal)
            if t.window:
                w = torch.clamp(e - s, max=t.window)
                first = s + torch.minimum(torch.clamp(qi - s - w // 2, min=0), e - s - w)
                keep = keep & (ki >= first) & (ki < first + w)
            if t.prefix:
                keep = keep & (ki - s < plen[qi])
            if t.sink_keys:
                keep = keep & (ki - s < t.sink_keys)
            if t.sink_queries:
                keep = keep & (qi - s < t.sink_queries)
            return keep

        def mask_mod(b, h, qi, ki):
            keep = term_mod(terms[0], qi, ki)
            for t in terms[1:]:
                keep = keep | term_mod(t, qi, ki)
            return (doc[qi] == doc[ki]) & keep

        self.mask_mod = mask_mod

    def block_mask(self, offsets, prefix):
        from torch.nn.attention.flex_attention import create_block_mask

        torch.searchsorted(offsets, self.pos, right=True, out=self.doc)
        self.doc -= 1
        torch.index_select(offsets, 0, self.doc, out=self.start)
        torch.index_select(offsets, 0, self.doc + 1, out=self.end)
        if prefix is not None:
            torch.index_select(prefix, 0, self.doc, out=self.plen)
        length = self.case.length
        return create_block_mask(self.mask_mod, None, None, length, length, device=self.device,
                                 _compile=self.compile_mask)


def sdpa_times(case, fn, q, k, v, dout, device_draws, calls) -> dict:
    lay = lambda t: t[0].transpose(0, 1).contiguous()  # noqa: E731 - [1, H, L, D] -> varlen's [L, H, D]
    qs, ks, vs, ds = (lay(t) for t in (q, k, v, dout))
    leaves = [t.detach().clone().requires_grad_() for t in (qs, ks, vs)]
    offsets64 = [off.long() for off, _ in device_draws]
    ours = fn(q, k, v, documents=device_draws[0][0])
    agree = max_relative_error(sdpa_jagged(case, qs, ks, vs, offsets64[0]), lay(ours))

    def fwd(i):
        sdpa_jagged(case, qs, ks, vs, offsets64[i])

    def train(i):
        sdpa_jagged(case, *leaves, offsets64[i]).backward(ds)

    with torch.no_grad():
        f = time_calls(fwd, calls)
    t = time_calls(train, calls)
    return {"forward_ms": f, "train_ms": t, "backward_ms": t - f, "max_diff_to_ours": agree}


def flex_times(case, fn, q, k, v, dout, device_draws, calls, device) -> dict:
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    gqa = case.kv_heads != case.heads

    docs = FlexDocuments(case, device)
    with torch.no_grad():
        agree = max_relative_error(compiled(q, k, v, block_mask=docs.block_mask(*device_draws[0]), enable_gqa=gqa),
                     fn(q, k, v, documents=device_draws[0][0], prefix=device_draws[0][1]))

    def fwd(i):
        block = docs.block_mask(*device_draws[i])
        compiled(q, k, v, block_mask=block, enable_gqa=gqa)

    def train(i):
        block = docs.block_mask(*device_draws[i])
        compiled(*leaves, block_mask=block, enable_gqa=gqa).backward(dout)

    def build(i):
        docs.block_mask(*device_draws[i])

    with torch.no_grad():
        f = time_calls(fwd, calls)
        b = time_calls(build, calls)
    t = time_calls(train, calls)
    return {"forward_ms": f, "train_ms": t, "backward_ms": t - f, "block_mask_build_ms": b,
            "max_diff_to_ours": agree}
