"""Dynamic top-k block selection: exact semantics and the float64 reference.

Tokens are cut into blocks of `block` consecutive tokens in row-major order (the last may be
shorter). For batch b, head h and query block i: qbar_i is the mean of the block's query rows,
kbar_j the mean of key block j's rows (the kv head that h uses), score_ij = qbar_i . kbar_j.
Rows holding NaN or inf are left out of these means (see `pooled`).
The query block attends to every key of its k best-scoring key blocks; ties go to the lower
block index; k >= the number of candidate blocks means all of them.

Composition. Every mask with one top-k term has the normal form

    mask = S  |  (picked & R)

where S is a static mask (None when empty) and R the static restriction the top-k term is
intersected with (`topk & static`): only key blocks where R attends at least one pair for the
query block are candidates (no pick is wasted on a block that would be masked out), and inside
a picked block R still applies elementwise. `(topk | A) & B` distributes to `(topk & B) | (A & B)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from maskdsl import ir


@dataclass(frozen=True)
class TopKForm:
    topk: ir.TopK
    static: ir.MaskExpr | None  # S
    restrict: ir.MaskExpr  # R (Full when unrestricted)


def normal_form(expr: ir.MaskExpr) -> TopKForm:
    """Rewrite a mask with exactly one top-k term as S | (picked & R)."""
    if isinstance(expr, ir.TopK):
        return TopKForm(expr, None, ir.Full())
    if isinstance(expr, ir.Union_):
        dyn = [t for t in expr.terms if ir.is_dynamic(t)]
        if len(dyn) != 1:
            raise ValueError("a mask may hold one top-k term; combine several selections into one topk(...)")
        inner = normal_form(dyn[0])
        static = [t for t in expr.terms if not ir.is_dynamic(t)] + ([inner.static] if inner.static else [])
        return TopKForm(inner.topk, ir.union(*static), inner.restrict)
    if isinstance(expr, ir.Intersection):
        dyn = [t for t in expr.terms if ir.is_dynamic(t)]
        if len(dyn) != 1:
            raise ValueError("a mask may hold one top-k term; combine several selections into one topk(...)")
        inner = normal_form(dyn[0])
        others = [t for t in expr.terms if not ir.is_dynamic(t)]
        static = ir.intersection(inner.static, *others) if inner.static else None
        restrict = ir.intersection(*([inner.restrict] if not isinstance(inner.restrict, ir.Full) else []), *others)
        return TopKForm(inner.topk, static, restrict)
    raise ValueError(f"{expr.fmt()} has no top-k term")


def block_count(tokens: int, block: int) -> int:
    return math.ceil(tokens / block)


def candidate_blocks(form: TopKForm, shape: tuple[int, ...]) -> torch.Tensor:
    """Bool [query blocks, key blocks]: where R attends at least one pair (closed form, no [L, L])."""
    from maskdsl.analysis import mask_box_counts

    tokens = math.prod(shape)
    nb = block_count(tokens, form.topk.block)
    if isinstance(form.restrict, ir.Full):
        return torch.ones(nb, nb, dtype=torch.bool)
    boxes, owner = flat_range_boxes(shape, form.topk.block)
    counts = mask_box_counts(form.restrict, shape, boxes, boxes)
    per_block = np.zeros((nb, nb), dtype=np.int64)
    np.add.at(per_block, (owner[:, None], owner[None, :]), counts)
    return torch.from_numpy(per_block > 0)


def flat_range_boxes(shape: tuple[int, ...], size: int):
    """Boxes ([N, rank, 2]) covering consecutive row-major ranges of `size` tokens, and each box's range index."""
    tokens = math.prod(shape)
    boxes, owner = [], []
    for r, start in enumerate(range(0, tokens, size)):
        for box in _range_to_boxes(shape, start, min(start + size, tokens)):
            boxes.append(box)
            owner.append(r)
    return np.array(boxes, dtype=np.int64).reshape(-1, len(shape), 2), np.array(owner)


def _range_to_boxes(shape, start, stop):
    """Split the flat range [start, stop) of a row-major grid into disjoint boxes."""
    if start >= stop:
        return []
    if len(shape) == 1:
        return [[(start, stop)]]
    inner = math.prod(shape[1:])
    r0, r1 = start // inner, (stop - 1) // inner
    if r0 == r1:
        return [[(r0, r0 + 1)] + b for b in _range_to_boxes(shape[1:], start - r0 * inner, stop - r0 * inner)]
    out = []
    if start % inner:
        out += [[(r0, r0 + 1)] + b for b in _range_to_boxes(shape[1:], start - r0 * inner, inner)]
        r0 += 1
    full_stop = r1 if stop % inner else r1 + 1
    if full_stop > r0:
        out.append([(r0, full_stop)] + [(0, n) for n in shape[1:]])
    if stop % inner:
        out += [[(r1, r1 + 1)] + b for b in _range_to_boxes(shape[1:], 0, stop - r1 * inner)]
    return out


def pooled(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block's finite rows (the last block may be shorter): [B, H, blocks, D] float64.

    Rows holding NaN or inf are left out of the mean: otherwise one such query row would make its
    block's scores NaN and change which key blocks its finite neighbours attend (and one such key
    row would be picked by every query block). A block with no finite row has mean 0.
    """
    b, h, tokens, d = x.shape
    nb = block_count(tokens, block)
    x64 = x.to(torch.float64)
    finite = torch.isfinite(x64).all(-1, keepdim=True)
    padded = torch.zeros(b, h, nb * block, d, dtype=torch.float64, device=x.device)
    padded[:, :, :tokens] = torch.where(finite, x64, 0.0)
    count = torch.zeros(b, h, nb * block, 1, dtype=torch.float64, device=x.device)
    count[:, :, :tokens] = finite.to(torch.float64)
    return padded.view(b, h, nb, block, d).sum(3) / count.view(b, h, nb, block, 1).sum(3).clamp(min=1.0)


def select_blocks(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [B, H, nqb, nkb]: the k best candidates per query block; ties go to the lower block index."""
    masked = scores.masked_fill(~candidates, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices  # stable: lower index first on ties
    keep = order[..., :k]
    picked = torch.zeros_like(masked, dtype=torch.bool).scatter_(-1, keep, True)
    return picked & candidates


def reference_picks(q: torch.Tensor, k: torch.Tensor, form: TopKForm, shape) -> torch.Tensor:
    """Bool [B, H, nqb, nkb] of picked key blocks, in float64, exactly as the semantics say."""
    group = q.shape[1] // k.shape[1]
    qbar = pooled(q, form.topk.block)
    kbar = pooled(k, form.topk.block).repeat_interleave(group, dim=1)
    scores = qbar @ kbar.transpose(-1, -2)
    cand = candidate_blocks(form, shape).to(scores.device)
    return select_blocks(scores, cand, form.topk.k)


def dynamic_mask(mask: ir.MaskDef, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool [B, H, L, L]: the mask a top-k spec gives for these inputs (small problems only)."""
    from maskdsl.semantics import static_mask

    form = normal_form(mask.expr)
    shape = mask.layout.shape
    tokens = mask.layout.tokens
    picks = reference_picks(q, k, form, shape)  # [B, H, nqb, nkb]
    blk = form.topk.block
    token_block = torch.arange(tokens, device=picks.device) // blk
    picked = picks[:, :, token_block][:, :, :, token_block]  # [B, H, L, L]
    out = picked & static_mask(form.restrict, shape).to(picks.device)
    if form.static is not None:
        out = out | static_mask(form.static, shape).to(picks.device)
    return out


def rows_mask(mask: ir.MaskDef, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor,
              picks: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, H, len(rows), L]: the given query rows of a top-k mask (picks computed if not given)."""
    from maskdsl.semantics import static_mask

    form = normal_form(mask.expr)
    shape, tokens = mask.layout.shape, mask.layout.tokens
    if picks is None:
        picks = reference_picks(q, k, form, shape)
    picks = picks.to(q.device)
    rows = rows.to(torch.int64).cpu()
    blk = form.topk.block
    key_block = torch.arange(tokens, device=q.device) // blk
    keep = picks[:, :, (rows // blk).to(q.device)][..., key_block]
    keep = keep & static_mask(form.restrict, shape, rows).to(q.device)
    if form.static is not None:
        keep = keep | static_mask(form.static, shape, rows).to(q.device)
    return keep
