"""Argument checks for compiled kernels, gathered in one place; every error echoes the offending value."""

from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, L, D]; got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}.dtype is {t.dtype}; use torch.float16, torch.bfloat16 or torch.float32")
        if t.shape[2] != tokens:
            raise ValueError(f"{name} has {t.shape[2]} tokens (dim 2 of {tuple(t.shape)}) but layout {layout!r} "
                             f"has {tokens}; pass tokens in row-major order of the grid")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)}); "
                             f"call {name}.contiguous()")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"batch mismatch: q has {q.shape[0]}, k/v have {k.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"head_dim mismatch: q has {q.shape[3]}, k/v have {k.shape[3]}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[3]} is not supported; use one of {HEAD_DIMS}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]}) for GQA/MQA")
    if q.device.type == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("q is on the CPU: move tensors to a GPU, or set TRITON_INTERPRET=1 before importing "
                             "triton to run the kernel in Triton's interpreter")
