"""The decode reference for masks with a top-k term, in float64: what `fn.decode` computes (docs/SERVING.md).

A static mask needs no reference of its own at decode time: a new token's row is its row of the
whole sequence (maskdsl.harness.reference), and the tests compare with that. A top-k selection does:
a query block's mean (maskdsl.harness.topk) takes all of its queries, and at decode time the later
ones do not exist yet. Decode selects for the new tokens of each sequence, at positions
length - q_len .. length - 1 of the grid, over the keys in its cache (positions < length):

* qbar = the mean of the new queries' finite rows (per batch and head);
* kbar_j = the mean of key block j's cached finite rows (the kv head the query head uses); a block
  with no cached key is not a candidate;
* candidates: the key blocks where R attends at least one (new row, cached key) pair; the k best by
  qbar . kbar_j are picked, ties to the lower block index (maskdsl.harness.topk.select_blocks);
* a new row at position p attends cached key t iff S(p, t) or (t's block is picked and R(p, t)).

When the new tokens are one whole query block and the cache ends with it, this is the whole
sequence's selection for that block exactly (for a causal R every candidate key block is complete):
the tests check both.
"""

from __future__ import annotations

import math

import torch

from maskdsl.harness.semantics import static_mask
from maskdsl.harness.topk import block_count, normal_form, select_blocks, token_blocks
from maskdsl.spec import ir


def _finite_mean(x: torch.Tensor, owner: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([..., count, D] mean of each owner's finite rows, [..., count] how many), float64; x [..., N, D]."""
    x64 = x.to(torch.float64)
    finite = torch.isfinite(x64).all(-1, keepdim=True)
    shape = (*x.shape[:-2], count, x.shape[-1])
    sums = torch.zeros(shape, dtype=torch.float64).index_add_(-2, owner, torch.where(finite, x64, 0.0))
    counts = torch.zeros((*x.shape[:-2], count, 1), dtype=torch.float64).index_add_(-2, owner,
                                                                                 finite.to(torch.float64))
    return sums / counts.clamp(min=1.0), counts[..., 0]


def decode_picks(q: torch.Tensor, k: torch.Tensor, spec: ir.Spec, mask_name: str, length: int) -> torch.Tensor:
    """Bool [H, key blocks]: the blocks one sequence's new tokens pick. q [H, q_len, D] (the new queries),
    k [H_kv, >= length, D] (the sequence's keys; only the first `length` are cached)."""
    mask = spec.mask(mask_name)
    form = normal_form(mask.expr)
    shape = tuple(mask.layout.shape)
    nkb = block_count(shape, form.topk.block)
    owner = token_blocks(shape, form.topk.block)[:length]
    q_len = q.shape[1]
    qbar = _finite_mean(q.cpu(), torch.zeros(q_len, dtype=torch.int64), 1)[0][:, 0]  # [H, D]
    kbar, cached = _finite_mean(k[:, :length].cpu(), owner, nkb)  # [H_kv, nkb, D], [H_kv, nkb]
    group = q.shape[0] // k.shape[0]
    scores = qbar[:, None, :].mul(kbar.repeat_interleave(group, 0)).sum(-1)  # [H, nkb]
    rows = torch.arange(length - q_len, length)
    pairs = static_mask(form.restrict, shape, rows)[:, :length].any(0)  # [length]: keys R gives some new row
    candidates = torch.zeros(nkb, dtype=torch.bool).index_fill_(0, owner[pairs], True)
    candidates = candidates & (torch.zeros(nkb, dtype=torch.int64).index_add_(0, owner, torch.ones_like(owner)) > 0)
    return select_blocks(scores[None], candidates[None, None], form.topk.k)[0]


def decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ir.Spec, mask_name: str,
                     lengths, scale: float | None = None, return_lse: bool = False):
    """[B, H, q_len, D] float64 (and LSE [B, H, q_len]): the new tokens q [B, H, q_len, D] against the first
    lengths[b] keys of k, v [B, H_kv, >= max(lengths), D], with the decode selection (module docstring)."""
    mask = spec.mask(mask_name)
    form = normal_form(mask.expr)
    shape = tuple(mask.layout.shape)
    owner = token_blocks(shape, form.topk.block)
    b, h, q_len, d = q.shape
    group = h // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    outs, lses = [], []
    for i, n in enumerate(int(x) for x in lengths):
        picks = decode_picks(q[i], k[i], spec, mask_name, n)  # [H, nkb]
        rows = torch.arange(n - q_len, n)
        seen = picks[:, owner[:n]][:, None, :] & static_mask(form.restrict, shape, rows)[None, :, :n]
        if form.static is not None:
            seen = seen | static_mask(form.static, shape, rows)[None, :, :n]
        q64 = q[i].cpu().to(torch.float64)
        k64 = k[i, :, :n].cpu().to(torch.float64).repeat_interleave(group, 0)
        v64 = v[i, :, :n].cpu().to(torch.float64).repeat_interleave(group, 0)
        scores = (q64 @ k64.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
        lse = torch.logsumexp(scores, -1)
        probs = torch.exp(scores - lse[..., None].clamp(min=torch.finfo(torch.float64).min))
        outs.append(probs @ v64)
        lses.append(lse)
    out, lse = torch.stack(outs), torch.stack(lses)
    return (out, lse) if return_lse else out
