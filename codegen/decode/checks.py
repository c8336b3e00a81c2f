"""Argument checks of a decode call, in one place; every error echoes the offending value.

`check_decode` reads shapes, dtypes and devices only (no sync): it runs once per call signature.
`value_problem` reads the lengths and the page table on the device and syncs once to learn whether
anything is wrong;
a call skips it with `check_values=False` (under CUDA-graph capture, say): the kernel never reads out of
bounds whatever the values, but a wrong length then gives a wrong answer instead of an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskdsl.codegen.checks import KERNEL_DTYPES
from maskdsl.analysis.decode_reach import MAX_Q_LEN
from maskdsl.codegen.dispatch import interpreting
from maskdsl.spec.limits import POW2_HEAD_DIMS


class DecodeError(ValueError):
    """A decode call's inputs do not fit the mask or the cache (the message says which and why)."""


@dataclass(frozen=True)
class CacheShape:
    """What a decode call's tensors say: the batch, heads, new tokens, head_dim, how many keys a sequence's
    cache holds (`capacity`), and for a paged cache its page size and pool size (0 when contiguous)."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    head_dim: int
    capacity: int
    page_size: int = 0
    num_pages: int = 0

    @property
    def paged(self) -> bool:
        return self.page_size > 0

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _tensor(name: str, t, dims: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise DecodeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise DecodeError(f"{name} must be {what}; got shape {tuple(t.shape)}")


def check_decode(q, k_cache, v_cache, cache_seqlens, page_table, tokens: int) -> CacheShape:
    """The call's shapes, or a DecodeError (a ValueError) naming the argument; `tokens` is the grid's length (positions)."""
    _tensor("q", q, 4, "[batch, heads, q_len, head_dim]")
    paged = page_table is not None
    layout = "[pages, kv_heads, page_size, head_dim]" if paged else "[batch, kv_heads, max_len, head_dim]"
    _tensor("k_cache", k_cache, 4, layout)
    _tensor("v_cache", v_cache, 4, layout)
    _tensor("cache_seqlens", cache_seqlens, 1, "[batch]")
    batch, heads, q_len, head_dim = q.shape
    if q.dtype not in KERNEL_DTYPES:
        raise DecodeError(f"q.dtype is {q.dtype}; use torch.float16, torch.bfloat16 or torch.float32")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise DecodeError(f"{name}.dtype is {t.dtype} but q.dtype is {q.dtype}; q and the caches share one dtype")
        if t.device != q.device:
            raise DecodeError(f"{name} is on {t.device} but q is on {q.device}; put them on one device")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise DecodeError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)}); "
                             f"call {name}.contiguous()")
    if k_cache.shape != v_cache.shape:
        raise DecodeError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the same shape")
    if not 1 <= q_len <= MAX_Q_LEN:
        raise DecodeError(f"q holds {q_len} new tokens per sequence (dim 2 of {tuple(q.shape)}); decode takes 1 to "
                         f"{MAX_Q_LEN}: run longer chunks through the compiled attention (a prefill)")
    if k_cache.shape[3] != head_dim:
        raise DecodeError(f"head_dim mismatch: q has {head_dim}, the caches have {k_cache.shape[3]}")
    if head_dim not in POW2_HEAD_DIMS:
        raise DecodeError(f"head_dim {head_dim} is not supported by decode; use one of {POW2_HEAD_DIMS} "
                         "(pad q and the caches with zero columns)")
    kv_heads = k_cache.shape[1]
    if batch < 1 or heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise DecodeError(f"q has {heads} heads and the caches {kv_heads} kv heads (dim 1): kv heads must divide "
                         "query heads (GQA/MQA), and there must be at least one sequence and head")
    if cache_seqlens.dtype != torch.int32:
        raise DecodeError(f"cache_seqlens.dtype is {cache_seqlens.dtype}; use torch.int32")
    if cache_seqlens.shape[0] != batch:
        raise DecodeError(f"cache_seqlens has {cache_seqlens.shape[0]} entries but q holds {batch} sequences")
    if cache_seqlens.device != q.device:
        raise DecodeError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    if batch > 1 and cache_seqlens.stride(0) != 1:
        raise DecodeError(f"cache_seqlens must be contiguous (stride {cache_seqlens.stride(0)}); call "
                         "cache_seqlens.contiguous()")
    if q.device.type == "cpu" and not interpreting():
        raise DecodeError("q is on the CPU: move tensors to a GPU, or set TRITON_INTERPRET=1 before importing "
                         "triton to run the kernel in Triton's interpreter")
    if not paged:
        if k_cache.shape[0] != batch:
            raise DecodeError(f"k_cache holds {k_cache.shape[0]} sequences (dim 0) but q holds {batch}; a paged "
                             "cache needs its page_table")
        return CacheShape(batch, heads, kv_heads, q_len, head_dim, k_cache.shape[2])
    _tensor("page_table", page_table, 2, "[batch, max_pages]")
    if page_table.dtype != torch.int32:
        raise DecodeError(f"page_table.dtype is {page_table.dtype}; use torch.int32")
    if page_table.shape[0] != batch:
        raise DecodeError(f"page_table has {page_table.shape[0]} rows but q holds {batch} sequences")
    if page_table.device != q.device:
        raise DecodeError(f"page_table is on {page_table.device} but q is on {q.device}")
    if page_table.stride(-1) != 1:
        raise DecodeError("page_table must be contiguous in its last dimension; call page_table.contiguous()")
    pages, page_size = k_cache.shape[0], k_cache.shape[2]
    if page_size < 1 or page_size & (page_size - 1):
        raise DecodeError(f"page size {page_size} (dim 2 of the caches) is not a power of two")
    if pages < 1 or page_table.shape[1] < 1:
        raise DecodeError(f"the page pool ({pages} pages) and page_table {tuple(page_table.shape)} must not be empty")
    return CacheShape(batch, heads, kv_heads, q_len, head_dim, page_table.shape[1] * page_size, page_size, pages)


def value_problem(shape: CacheShape, cache_seqlens, page_table, last_key, tokens: int) -> str | None:
    """Why these lengths (and pages) do not fit, else None. `last_key` [tokens] int32 on the device: the
    last key each position sees (maskdsl.analysis.decode_reach), so a new token that sees a key not yet
    in the cache is refused. One small kernel and one sync (`kernel.decode_check`); only a call that
    fails pays for `value_message`."""
    from maskdsl.codegen.decode import kernel

    flags = torch.zeros(shape.batch + 1, dtype=torch.int32, device=cache_seqlens.device)
    pages = page_table if shape.paged else cache_seqlens
    max_pages = page_table.shape[1] if shape.paged else 1
    kernel.decode_check[(shape.batch,)](cache_seqlens, last_key, pages, flags, pages.stride(0),
                                        min(shape.capacity, tokens), max(shape.num_pages, 1), TOKENS=tokens,
                                        Q_LEN=shape.q_len, Q_PAD=max(2, 1 << (shape.q_len - 1).bit_length()),
                                        PAGED=shape.paged, PAGE_SIZE=max(shape.page_size, 1), MAX_PAGES=max_pages,
                                        BLOCK_P=min(1024, max(16, 1 << (max_pages - 1).bit_length())))
    if not int(flags[shape.batch]):  # the one sync
        return None
    return value_message(shape, cache_seqlens, page_table, last_key, tokens) or (
        f"sequence {int(torch.nonzero(flags[:-1])[0, 0])}: its length or pages do not fit the cache or the mask")


def value_message(shape: CacheShape, cache_seqlens, page_table, last_key, tokens: int) -> str | None:
    """The message for the first sequence whose length or pages do not fit (None if all do), in torch."""
    lens = cache_seqlens.to(torch.int64)
    limit = min(shape.capacity, tokens)
    bad_len = (lens < shape.q_len) | (lens > limit)
    t = torch.arange(shape.q_len, device=lens.device)
    pos = (lens[:, None] - shape.q_len + t[None, :]).clamp(0, tokens - 1)
    ahead = (last_key[pos].to(torch.int64) >= lens[:, None]).any(1) & ~bad_len
    bad = bad_len | ahead
    bad_page = None
    if shape.paged:
        used = torch.arange(page_table.shape[1], device=lens.device)[None, :] * shape.page_size < lens[:, None]
        bad_page = used & ((page_table < 0) | (page_table >= shape.num_pages))
        bad = bad | bad_page.any(1)
    if not bool(bad.any()):  # the one sync
        return None
    b = int(torch.nonzero(bad)[0, 0])
    n = int(lens[b])
    if bool(bad_len[b]):
        if n < shape.q_len:
            return (f"cache_seqlens[{b}] = {n} is shorter than the {shape.q_len} new tokens: the new tokens' keys "
                    "and values must already be in the cache (cache_seqlens counts them)")
        room = "the cache holds" if shape.capacity <= tokens else "the mask's grid has"
        return f"cache_seqlens[{b}] = {n} is past the {limit} positions {room}"
    if bool(ahead[b]):
        p = int(torch.nonzero(last_key[pos[b]].to(torch.int64) >= n)[0, 0]) + n - shape.q_len
        return (f"sequence {b}: the new token at position {p} sees key {int(last_key[p])}, which is not in the cache "
                f"(cache_seqlens[{b}] = {n}); decode this step once those tokens have arrived, with more new tokens")
    j = int(torch.nonzero(bad_page[b])[0, 0])
    return (f"page_table[{b}, {j}] = {int(page_table[b, j])} is not a page of the pool (0 to {shape.num_pages - 1}); "
            f"sequence {b} needs pages for its {n} cached tokens")
