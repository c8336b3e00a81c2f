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

from dataclasses import dataclass

import torch

from maskdsl.analysis.decode_reach import reach_table_of
from maskdsl.harness.semantics import attends, flat_coords
from maskdsl.harness.topk import block_count, token_blocks
from maskdsl.spec import ir
from maskdsl.spec.topk_form import normal_form


@dataclass(eq=False)
class KeyBlockMeans:
    """Per sequence, kv head and top-k key block, the sum and count of its cached finite keys (float32):
    kept beside the KV cache, they let a decode step's selection read [blocks, D] per head instead of
    the whole cache. Build them once from a filled cache (`CompiledDecode.block_means`), then `append`
    each step's new keys after writing them to the cache; pass them as `fn.decode(..., block_means=)`."""

    sums: torch.Tensor  # [B, H_kv, blocks, D]
    counts: torch.Tensor  # [B, H_kv, blocks]
    owner: torch.Tensor  # [tokens] the block of each position

    def append(self, k_new: torch.Tensor, cache_seqlens: torch.Tensor) -> None:
        """Add the keys k_new [B, H_kv, n, D] now at positions cache_seqlens[b] - n .. cache_seqlens[b] - 1."""
        batch, kv_heads, n, dim = k_new.shape
        if (batch, kv_heads, dim) != (self.sums.shape[0], self.sums.shape[1], self.sums.shape[3]):
            raise ValueError(f"k_new {tuple(k_new.shape)} does not match the block means of "
                             f"[B={self.sums.shape[0]}, H_kv={self.sums.shape[1]}, D={self.sums.shape[3]}]")
        pos = cache_seqlens.long()[:, None] - n + torch.arange(n, device=k_new.device)[None, :]  # [B, n]
        inside = (pos >= 0) & (pos < len(self.owner))
        blocks = self.owner[pos.clamp(0, len(self.owner) - 1)]  # [B, n]
        keys = k_new.float()
        take = torch.isfinite(keys).all(-1) & inside[:, None, :]  # [B, H_kv, n]
        base = torch.arange(batch * kv_heads, device=k_new.device).view(batch, kv_heads, 1) * self.sums.shape[2]
        index = (base + blocks[:, None, :]).flatten()
        self.sums.view(-1, dim).index_add_(0, index, torch.where(take[..., None], keys, 0.0).reshape(-1, dim))
        self.counts.view(-1).index_add_(0, index, take.float().flatten())


class DecodeSelection:
    """The selection of one top-k mask; `picks(...)` per call."""

    def __init__(self, mask: ir.MaskDef):
        self.form = normal_form(mask.expr)
        self.shape = tuple(mask.layout.shape)
        self.tokens = mask.layout.tokens
        self.blocks = block_count(self.shape, self.form.topk.block)
        self.k = self.form.topk.k
        table = reach_table_of(self.form.restrict, self.shape)
        # R's keys per position as exact intervals (a 1-D R without dilation): candidates from intervals
        self.r_intervals = table.intervals if table.exact else None
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def n_picks(self, group: int) -> int:
        """Entries of the union list: the group's heads pick at most k blocks each."""
        return min(self.blocks, group * self.k)

    def owner(self, device) -> torch.Tensor:
        return self._tables(device)[0]

    def _tables(self, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the block of each position, R's exact intervals or None) on `device`, uploaded once."""
        device = torch.device(device)
        if device not in self._on:
            iv = None if self.r_intervals is None else torch.from_numpy(self.r_intervals).to(device)
            self._on[device] = (token_blocks(self.shape, self.form.topk.block).to(device), iv)
        return self._on[device]

    def cached_keys(self, k_cache, page_table, capacity: int) -> torch.Tensor:
        """[B, H_kv, n, D]: each sequence's first n = min(capacity, grid) cache rows in token order."""
        n = min(capacity, self.tokens)
        if page_table is None:
            return k_cache[:, :, :n]
        pages = page_table.long().clamp(0, k_cache.shape[0] - 1)  # as the kernel clamps: never out of bounds
        rows = k_cache[pages]  # [B, max_pages, H_kv, page_size, D]
        b, p, h, s, d = rows.shape
        return rows.permute(0, 2, 1, 3, 4).reshape(b, h, p * s, d)[:, :, :n]

    def block_means(self, k_cache, cache_seqlens, page_table, capacity: int) -> KeyBlockMeans:
        """The sums and counts of every block's cached finite keys, read from the cache once."""
        keys = self.cached_keys(k_cache, page_table, capacity).float()
        batch, kv_heads, n, dim = keys.shape
        owner = self.owner(keys.device)
        cached = torch.arange(n, device=keys.device)[None, :] < cache_seqlens.long()[:, None]  # [B, n]
        finite = torch.isfinite(keys).all(-1) & cached[:, None, :]  # [B, H_kv, n]
        sums = torch.zeros(batch, kv_heads, self.blocks, dim, device=keys.device).index_add_(
            2, owner[:n], torch.where(finite[..., None], keys, 0.0))
        counts = torch.zeros(batch, kv_heads, self.blocks, device=keys.device).index_add_(2, owner[:n], finite.float())
        return KeyBlockMeans(sums, counts, owner)

    def picks(self, q, k_cache, cache_seqlens, page_table, capacity: int,
              means: KeyBlockMeans | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        device = q.device
        batch, heads, q_len, dim = q.shape
        if means is None:
            means = self.block_means(k_cache, cache_seqlens, page_table, capacity)
        kv_heads = means.sums.shape[1]
        group = heads // kv_heads
        lens = cache_seqlens.long()
        kbar = means.sums / means.counts.clamp(min=1.0)[..., None]
        qf = q.float()
        q_ok = torch.isfinite(qf).all(-1, keepdim=True)
        qbar = torch.where(q_ok, qf, 0.0).sum(2) / q_ok.sum(2).clamp(min=1)  # [B, H, D]
        scores = (qbar[:, :, None, :] * kbar.repeat_interleave(group, 1)).sum(-1)  # [B, H, blocks]
        candidates = self._candidates(lens, q_len, min(capacity, self.tokens))
        masked = scores.masked_fill(~candidates[:, None, :], float("-inf"))
        keep = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :self.k]
        picked = torch.zeros_like(masked, dtype=torch.bool).scatter_(-1, keep, True) & candidates[:, None, :]
        union = picked.view(batch, kv_heads, group, self.blocks).any(2)
        index = torch.arange(self.blocks, device=device)
        order = torch.sort(torch.where(union, index, self.blocks + index), dim=-1).values[..., :self.n_picks(group)]
        plist = torch.where(order < self.blocks, order, -1).to(torch.int32).contiguous()
        return picked.to(torch.int8).contiguous(), plist

    def _candidates(self, lens, q_len: int, n: int) -> torch.Tensor:
        """Bool [B, blocks]: blocks holding a cached key (position < min(length, n)) that R gives some new row."""
        device = lens.device
        batch = len(lens)
        owner, r_iv = self._tables(device)
        pos = lens[:, None] - q_len + torch.arange(q_len, device=device)[None, :]  # [B, q_len]
        if r_iv is not None:  # 1-D: each new row's exact intervals, cut to the cache, mark a run of blocks
            rows = r_iv[pos.clamp(0, self.tokens - 1)].long()  # [B, q_len, 2 * SLOTS]
            lo, hi = rows[..., 0::2], torch.minimum(rows[..., 1::2], lens.clamp(max=n)[:, None, None] - 1)
            used = (lo <= hi) & (pos >= 0)[..., None]
            block = self.form.topk.block[0]
            marks = torch.zeros(batch, self.blocks + 1, device=device)
            marks.scatter_add_(1, (lo // block).clamp(0, self.blocks).flatten(1), used.float().flatten(1))
            marks.scatter_add_(1, (hi // block + 1).clamp(0, self.blocks).flatten(1), -used.float().flatten(1))
            return marks.cumsum(1)[:, :self.blocks] > 0
        t = torch.arange(n, device=device)
        qc = flat_coords(self.shape, pos.clamp(min=0)[..., None])
        kc = flat_coords(self.shape, t[None, None, :])
        given = (attends(self.form.restrict, self.shape, qc, kc) & (pos >= 0)[..., None]).any(1)
        given = given & (t[None, :] < lens[:, None])  # cached
        return torch.zeros(batch, self.blocks, device=device).index_add_(1, owner[:n], given.float()) > 0
