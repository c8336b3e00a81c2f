"""How good is a sparse pattern for given inputs: the attention mass it keeps."""

from __future__ import annotations

import math

import torch

from maskdsl.spec import ir


def recall(q: torch.Tensor, k: torch.Tensor, spec: ir.Spec, mask: str, scale: float | None = None,
           rows_per_chunk: int = 1024) -> float:
    """Mean over (batch, head, query) of the full-attention probability mass on the keys the mask keeps.

    1.0 means the pattern loses nothing; use it to pick top-k's k or a window size. Runs in float64
    on q's device, a chunk of query rows at a time (memory O(chunk x L), never [L, L] at once).
    """
    from maskdsl.harness.semantics import static_mask
    from maskdsl.harness.topk import normal_form, reference_picks, rows_mask

    mdef = spec.mask(mask)
    shape, tokens = mdef.layout.shape, mdef.layout.tokens
    if q.shape[2] != tokens or k.shape[2] != tokens:
        raise ValueError(f"q and k must have {tokens} tokens (layout {mdef.layout.name!r}); "
                         f"got {q.shape[2]} and {k.shape[2]}")
    group = q.shape[1] // k.shape[1]
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64).repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    form = normal_form(mdef.expr) if mdef.dynamic else None
    picks = reference_picks(q, k, form, shape).to(q.device) if form else None
    total = 0.0
    for start in range(0, tokens, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, tokens))
        probs = torch.softmax((q64[:, :, rows.to(q.device)] @ k64.transpose(-1, -2)) * scale, dim=-1)
        if form is None:
            keep = static_mask(mdef.expr, shape, rows).to(q.device)
        else:
            keep = rows_mask(mdef, q, k, rows, picks)
        total += (probs * keep).sum().item()
    return total / (q.shape[0] * q.shape[1] * tokens)
