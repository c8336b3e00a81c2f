"""Which kernel runs a call, in the order they are tried, and why each earlier one was refused.

Forwards, best first (`FORWARDS`):

1. ``gluon``: the warp-specialized Hopper forward (codegen.gluon_fwd). Needs a Hopper GPU outside
   Triton's interpreter, fp16/bf16, head_dim 64 or 128, q/k/v/out the copy engine addresses as
   [batch x heads, grid, head_dim], and a static mask whose tile schedule the kernel takes: the
   schedule (`CompiledAttention.gluon_schedule.ranges`) says which mode (whole tiles, runs of a
   1-D order, per-dimension boxes) or why none; the boxes mode runs head_dim 128 only.
   MASKDSL_GLUON=0 turns it off.
2. ``triton``: the Triton template (codegen.render), any static mask on any device the argument
   checks allow. It loads through the copy engine (TMA) where `tma_blocker` allows, else through
   pointers; MASKDSL_TMA=0 forces pointers.
3. ``topk``: the top-k forward (codegen.topk.forward): the masks with a top-k term, and only those.

Backwards, best first (`BACKWARDS`): ``gluon``, the warp-specialized Hopper backward
(codegen.gluon_bwd: dQ by fp32 atomics, so not bitwise reproducible; never for a deterministic
backward), opt-in with MASKDSL_GLUON_BWD=1 until measured, for the masks the Gluon forward runs in
its whole-tile mode, on the forward's device and layout rules; ``triton``, the split dK/dV + dQ
kernels (codegen.backward, or its atomic-dQ mode), for static masks; ``topk``, the top-k backward
(codegen.topk.backward), for top-k masks.

Every predicate returns None when its kernel can run, else a sentence saying why not; cheap tests
come first. A `Target` stands for the device: the tensors' own by default, or `HOPPER` to ask what
a Hopper GPU would do with tensors built on the meta device (`maskdsl simulate` does, on any
machine). Everything here that reads the environment or the GPU's properties is here only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import prod

import torch

from maskdsl.analysis.gluon_rule import BOX_HEAD_DIMS, GLUON_DTYPES, GLUON_HEAD_DIMS, pad_rank
from maskdsl.analysis.tile_table import RANK

FORWARDS = ("gluon", "triton", "topk")
BACKWARDS = ("gluon", "triton", "topk")

GLUON_TORCH_DTYPES = tuple(getattr(torch, name) for name in GLUON_DTYPES)


# ---- the environment and the device ---------------------------------------------------------------

def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1: on the CPU, numpy semantics)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_PROPERTIES: dict[torch.device, object] = {}


def _properties(device: torch.device):
    """torch.cuda.get_device_properties, cached: a one-head launch is host-bound."""
    if device not in _PROPERTIES:
        _PROPERTIES[device] = torch.cuda.get_device_properties(device)
    return _PROPERTIES[device]


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device."""
    return _properties(device).multi_processor_count


def capability(device: torch.device) -> int:
    """The major compute capability of a CUDA device (9 for Hopper)."""
    return _properties(device).major


@dataclass(frozen=True)
class Target:
    """The facts about a device that decide a kernel: its type, its compute capability (CUDA only)
    and whether Triton's interpreter runs the kernels."""

    kind: str
    major: int | None = None
    interpreter: bool = False

    @classmethod
    def of(cls, device) -> "Target":
        device = torch.device(device)
        return cls(device.type, capability(device) if device.type == "cuda" else None, interpreting())

    def describe(self) -> str:
        where = f"CUDA {self.major}.x" if self.kind == "cuda" else self.kind
        return where + (" under Triton's interpreter" if self.interpreter else "")


HOPPER = Target("cuda", 9, False)


def _target(device_or_target) -> Target:
    return device_or_target if isinstance(device_or_target, Target) else Target.of(device_or_target)


# ---- the copy engine ------------------------------------------------------------------------------

def tma_aligned(t: torch.Tensor, strides) -> bool:
    """Whether the copy engine (TMA) can address `t` with these element strides: a contiguous last
    one, and a 16-byte aligned base and other strides (Hopper's tensor-map rule)."""
    return (strides[-1] == 1 and t.data_ptr() % 16 == 0
            and all((s * t.element_size()) % 16 == 0 for s in strides[:-1]))


def box_strides(t: torch.Tensor, grid: tuple[int, ...]) -> list[int] | None:
    """Element strides of t as [batch x heads, *grid, head_dim] (grid padded to RANK dimensions)
    when the copy engine can address it so, else None: unit last stride, 16-byte aligned base and
    strides, and batch folding into heads, so a kernel addresses a (batch, head) with one coordinate."""
    batch, heads, _, _ = t.shape
    sb, sh, sl, sd = t.stride()
    grid = pad_rank(grid)
    inner = [sl * prod(grid[d + 1:]) for d in range(RANK)]
    strides = [sh, *inner, sd]
    if (batch > 1 and sb != heads * sh) or not tma_aligned(t, strides):
        return None
    return strides


def tma_strides(plan, t: torch.Tensor) -> list[int] | None:
    """Element strides of t as the template's descriptor reads it, [batch x head, n_0, .., head_dim]
    with each grid dimension's own stride (`plan.dims`), or None where the copy engine cannot."""
    batch, heads = t.shape[:2]
    sb, sh, sl, sd = t.stride()
    strides = [sh, *(sl * d.stride for d in plan.dims), sd]
    if (batch > 1 and sb != heads * sh) or not tma_aligned(t, strides):
        return None
    return strides


def tma_blocker(plan, q, k, v, out, target=None) -> str | None:
    """Why the template and top-k kernels load through pointers rather than the copy engine, or None.

    A descriptor addresses a tile as a box of the grid, so every dimension must be undilated (a
    dilation group is not a box of memory) and at most three (the copy engine takes five with batch x
    head and head_dim); the box is head_dim wide while the kernel's tile is a power of two, so
    head_dim must be one; pre-Hopper GPUs have no copy engine (the interpreter emulates one).
    """
    if not plan.tma_ok:
        return f"grid {plan.shape} with dilation or over 3 dimensions: a tile is not a box of memory"
    if os.environ.get("MASKDSL_TMA") == "0":
        return "MASKDSL_TMA=0"
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is padded inside the kernel: the pointer loads mask the extra columns"
    target = _target(q.device if target is None else target)
    if target.kind == "cuda" and target.major < 9:
        return f"compute capability {target.major}.x has no copy engine (Hopper's is 9.x)"
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if tma_strides(plan, t) is None:
            return f"{name} (strides {tuple(t.stride())}) is not a copy-engine box"
    return None


# ---- the Gluon forward's device and tensor rules --------------------------------------------------

def device_blocker(device) -> str | None:
    """Why the Gluon forward cannot run on `device` (a torch device or a `Target`) at all, tensors
    aside, or None: the switch, the interpreter, a GPU that is not Hopper."""
    if os.environ.get("MASKDSL_GLUON") == "0":
        return "MASKDSL_GLUON=0"
    target = _target(device)
    if target.interpreter:
        return "Triton's interpreter runs Triton kernels only"
    if target.kind != "cuda":
        return f"tensors on {target.kind}, not CUDA"
    if target.major != 9:
        return f"compute capability {target.major}.x; the kernel is Hopper's (9.x)"
    return None


def layout_blocker(q, k, v, out, lse=None, grid: tuple[int, ...] | None = None) -> str | None:
    """Why the Gluon forward cannot take these tensors whatever the device, or None: dtype, head_dim
    and memory layout (`grid`, the mask's layout shape, defaults to a 1-D token order). The kernel
    writes LSE as [batch x heads x tokens] float32; None stands for the op's own."""
    if q.dtype not in GLUON_TORCH_DTYPES:
        return f"dtype {q.dtype}; the kernel takes float16 and bfloat16"
    if q.shape[-1] not in GLUON_HEAD_DIMS:
        return f"head_dim {q.shape[-1]}; the kernel takes {GLUON_HEAD_DIMS}"
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if box_strides(t, grid or (t.shape[2],)) is None:
            return f"{name} (strides {t.stride()}) is not a copy-engine box [batch x heads, grid, head_dim]"
    if lse is not None and not (lse.is_contiguous() and lse.dtype == torch.float32):
        return "lse is not a contiguous float32 tensor"
    return None


def tensor_blocker(q, k, v, out, lse=None, grid: tuple[int, ...] | None = None, target=None) -> str | None:
    """Why the Gluon forward cannot take these tensors (mask aside), or None. Device first: cheapest."""
    return device_blocker(q.device if target is None else target) or layout_blocker(q, k, v, out, lse, grid)


def head_dim_blocker(head_dim: int) -> str | None:
    """Why the boxes mode's per-dimension predicate does not run this head_dim, or None
    (maskdsl.analysis.gluon_rule.BOX_HEAD_DIMS says why it runs 128 only)."""
    if head_dim not in BOX_HEAD_DIMS:
        runs = " or ".join(map(str, BOX_HEAD_DIMS))
        return (f"head_dim {head_dim}: the per-dimension predicate runs head_dim {runs} only (at 64 its "
                "masked tiles cost more than the template's)")
    return None


# ---- the forwards ---------------------------------------------------------------------------------

def _defaults(q, k, v, out):
    return q, q if k is None else k, q if v is None else v, q if out is None else out


def can_run_gluon(fn, q, k=None, v=None, out=None, lse=None, target=None) -> str | None:
    """Whether the Gluon forward runs compiled attention `fn` on these tensors (module docstring).
    k, v and out default to q's layout, lse to the one the op allocates."""
    if fn.mask.dynamic:
        return "a top-k mask: the Gluon forward's tile schedule is fixed when it is compiled"
    q, k, v, out = _defaults(q, k, v, out)
    reason = tensor_blocker(q, k, v, out, lse, fn.plan.shape, target)
    if reason is None:
        ranges = fn.gluon_schedule.ranges
        if not ranges.ok:
            reason = ranges.reason
        elif ranges.mode == "boxes":
            reason = head_dim_blocker(q.shape[-1])
    return reason


def can_run_template(fn, q, k=None, v=None, out=None, lse=None, target=None) -> str | None:
    """Whether the Triton template runs `fn`: every static mask, on a GPU or in the interpreter."""
    if fn.mask.dynamic:
        return "a top-k mask: the template's key tiles are fixed when it is compiled, a selection is per call"
    target = _target(q.device if target is None else target)
    if target.kind != "cuda" and not target.interpreter:
        return f"tensors on {target.kind}: Triton kernels run on a GPU, or on the CPU under TRITON_INTERPRET=1"
    return None


def can_run_topk(fn, q, k=None, v=None, out=None, lse=None, target=None) -> str | None:
    """Whether the top-k forward runs `fn`: masks with a top-k term, on a GPU or in the interpreter."""
    if not fn.mask.dynamic:
        return "no top-k term in the mask"
    target = _target(q.device if target is None else target)
    if target.kind != "cuda" and not target.interpreter:
        return f"tensors on {target.kind}: Triton kernels run on a GPU, or on the CPU under TRITON_INTERPRET=1"
    return None


FORWARD_CHECKS = {"gluon": can_run_gluon, "triton": can_run_template, "topk": can_run_topk}


def forward_reasons(fn, q, k=None, v=None, out=None, lse=None, target=None) -> list[tuple[str, str | None]]:
    """Every forward in `FORWARDS` order with why it cannot run `fn` on these tensors (None: it can)."""
    target = _target(q.device if target is None else target)
    return [(name, FORWARD_CHECKS[name](fn, q, k, v, out, lse, target)) for name in FORWARDS]


def choose_forward(fn, q, k=None, v=None, out=None, lse=None, target=None) -> str:
    """The first forward in `FORWARDS` order that runs `fn` on these tensors; ValueError if none does."""
    target = _target(q.device if target is None else target)  # once: a one-head launch is host-bound
    refused = []
    for name in FORWARDS:
        reason = FORWARD_CHECKS[name](fn, q, k, v, out, lse, target)
        if reason is None:
            return name
        refused.append(f"{name}: {reason}")
    raise ValueError("no forward kernel runs this call: " + "; ".join(refused))


def compatible_forwards(fn, q, k=None, v=None, out=None, lse=None, target=None) -> list[str]:
    """Every forward that runs `fn` on these tensors, in `FORWARDS` order."""
    return [name for name, reason in forward_reasons(fn, q, k, v, out, lse, target) if reason is None]


# ---- the backwards --------------------------------------------------------------------------------

def can_run_gluon_backward(fn, q=None, k=None, v=None, out=None, dout=None, lse=None, target=None) -> str | None:
    """Whether the Gluon backward (codegen.gluon_bwd) differentiates `fn` for these tensors: opted in
    (MASKDSL_GLUON_BWD=1), a static mask compiled with the atomic-dQ backward (the user did not ask for
    a deterministic one), whose forward schedule is the whole-tile mode, and the
    Gluon forward's device and layout rules (Hopper outside the interpreter, fp16/bf16, head_dim 64
    or 128, copy-engine boxes) for q, k, v, out and dout; lse float32 and contiguous. Without tensors
    it cannot tell: refused."""
    if os.environ.get("MASKDSL_GLUON_BWD") != "1":
        return "opt-in until measured on a GPU: MASKDSL_GLUON_BWD=1"
    if fn.mask.dynamic:
        return "a top-k mask: the Gluon backward's tile schedule is fixed when it is compiled"
    if fn.backward_config is None or not fn.backward_config.atomic:
        return ("a deterministic backward (maskdsl.compile(deterministic=True), BackwardConfig.atomic False): "
                "the Gluon backward adds dQ atomically, in an order that varies run to run")
    if q is None:
        return "no tensors: the Gluon backward's rule reads their device and layout"
    q, k, v, out = _defaults(q, k, v, out)
    dout = q if dout is None else dout
    reason = tensor_blocker(q, k, v, out, lse, fn.plan.shape, target)
    if reason is None and box_strides(dout, fn.plan.shape) is None:
        reason = f"dout (strides {dout.stride()}) is not a copy-engine box [batch x heads, grid, head_dim]"
    if reason is None:
        ranges = fn.gluon_schedule.ranges
        if not ranges.ok:
            reason = ranges.reason
        elif ranges.mode != "whole":
            reason = f"the forward's {ranges.mode!r} mode: the Gluon backward runs whole tiles only"
    return reason


def can_run_split_backward(fn, *tensors, target=None) -> str | None:
    """The Triton split backward (preprocess, dK/dV, dQ: codegen.backward) takes every static mask."""
    return "a top-k mask: its backward replays the forward's selection" if fn.mask.dynamic else None


def can_run_topk_backward(fn, *tensors, target=None) -> str | None:
    """The top-k backward (codegen.topk.backward) takes the masks with a top-k term."""
    return None if fn.mask.dynamic else "no top-k term in the mask"


BACKWARD_CHECKS = {"gluon": can_run_gluon_backward, "triton": can_run_split_backward, "topk": can_run_topk_backward}


def backward_reasons(fn, q=None, k=None, v=None, out=None, dout=None, lse=None, target=None
                     ) -> list[tuple[str, str | None]]:
    """Every backward in `BACKWARDS` order with why it cannot differentiate `fn` for these tensors
    (None: it can); without tensors, the ones that need none."""
    return [(name, BACKWARD_CHECKS[name](fn, q, k, v, out, dout, lse, target=target)) for name in BACKWARDS]


def choose_backward(fn, q=None, k=None, v=None, out=None, dout=None, lse=None, target=None) -> str:
    """The first backward in `BACKWARDS` order that differentiates `fn` (for these tensors, if given)."""
    for name, reason in backward_reasons(fn, q, k, v, out, dout, lse, target):
        if reason is None:
            return name
    raise ValueError("no backward kernel differentiates this mask")


def compatible_backwards(fn, q=None, k=None, v=None, out=None, dout=None, lse=None, target=None) -> list[str]:
    return [name for name, reason in backward_reasons(fn, q, k, v, out, dout, lse, target) if reason is None]
