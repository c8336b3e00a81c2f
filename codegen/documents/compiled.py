"""A compiled document mask: `fn(q, k, v, documents=offsets[, prefix=lengths])`, a PyTorch custom op that trains.

Per call: the per-token document metadata (start, end, prefix length) is derived on the device from the
offsets (`metadata`: one searchsorted and three gathers, no host synchronisation), then three kernels
forward and three backward run on it. Every launch argument that depends on the offsets is a tensor, so
no call compiles anything new (`kernel_args` is the one place the launches are bound: the recompile test
binds it with the real JIT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from maskdsl.codegen import dispatch
from maskdsl.codegen.checks import check_call, check_out_lse, check_qkv
from maskdsl.codegen.documents import backward, checks, forward
from maskdsl.codegen.documents.intervals import INACTIVE
from maskdsl.spec import ir
from maskdsl.spec.documents import MAX_TERMS, document_form
from maskdsl.spec.limits import padded_head_dim

_REGISTRY: dict[str, "CompiledDocumentAttention"] = {}


@dataclass(frozen=True)
class DocumentConfig:
    """Tiles and launch knobs of the three kernel kinds (forward, dK/dV, dQ): (block_m, block_n, warps, stages)."""

    forward: tuple[int, int, int, int] = (128, 64, 8, 3)
    dkdv: tuple[int, int, int, int] = (32, 128, 8, 2)  # 64-row query tiles spill dK/dV at head_dim 128 (ptxas)
    dq: tuple[int, int, int, int] = (128, 64, 8, 2)

    def key(self) -> str:
        return "_".join("x".join(map(str, part)) for part in (self.forward, self.dkdv, self.dq))

    def validate(self) -> "DocumentConfig":
        for name in ("forward", "dkdv", "dq"):
            part = getattr(self, name)
            if len(part) != 4 or not all(isinstance(x, int) and x > 0 for x in part) or \
                    any(b < 16 or b & (b - 1) for b in part[:2]):
                raise ValueError(f"DocumentConfig.{name} must be (block_m, block_n, warps, stages) with power-of-two "
                                 f"blocks of at least 16, got {part!r}")
        return self


def constexpr_terms(mask: ir.MaskDef) -> tuple:
    """The form's terms as the kernels' four constexpr tuples (inactive ones padded in)."""
    terms = [(1, *t.as_tuple()) for t in document_form(mask.expr, mask.layout.shape).terms]
    terms += [INACTIVE] * (MAX_TERMS - len(terms))
    return tuple(tuple(tl.constexpr(x) for x in t) for t in terms)


def metadata(documents: torch.Tensor, prefix: torch.Tensor | None, length: int, inner: int = 1) -> torch.Tensor:
    """int32 [3, L]: each token's document start, end (tokens) and prefix length, on the offsets' device, no
    sync. `documents` counts frames of `inner` tokens (tokens on a 1-D layout); offsets are clamped to the
    frames first, so any offsets give starts and ends that are whole frames inside [0, L]."""
    frames = length // inner
    bounds = documents.clamp(0, frames)
    pos = torch.arange(length, device=documents.device, dtype=torch.int32)
    if inner > 1:
        pos = pos // inner
    doc = torch.searchsorted(bounds, pos, right=True, out_int32=True) - 1
    doc = doc.clamp_(0, documents.numel() - 2)
    meta = torch.empty(3, length, device=documents.device, dtype=torch.int32)
    torch.index_select(bounds, 0, doc, out=meta[0])
    torch.index_select(bounds, 0, doc + 1, out=meta[1])
    if inner > 1:
        meta[:2] *= inner
    if prefix is None:
        meta[2].zero_()
    else:
        torch.index_select(prefix, 0, doc, out=meta[2])
    return meta


class CompiledDocumentAttention:
    """`fn(q, k, v, documents=offsets, prefix=None, scale=None, return_lse=False, check_documents=True)`.

    q is [B, H, L, D], k and v [B, H_kv, L, D] with L the layout's tokens; `documents` int32 [D + 1] on
    q's device (cu_seqlens: 0, l1, l1 + l2, ..., T, in frames of dimension 0: tokens on a 1-D layout;
    repeated offsets are empty documents); `prefix` int32 [D] (tokens) for masks with `prefix`. The
    offsets' values are checked unless `check_documents=False`.
    """

    def __init__(self, mask: ir.MaskDef, config: DocumentConfig | None = None):
        self.mask = mask
        self.form = document_form(mask.expr, mask.layout.shape)
        self.terms = constexpr_terms(mask)
        if config is not None and not isinstance(config, DocumentConfig):
            raise ValueError(f"mask {mask.name!r} holds `document`: its kernels (codegen/documents/) are not rendered "
                             f"from a tile config ({type(config).__name__}); pass a DocumentConfig or None. "
                             "`maskdsl bench --documents` measures such masks, `maskdsl simulate --lengths` "
                             "predicts them")
        self.config = (config or DocumentConfig()).validate()
        self.length = mask.layout.tokens
        self.frames = mask.layout.shape[0]  # what the offsets count: frames of dimension 0 (tokens on 1-D)
        self.inner = self.length // self.frames
        self.key = f"documents:{mask.content_hash()}:{self.config.key()}"
        _REGISTRY[self.key] = self

    def __repr__(self) -> str:
        return f"CompiledDocumentAttention({self.mask.name} = {self.mask.expr.fmt()}, {self.config.key()})"

    def __call__(self, q, k, v, documents=None, prefix=None, scale: float | None = None, return_lse: bool = False,
                 check_documents: bool = True, out=None):
        check_qkv(q, k, v, self.length, self.mask.layout.name, True)
        check_call(q, k, scale)
        checks.check_metadata(documents, prefix, q, self.frames, self.form.uses_prefix, self.mask.name)
        if check_documents:
            checks.check_values(documents, prefix, self.frames, self.inner)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        if out is not None:  # writes into a caller's buffer (tests poison it first)
            lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
            self.launch(q, k, v, scale, out, lse, metadata(documents, prefix, self.length, self.inner))
            return (out, lse) if return_lse else out
        o, lse = torch.ops.maskdsl.document_attention(q, k, v, documents, prefix, self.key, scale)
        return (o, lse) if return_lse else o

    def _common(self, q) -> dict:
        return {"T0": self.terms[0], "T1": self.terms[1], "T2": self.terms[2], "T3": self.terms[3],
                "NT": len(self.form.terms), "INNER": self.inner,
                "HEAD_DIM": q.shape[-1], "HEAD_DIM_PAD": padded_head_dim(q.shape[-1]),
                "DOT_F32": q.dtype == torch.bfloat16 and dispatch.interpreting()}

    def kernel_args(self, kind: str, q, k, v, scale: float, meta, out=None, lse=None, dout=None, delta=None,
                    dq=None, dk=None, dv=None, counts=None):
        """(kernel, grid, args, kwargs) of one launch: `kind` is forward, delta, dkdv or dq. `counts` (int32
        [programs, 2], forward and dkdv only) receives the (full, partial) tiles each program visits."""
        batch, heads, length = q.shape[:3]
        kv_heads = k.shape[1]
        group = heads // kv_heads
        log2e = 1.4426950408889634
        strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3]]
        if kind == "forward":
            bm, bn, warps, stages = self.config.forward
            grid = (triton.cdiv(length, bm), batch * heads)
            args = (q, k, v, out, lse, meta, counts, length, scale * log2e, *strides, *out.stride()[:3], heads, group)
            return forward.document_fwd, grid, args, {**self._common(q), "BLOCK_M": bm, "BLOCK_N": bn,
                                                      "num_warps": warps, "num_stages": stages,
                                                      "COUNT": counts is not None}
        if kind == "delta":
            bm = 64
            grid = (triton.cdiv(length, bm), batch * heads)
            args = (out, dout, delta, length, *out.stride()[:3], *dout.stride()[:3], heads)
            return backward.document_delta, grid, args, {"HEAD_DIM": q.shape[-1],
                                                         "HEAD_DIM_PAD": padded_head_dim(q.shape[-1]), "BLOCK_M": bm}
        if kind == "dkdv":
            bm, bn, warps, stages = self.config.dkdv
            grid = (triton.cdiv(length, bn), batch * kv_heads)
            args = (q, k, v, dout, lse, delta, dk, dv, meta, counts, length, scale * log2e, scale, *strides,
                    *dout.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], heads, kv_heads, group)
            return backward.document_dkdv, grid, args, {**self._common(q), "BLOCK_M": bm, "BLOCK_N": bn,
                                                        "num_warps": warps, "num_stages": stages,
                                                        "COUNT": counts is not None}
        if kind == "dq":
            bm, bn, warps, stages = self.config.dq
            grid = (triton.cdiv(length, bm), batch * heads)
            args = (q, k, v, dout, lse, delta, dq, meta, length, scale * log2e, scale, *strides,
                    *dout.stride()[:3], *dq.stride()[:3], heads, group)
            return backward.document_dq, grid, args, {**self._common(q), "BLOCK_M": bm, "BLOCK_N": bn,
                                                      "num_warps": warps, "num_stages": stages}
        raise ValueError(f"unknown kernel kind {kind!r}")

    def launch(self, q, k, v, scale: float, out, lse, meta) -> None:
        check_out_lse(q, out, lse)
        kernel, grid, args, kwargs = self.kernel_args("forward", q, k, v, scale, meta, out=out, lse=lse)
        kernel[grid](*args, **kwargs)

    def launch_backward(self, q, k, v, out, lse, dout, scale: float, dq, dk, dv, meta) -> None:
        """dq, dk, dv (pre-allocated like q, k, v) <- the gradients for dout; `lse` is the forward's."""
        lse = lse.contiguous()
        delta = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        for kind in ("delta", "dkdv", "dq"):
            kernel, grid, args, kwargs = self.kernel_args(kind, q, k, v, scale, meta, out=out, lse=lse, dout=dout,
                                                          delta=delta, dq=dq, dk=dk, dv=dv)
            kernel[grid](*args, **kwargs)


@torch.library.custom_op("maskdsl::document_attention", mutates_args=())
def _document_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: torch.Tensor,
                 prefix: torch.Tensor | None, key: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _REGISTRY[key]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    fn.launch(q, k, v, scale, out, lse, metadata(documents, prefix, fn.length, fn.inner))
    return out, lse


@_document_op.register_fake
def _(q, k, v, documents, prefix, key, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("maskdsl::document_attention_backward", mutates_args=())
def _document_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          dout: torch.Tensor, documents: torch.Tensor, prefix: torch.Tensor | None, key: str,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if dout.stride(-1) != 1:  # autograd may hand an expanded gradient (stride 0)
        dout = dout.contiguous()
    fn = _REGISTRY[key]
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    fn.launch_backward(q, k, v, out, lse, dout, scale, dq, dk, dv, metadata(documents, prefix, fn.length, fn.inner))
    return dq, dk, dv


@_document_backward_op.register_fake
def _(q, k, v, out, lse, dout, documents, prefix, key, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, documents, prefix, key, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, documents, prefix)
    ctx.key, ctx.scale = key, scale
    ctx.mark_non_differentiable(lse)


def _document_grad(ctx, dout, _dlse):
    q, k, v, out, lse, documents, prefix = ctx.saved_tensors
    dq, dk, dv = torch.ops.maskdsl.document_attention_backward(q, k, v, out, lse, dout, documents, prefix,
                                                               ctx.key, ctx.scale)
    return dq, dk, dv, None, None, None, None


_document_op.register_autograd(_document_grad, setup_context=_setup_context)
