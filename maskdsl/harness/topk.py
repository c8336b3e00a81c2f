"""Dynamic top-k block selection: exact semantics and the float64 reference.

Blocks are boxes of the grid: `block[d]` consecutive coordinates along dimension d, so the grid
is cut into ceil(n_d / block[d]) blocks per dimension (the last along a dimension may be cut short
by the grid; it holds only its valid tokens). Blocks are numbered row-major over that block grid;
on a 1-D layout a block is `block` consecutive tokens. For batch b, head h and query block i:
qbar_i is the mean of the block's query rows, kbar_j the mean of key block j's rows (the kv head
that h uses), score_ij = qbar_i . kbar_j. The query block attends to every key of its k
best-scoring key blocks; ties go to the lower block index; k >= the number of candidate blocks
means all of them. `token_blocks` is the one place that maps tokens to blocks. Rows holding NaN
or inf are left out of the block means (see `pooled`).

Composition. Every mask with one top-k term has the normal form

    mask = S  |  (picked & R)

where S is a static mask (None when empty) and R the static restriction the top-k term is
intersected with (`topk & static`): only key blocks where R attends at least one pair for the
query block are candidates (no pick is wasted on a block that would be masked out), and inside
a picked block R still applies elementwise. `(topk | A) & B` distributes to `(topk & B) | (A & B)`.

Gradients. The selection is piecewise constant in q and k, so it is not differentiated (as in
NSA and MoBA): the backward holds the forward's picks fixed and gives every attended pair its
exact gradient, i.e. the gradient of static attention under the mask those picks produce.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from maskdsl.spec import ir
from maskdsl.spec.topk_form import TopKForm, normal_form  # the rewrite lives with the IR


def block_grid(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """Blocks per dimension: ceil(n_d / block_d)."""
    return tuple(-(-n // b) for n, b in zip(shape, block))


def block_count(shape: tuple[int, ...], block: tuple[int, ...]) -> int:
    return math.prod(block_grid(shape, block))


def token_blocks(shape: tuple[int, ...], block: tuple[int, ...]) -> torch.Tensor:
    """int64 [tokens]: the block of each row-major token (row-major over the block grid)."""
    index = torch.zeros((), dtype=torch.int64)
    for n, b, nb in zip(shape, block, block_grid(shape, block)):
        index = index[..., None] * nb + torch.arange(n) // b
    return index.reshape(-1)


def block_boxes(shape: tuple[int, ...], block: tuple[int, ...]) -> np.ndarray:
    """int64 [blocks, rank, 2]: each block's box (start, stop) per dimension, cut by the grid."""
    per_dim = [[(j * b, min((j + 1) * b, n)) for j in range(nb)]
               for n, b, nb in zip(shape, block, block_grid(shape, block))]
    return np.array(list(itertools.product(*per_dim)), dtype=np.int64).reshape(-1, len(shape), 2)


def candidate_blocks(form: TopKForm, shape: tuple[int, ...]) -> torch.Tensor:
    """Bool [query blocks, key blocks]: where R attends at least one pair (closed form, no [L, L])."""
    from maskdsl.analysis.counts import mask_box_counts

    nb = block_count(shape, form.topk.block)
    if isinstance(form.restrict, ir.Full):
        return torch.ones(nb, nb, dtype=torch.bool)
    boxes = block_boxes(shape, form.topk.block)
    return torch.from_numpy(mask_box_counts(form.restrict, shape, boxes, boxes) > 0)


def pooled(x: torch.Tensor, shape: tuple[int, ...], block: tuple[int, ...]) -> torch.Tensor:
    """Mean of each block's finite rows (only the grid's tokens of a cut block): [B, H, blocks, D] float64.

    Rows holding NaN or inf are left out of the mean: otherwise one such query row would make its
    block's scores NaN and change which key blocks its finite neighbours attend (and one such key
    row would be picked by every query block). A block with no finite row has mean 0.
    """
    b, h, _, d = x.shape
    owner = token_blocks(shape, block).to(x.device)
    nb = block_count(shape, block)
    x64 = x.to(torch.float64)
    finite = torch.isfinite(x64).all(-1, keepdim=True)
    sums = torch.zeros(b, h, nb, d, dtype=torch.float64, device=x.device).index_add_(
        2, owner, torch.where(finite, x64, 0.0))
    counts = torch.zeros(b, h, nb, 1, dtype=torch.float64, device=x.device).index_add_(
        2, owner, finite.to(torch.float64))
    return sums / counts.clamp(min=1.0)


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
    qbar = pooled(q, shape, form.topk.block)
    kbar = pooled(k, shape, form.topk.block).repeat_interleave(group, dim=1)
    scores = qbar @ kbar.transpose(-1, -2)
    cand = candidate_blocks(form, shape).to(scores.device)
    return select_blocks(scores, cand, form.topk.k)


def dynamic_mask(mask: ir.MaskDef, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool [B, H, L, L]: the mask a top-k spec gives for these inputs (small problems only)."""
    from maskdsl.harness.semantics import static_mask

    form = normal_form(mask.expr)
    shape = mask.layout.shape
    picks = reference_picks(q, k, form, shape)  # [B, H, nqb, nkb]
    token_block = token_blocks(shape, form.topk.block).to(picks.device)
    picked = picks[:, :, token_block][:, :, :, token_block]  # [B, H, L, L]
    out = picked & static_mask(form.restrict, shape).to(picks.device)
    if form.static is not None:
        out = out | static_mask(form.static, shape).to(picks.device)
    return out


def rows_mask(mask: ir.MaskDef, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor,
              picks: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, H, len(rows), L]: the given query rows of a top-k mask (picks computed if not given)."""
    from maskdsl.harness.semantics import static_mask

    form = normal_form(mask.expr)
    shape = mask.layout.shape
    if picks is None:
        picks = reference_picks(q, k, form, shape)
    picks = picks.to(q.device)
    rows = rows.to(torch.int64).cpu()
    key_block = token_blocks(shape, form.topk.block).to(q.device)
    keep = picks[:, :, key_block[rows.to(q.device)]][..., key_block]
    keep = keep & static_mask(form.restrict, shape, rows).to(q.device)
    if form.static is not None:
        keep = keep | static_mask(form.static, shape, rows).to(q.device)
    return keep
