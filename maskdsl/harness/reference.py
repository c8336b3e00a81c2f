"""Reference attention in float64 from the materialized mask: the oracle for every kernel test.

Small problems only (it builds the [Lq, Lk] mask and the [B, H, Lq, Lk] scores).
"""

from __future__ import annotations

import math

import torch

from maskdsl.spec import ir
from maskdsl.harness.semantics import static_mask


def _mask_def(spec: ir.Spec, mask_name: str) -> ir.MaskDef:
    return spec.mask(mask_name)


def reference_mask(spec: ir.Spec, mask_name: str, q: torch.Tensor | None = None,
                   k: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [Lq, Lk] over row-major token order: True where the query attends to the key.

    A mask with a top-k term depends on the data: pass q [B, H, L, D] and k [B, H_kv, L, D]
    and get [B, H, Lq, Lk] (maskdsl.harness.topk states the rule).
    """
    mask = _mask_def(spec, mask_name)
    if mask.dynamic:
        if q is None or k is None:
            raise ValueError(f"mask {mask_name!r} has a top-k term and depends on the data: pass q and k")
        from maskdsl.harness.topk import dynamic_mask

        return dynamic_mask(mask, q.detach().cpu(), k.detach().cpu())
    return static_mask(mask.expr, mask.layout.shape)


def reference_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ir.Spec, mask_name: str,
                             rows: torch.Tensor, scale: float | None = None, return_lse: bool = False):
    """The reference for a subset of query rows only: [B, H, len(rows), D] in float64.

    Builds just those rows of the mask, so real sizes (115,200 tokens) can be spot-checked.
    """
    mask_def = _mask_def(spec, mask_name)
    rows = rows.to(torch.int64).cpu()
    if mask_def.dynamic:
        from maskdsl.harness.topk import rows_mask

        mask = rows_mask(mask_def, q, k, rows)
    else:
        mask = static_mask(mask_def.expr, mask_def.layout.shape, rows).to(q.device)
    return _attend(q[:, :, rows.to(q.device)], k, v, mask, scale, return_lse)


def reference_attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ir.Spec, mask_name: str,
                              rows: torch.Tensor, keys: torch.Tensor, scale: float | None = None,
                              return_lse: bool = False):
    """The reference of some query rows over some keys only, in float64: q holds the `rows` (flat
    token indices) and k, v the `keys`, the mask is the grid's restricted to them. What one segment
    of a sharded grid computes (codegen.segment); a row with no key among them gives 0 and LSE -inf.
    """
    mask_def = _mask_def(spec, mask_name)
    if mask_def.dynamic:
        raise ValueError(f"mask {mask_name!r} has a top-k term: its reference needs every key (reference_attention)")
    rows, keys = rows.to(torch.int64).cpu(), keys.to(torch.int64).cpu()
    mask = static_mask(mask_def.expr, mask_def.layout.shape, rows)[:, keys]
    return _attend(q, k, v, mask.to(q.device), scale, return_lse)


def _attend(q, k, v, mask, scale, return_lse):
    """Masked softmax attention in float64 on q's device; GQA by repeating kv heads; empty rows give 0.

    Differentiable: torch.autograd through it gives the reference gradients (empty rows: zero, not NaN).
    """
    group = q.shape[1] // k.shape[1]
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64).repeat_interleave(group, dim=1)
    v64 = v.to(torch.float64).repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q64 @ k64.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp(min=torch.finfo(torch.float64).min))
    out = probs @ v64
    return (out, lse) if return_lse else out


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ir.Spec, mask_name: str,
                        scale: float | None = None, return_lse: bool = False):
    """softmax(q k^T * scale, masked) v in float64; rows that see no key give 0 (and LSE -inf).

    q: [B, H, L, D]; k, v: [B, H_kv, L, D] with H_kv dividing H (query head h uses kv head h // (H/H_kv)).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim or heads % kv_heads:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={batch}, H_kv, L, D={dim}] "
                         f"with H_kv dividing H={heads}")
    mask = reference_mask(spec, mask_name, q, k)
    if mask.shape[-2:] != (length, k.shape[2]):
        raise ValueError(f"the mask covers {mask.shape[-2]} query and {mask.shape[-1]} key tokens, "
                         f"but q has {length} and k has {k.shape[2]}")
    return _attend(q.cpu(), k.cpu(), v.cpu(), mask, scale, return_lse)
