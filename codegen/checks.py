"""Argument checks for compiled kernels, gathered in one place; every error echoes the offending value."""

from __future__ import annotations

import math
import numbers

import torch

from maskdsl.codegen.dispatch import interpreting
from maskdsl.spec import ir
from maskdsl.spec.limits import POW2_HEAD_DIMS, SPEC_HEAD_DIMS

KERNEL_DTYPES = tuple(getattr(torch, name) for name in ir.TORCH_DTYPE_NAMES.values())  # the spec's dtypes


def head_dim_error(head_dim: int, padded: bool = True) -> str | None:
    """Why a kernel cannot take `head_dim`, or None. Kernels that pad (`padded`) take the spec's head_dims
    (SPEC_HEAD_DIMS: every multiple of 8 from 16 to 256); the others take powers of two only."""
    if padded:
        if head_dim in SPEC_HEAD_DIMS:
            return None
        return (f"head_dim {head_dim} is not supported; use a multiple of 8 from 16 to 256 "
                f"(e.g. {', '.join(map(str, _near(head_dim)))}): pad q, k and v with zero columns to it")
    if head_dim in POW2_HEAD_DIMS:
        return None
    return f"head_dim {head_dim} is not supported by this kernel; use one of {POW2_HEAD_DIMS}"


def _near(head_dim: int) -> list[int]:
    """The supported head dims just below and above `head_dim`, for the hint."""
    below = max((d for d in SPEC_HEAD_DIMS if d <= head_dim), default=SPEC_HEAD_DIMS[0])
    above = min((d for d in SPEC_HEAD_DIMS if d >= head_dim), default=SPEC_HEAD_DIMS[-1])
    return sorted({below, above})


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: int, layout: str,
              padded_head_dim: bool = False, kv_tokens: int | None = None, frames: tuple | None = None) -> None:
    """`padded_head_dim`: the kernel pads head_dim to a power of two itself (`head_dim_error`).

    A segment (codegen.segment) passes the token counts of its query chunk (`tokens`) and key buffer
    (`kv_tokens`), and `frames` ((qa, qb), (ka, kb)) for the message."""
    kv_tokens = tokens if kv_tokens is None else kv_tokens
    for name, t, want in (("q", q, tokens), ("k", k, kv_tokens), ("v", v, kv_tokens)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, L, D]; got shape {tuple(t.shape)}")
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{name}.dtype is {t.dtype}; use torch.float16, torch.bfloat16 or torch.float32")
        if t.shape[2] != want:
            if frames is not None:
                a, b = frames[0] if name == "q" else frames[1]
                raise ValueError(f"{name} has {t.shape[2]} tokens (dim 2 of {tuple(t.shape)}) but frames [{a}, {b}) "
                                 f"of layout {layout!r} hold {want}; pass those frames' tokens in row-major order")
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
    if (error := head_dim_error(q.shape[3], padded_head_dim)) is not None:
        raise ValueError(error)
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]}) for GQA/MQA")
    if q.device.type == "cpu" and not interpreting():
        raise ValueError("q is on the CPU: move tensors to a GPU, or set TRITON_INTERPRET=1 before importing "
                         "triton to run the kernel in Triton's interpreter")


def check_out_lse(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, lse_written: bool = True) -> None:
    """A caller's output buffers: out like q with a contiguous last dimension, the LSE float32
    [B, H, L], contiguous where the kernel writes it (one row of L per batch and head; a backward
    only reads it and copies it contiguous itself)."""
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dimension; "
                         f"got {tuple(out.shape)} {out.dtype}")
    if lse.shape != q.shape[:3] or lse.dtype != torch.float32 or (lse_written and not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous float32 tensor of shape {tuple(q.shape[:3])}; "
                         f"got {tuple(lse.shape)} {lse.dtype}")


def check_call(q: torch.Tensor, k: torch.Tensor, scale) -> None:
    """What `check_qkv` leaves to the call: a batch and heads to run (TMA descriptors cannot describe an empty
    tensor) and a finite scale (inf or NaN would silently turn every output row into NaN)."""
    if q.shape[0] < 1 or q.shape[1] < 1 or k.shape[1] < 1:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must hold at least one batch entry and head "
                         "(dims 0 and 1); skip the call for an empty batch")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number (or None for 1/sqrt(head_dim)), got {scale!r}")


def check_config_fields(config) -> None:
    """A KernelConfig's fields are what its arithmetic and key assume: tiles are tuples of integers,
    warps and stages integers (never bool, float, str or dict), so a bad value fails here and names itself."""
    for name in ("q_tile", "kv_tile"):
        tile = getattr(config, name)
        if not isinstance(tile, tuple) or not tile or not all(_integer(t) for t in tile):
            raise ValueError(f"config.{name} must be a non-empty tuple of integers (one per dimension), got {tile!r}")
    for name in ("num_warps", "num_stages"):
        value = getattr(config, name)
        if not _integer(value):
            raise ValueError(f"config.{name} must be an integer, got {value!r}")


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy integers too
