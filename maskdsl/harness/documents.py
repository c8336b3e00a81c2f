"""The float64 oracle of document masks (maskdsl.spec.documents states the semantics).

Written from the semantics directly, not from the kernels' intervals: every frame (dimension 0; a token
on a 1-D layout) gets its document (the last offset at or before it), pairs in different documents are
unseen, and the expression inside `document & ...` is evaluated pair by pair in the document's own
coordinates: frames counted from the document's first, the document's frames the extent of dimension 0,
the other dimensions as they are, tokens counted from the document's first. Small problems only (it
builds the [L, L] mask). It is more general than the kernels: any 1-D neighborhood per dimension.
"""

from __future__ import annotations

import math

import torch

from maskdsl.spec import ir
from maskdsl.harness.reference import _attend
from maskdsl.harness.semantics import flat_coords, neighborhood_rule


def token_documents(offsets, shape) -> torch.Tensor:
    """int64 [tokens]: the document of each token (offsets in frames of dimension 0, as cu_seqlens)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    inner = math.prod(shape[1:])
    offsets = torch.as_tensor(offsets).to(torch.int64).cpu()
    frames = torch.arange(math.prod(shape)) // inner
    return torch.searchsorted(offsets, frames, right=True) - 1


def document_mask(expr: ir.MaskExpr, shape, offsets, prefix=None, rows=None) -> torch.Tensor:
    """Boolean [L, L] (or [len(rows), L]): query i sees key j. `shape` is the layout's (an int: 1-D)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    tokens, inner = math.prod(shape), math.prod(shape[1:])
    offsets = torch.as_tensor(offsets).to(torch.int64).cpu()
    doc = token_documents(offsets, shape)
    queries = torch.arange(tokens) if rows is None else torch.as_tensor(rows).to(torch.int64).cpu()
    keys = torch.arange(tokens)
    qd, kd = doc[queries].view(-1, 1), doc.view(1, -1)
    first = offsets[:-1]  # each document's first frame
    frames = (offsets[1:] - first)[qd]
    plen = torch.zeros(len(first), dtype=torch.int64) if prefix is None else \
        torch.as_tensor(prefix).to(torch.int64).cpu()
    qc, kc = flat_coords(shape, queries.view(-1, 1)), flat_coords(shape, keys.view(1, -1))
    qc[0], kc[0] = qc[0] - first[qd], kc[0] - first[kd]  # local frames
    local = (queries.view(-1, 1) - first[qd] * inner, keys.view(1, -1) - first[kd] * inner)  # local tokens
    return (qd == kd) & _local(expr, shape, qc, kc, frames, local, plen[qd])


def _local(expr, shape, qc, kc, frames, local, plen):
    """Whether the query at local coordinates qc sees the key at kc, in a document of `frames` frames."""
    i, j = local
    if isinstance(expr, (ir.Document, ir.Full)):
        return (i >= 0) & (j >= 0)
    if isinstance(expr, ir.Causal):
        return j <= i
    if isinstance(expr, ir.Prefix):
        return (j < plen) & (i >= 0)
    if isinstance(expr, ir.Sink):
        return (i < expr.n) | (j < expr.n)
    if isinstance(expr, ir.Neighborhood):
        out = None
        for d, n in enumerate(shape):
            w = expr.window[d]
            if d == 0:  # the document's frames are the extent; a wider window sees all of them
                n = frames
                w = torch.minimum(torch.full_like(frames, w), frames)
            m = _rule(qc[d], kc[d], n, w, expr.dilation[d], expr.stride[d], expr.causal[d])
            out = m if out is None else out & m
        return out
    if isinstance(expr, (ir.Union_, ir.Intersection)):
        parts = [_local(t, shape, qc, kc, frames, local, plen) for t in expr.terms]
        out = parts[0]
        for p in parts[1:]:
            out = (out | p) if isinstance(expr, ir.Union_) else (out & p)
        return out
    raise ValueError(f"{expr.fmt()} has no meaning inside documents")


def _rule(i, j, n, w, dilation, stride, causal):
    """NATTEN's rule (maskdsl.harness.semantics.neighborhood_rule) with a window that may be a tensor."""
    if isinstance(w, int):
        return neighborhood_rule(i, j, n, w, dilation, stride, causal)
    if dilation != 1 or stride != 1:
        raise ValueError("inside documents a window along dimension 0 clamps to each document only without "
                         "stride or dilation")
    if causal:
        return (j <= i) & (i - j < w)
    first = torch.minimum(torch.clamp(i - w // 2, min=0), n - w)
    return (j >= first) & (j < first + w)


def reference_document_attention(q, k, v, spec: ir.Spec, mask_name: str, documents, prefix=None,
                                 scale: float | None = None, return_lse: bool = False, rows=None):
    """softmax(q k^T * scale, document mask) v in float64 (rows that see nothing: 0 and LSE -inf).

    With `rows` only those query rows (q still holds all of them): [B, H, len(rows), D].
    """
    mdef = spec.mask(mask_name)
    mask = document_mask(mdef.expr, mdef.layout.shape, documents, prefix, rows)
    qr = q if rows is None else q[:, :, torch.as_tensor(rows).to(q.device)]
    return _attend(qr.cpu(), k.cpu(), v.cpu(), mask, scale, return_lse)
