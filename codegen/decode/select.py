"""Top-k at decode time: the key blocks the new tokens pick, on the device, without a sync.

The rule is maskdsl/harness/decode.py's (docs/SERVING.md): the mean of the new queries against the
mean of each key block's cached keys, over the blocks where R gives a new row a cached key, the k
best per head, ties to the lower block. This runs it with torch on the call's device in float32: it
reads every cached key once (the block means), which is the part of a top-k step that is not sparse;
the attention then reads the static part's intervals and the picked blocks only.

The kernel takes (`picked`, `plist`): int8 [B, H, blocks], which blocks each query head picked, and
int32 [B, H_kv, n_picks], their union over the GQA group in block order (-1 past the last), which the
kernel's programs walk (`codegen.decode.kernel._attend_picks`).
"""

from __future__ import annotations

import torch

from maskdsl.harness.semantics import attends, flat_coords
from maskdsl.harness.topk import block_count, token_blocks
from maskdsl.spec import ir
from maskdsl.spec.topk_form import normal_form


class DecodeSelection:
    """The selection of one top-k mask; `picks(...)` per call."""

    def __init__(self, mask: ir.MaskDef):
        self.form = normal_form(mask.expr)
        self.shape = tuple(mask.layout.shape)
        self.tokens = mask.layout.tokens
        self.blocks = block_count(self.shape, self.form.topk.block)
        self.k = self.form.topk.k
        self._owner: dict[torch.device, torch.Tensor] = {}

    def n_picks(self, group: int) -> int:
        """Entries of the union list: the group's heads pick at most k blocks each."""
        return min(self.blocks, group * self.k)

    def owner(self, device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._owner:
            self._owner[device] = token_blocks(self.shape, self.form.topk.block).to(device)
        return self._owner[device]

    def cached_keys(self, k_cache, page_table, capacity: int) -> torch.Tensor:
        """[B, H_kv, n, D]: each sequence's first n = min(capacity, grid) cache rows in token order."""
        n = min(capacity, self.tokens)
        if page_table is None:
            return k_cache[:, :, :n]
        pages = page_table.long().clamp(0, k_cache.shape[0] - 1)  # as the kernel clamps: never out of bounds
        rows = k_cache[pages]  # [B, max_pages, H_kv, page_size, D]
        b, p, h, s, d = rows.shape
        return rows.permute(0, 2, 1, 3, 4).reshape(b, h, p * s, d)[:, :, :n]

    def picks(self, q, k_cache, cache_seqlens, page_table, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = q.device
        batch, heads, q_len, dim = q.shape
        keys = self.cached_keys(k_cache, page_table, capacity).float()
        kv_heads, n = keys.shape[1], keys.shape[2]
        group = heads // kv_heads
        lens = cache_seqlens.long()
        owner = self.owner(device)[:n]
        t = torch.arange(n, device=device)
        cached = t[None, :] < lens[:, None]  # [B, n]
        finite = torch.isfinite(keys).all(-1) & cached[:, None, :]  # [B, H_kv, n]
        sums = torch.zeros(batch, kv_heads, self.blocks, dim, device=device).index_add_(
            2, owner, torch.where(finite[..., None], keys, 0.0))
        counts = torch.zeros(batch, kv_heads, self.blocks, device=device).index_add_(2, owner, finite.float())
        kbar = sums / counts.clamp(min=1.0)[..., None]
        qf = q.float()
        q_ok = torch.isfinite(qf).all(-1, keepdim=True)
        qbar = torch.where(q_ok, qf, 0.0).sum(2) / q_ok.sum(2).clamp(min=1)  # [B, H, D]
        scores = (qbar[:, :, None, :] * kbar.repeat_interleave(group, 1)).sum(-1)  # [B, H, blocks]
        candidates = self._candidates(lens, q_len, t, cached, owner)
        masked = scores.masked_fill(~candidates[:, None, :], float("-inf"))
        keep = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :self.k]
        picked = torch.zeros_like(masked, dtype=torch.bool).scatter_(-1, keep, True) & candidates[:, None, :]
        union = picked.view(batch, kv_heads, group, self.blocks).any(2)
        index = torch.arange(self.blocks, device=device)
        order = torch.sort(torch.where(union, index, self.blocks + index), dim=-1).values[..., :self.n_picks(group)]
        plist = torch.where(order < self.blocks, order, -1).to(torch.int32).contiguous()
        return picked.to(torch.int8).contiguous(), plist

    def _candidates(self, lens, q_len: int, t, cached, owner) -> torch.Tensor:
        """Bool [B, blocks]: blocks holding a cached key that R gives some new row."""
        batch = len(lens)
        if isinstance(self.form.restrict, ir.Full):
            given = cached
        else:
            pos = lens[:, None] - q_len + torch.arange(q_len, device=lens.device)[None, :]  # [B, q_len]
            qc = flat_coords(self.shape, pos.clamp(min=0)[..., None])
            kc = flat_coords(self.shape, t[None, None, :])
            given = (attends(self.form.restrict, self.shape, qc, kc) & (pos >= 0)[..., None]).any(1) & cached
        return torch.zeros(batch, self.blocks, device=lens.device).index_add_(1, owner, given.float()) > 0
