"""The float64 oracle of document masks (maskdsl.spec.documents states the semantics).

Written from the semantics directly, not from the kernels' intervals: every token gets its document
(the last offset at or before it), pairs in different documents are unseen, and the expression inside
`document & ...` is evaluated pair by pair in the document's own coordinates, its length the extent.
Small problems only (it builds the [L, L] mask).
"""

from __future__ import annotations

import torch

from maskdsl.spec import ir
from maskdsl.harness.reference import _attend


def token_documents(offsets, length: int) -> torch.Tensor:
    """int64 [length]: the document of each token (offsets as cu_seqlens, checked by the caller)."""
    offsets = torch.as_tensor(offsets).to(torch.int64).cpu()
    return torch.searchsorted(offsets, torch.arange(length), right=True) - 1


def document_mask(expr: ir.MaskExpr, length: int, offsets, prefix=None, rows=None) -> torch.Tensor:
    """Boolean [L, L] (or [len(rows), L]): query i sees key j."""
    offsets = torch.as_tensor(offsets).to(torch.int64).cpu()
    doc = token_documents(offsets, length)
    queries = torch.arange(length) if rows is None else torch.as_tensor(rows).to(torch.int64).cpu()
    qd, kd = doc[queries].view(-1, 1), doc.view(1, -1)
    start, end = offsets[:-1], offsets[1:]
    qi = queries.view(-1, 1) - start[qd]  # local coordinates
    kj = torch.arange(length).view(1, -1) - start[kd]
    n = (end - start)[qd]
    plen = torch.zeros(len(start), dtype=torch.int64) if prefix is None else torch.as_tensor(prefix).to(torch.int64).cpu()
    return (qd == kd) & _local(expr, qi, kj, n, plen[qd])


def _local(expr, i, j, n, plen):
    """Whether local query i sees local key j in a document of n tokens with a prefix of plen (broadcasting)."""
    if isinstance(expr, (ir.Document, ir.Full)):
        return (i >= 0) & (j >= 0)
    if isinstance(expr, ir.Causal):
        return j <= i
    if isinstance(expr, ir.Prefix):
        return (j < plen) & (i >= 0)
    if isinstance(expr, ir.Sink):
        return (i < expr.n) | (j < expr.n)
    if isinstance(expr, ir.Neighborhood):  # 1-D, no stride or dilation (the form refuses them)
        w = expr.window[0]
        if expr.causal[0]:
            return (j <= i) & (i - j < w)
        w = torch.minimum(torch.full_like(n, w), n)  # wider than the document: the whole document
        first = torch.minimum(torch.clamp(i - w // 2, min=0), n - w)
        return (j >= first) & (j < first + w)
    if isinstance(expr, (ir.Union_, ir.Intersection)):
        parts = [_local(t, i, j, n, plen) for t in expr.terms]
        out = parts[0]
        for p in parts[1:]:
            out = (out | p) if isinstance(expr, ir.Union_) else (out & p)
        return out
    raise ValueError(f"{expr.fmt()} has no meaning inside documents")


def reference_document_attention(q, k, v, spec: ir.Spec, mask_name: str, documents, prefix=None,
                                 scale: float | None = None, return_lse: bool = False, rows=None):
    """softmax(q k^T * scale, document mask) v in float64 (rows that see nothing: 0 and LSE -inf).

    With `rows` only those query rows (q still holds all of them): [B, H, len(rows), D].
    """
    mdef = spec.mask(mask_name)
    length = mdef.layout.tokens
    mask = document_mask(mdef.expr, length, documents, prefix, rows)
    qr = q if rows is None else q[:, :, torch.as_tensor(rows).to(q.device)]
    return _attend(qr.cpu(), k.cpu(), v.cpu(), mask, scale, return_lse)
