"""The checks of a document call's offsets and prefix lengths: metadata always, values on request.

Metadata (type, dtype, device, shape) is read on the host and costs nothing on the device. The values
(offsets start at 0, never decrease, end at L; each prefix within its document) need one small
synchronisation, so `check_documents=False` skips them (what CUDA-graph capture and a training loop that
trusts its data loader want); the kernels clamp whatever they are given (codegen.documents.intervals).
"""

from __future__ import annotations

import torch


def check_metadata(documents, prefix, q: torch.Tensor, length: int, wants_prefix: bool, mask_name: str) -> None:
    """`length`: what the offsets end at (the layout's frames along dimension 0; its tokens on 1-D)."""
    if documents is None:
        raise ValueError(f"mask {mask_name!r} holds `document`: pass documents=offsets (int32 [D + 1] on "
                         f"{q.device}: 0, l1, l1 + l2, ..., {length})")
    if not isinstance(documents, torch.Tensor):
        raise ValueError(f"documents must be a torch.Tensor of int32 offsets, got {type(documents).__name__}")
    if documents.dtype != torch.int32:
        raise ValueError(f"documents.dtype is {documents.dtype}; the offsets must be torch.int32 "
                         "(documents.to(torch.int32))")
    if documents.device != q.device:
        raise ValueError(f"documents is on {documents.device} but q is on {q.device}; move the offsets to q's device")
    if documents.dim() != 1 or documents.numel() < 2:
        raise ValueError(f"documents must be 1-D with at least 2 offsets ([0, ..., {length}]), got shape "
                         f"{tuple(documents.shape)}")
    if wants_prefix:
        if prefix is None:
            raise ValueError(f"mask {mask_name!r} uses `prefix`: pass prefix=lengths (int32 [{documents.numel() - 1}], "
                             "one prefix length per document)")
        if not isinstance(prefix, torch.Tensor) or prefix.dtype != torch.int32:
            got = prefix.dtype if isinstance(prefix, torch.Tensor) else type(prefix).__name__
            raise ValueError(f"prefix must be an int32 tensor of prefix lengths, got {got}")
        if prefix.device != q.device:
            raise ValueError(f"prefix is on {prefix.device} but q is on {q.device}; move it to q's device")
        if prefix.shape != (documents.numel() - 1,):
            raise ValueError(f"prefix must hold one length per document: shape ({documents.numel() - 1},) for "
                             f"{documents.numel()} offsets, got {tuple(prefix.shape)}")
    elif prefix is not None:
        raise ValueError(f"mask {mask_name!r} has no `prefix` term, but prefix= was passed; drop it, or write "
                         "`document & (causal | prefix)`")


def check_values(documents: torch.Tensor, prefix, length: int, inner: int = 1) -> None:
    """Offsets [0, ..., T] (`length` frames of `inner` tokens) non-decreasing, prefixes (tokens) within their
    documents: one synchronisation."""
    d = documents
    ok = [d[0] == 0, d[-1] == length, (d[1:] >= d[:-1]).all()]
    if prefix is not None:
        sizes = (d[1:] - d[:-1]).long() * inner
        ok += [(prefix >= 0).all(), (prefix <= sizes).all()]
    if all(torch.stack(ok).tolist()):
        return
    host = d.tolist()  # the error path may sync as it likes
    if host[0] != 0:
        raise ValueError(f"documents must start at 0, got {host[0]} (offsets {_short(host)})")
    if host[-1] != length:
        unit = " (frames of dimension 0)" if inner > 1 else ""
        raise ValueError(f"documents must end at the layout's length {length}{unit}, got {host[-1]} "
                         f"(offsets {_short(host)}); pad with a last document to reach it")
    for i in range(1, len(host)):
        if host[i] < host[i - 1]:
            raise ValueError(f"documents must not decrease: offset {i} is {host[i]} after {host[i - 1]} "
                             f"(offsets {_short(host)}); empty documents (repeated offsets) are allowed")
    lengths = prefix.tolist()
    for i, p in enumerate(lengths):
        size = (host[i + 1] - host[i]) * inner
        if not 0 <= p <= size:
            raise ValueError(f"prefix[{i}] = {p} is outside document {i} of {size} tokens (0 <= prefix <= length)")


def _short(values: list) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:6]))}, ..., {values[-1]}]"
