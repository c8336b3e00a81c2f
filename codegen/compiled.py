"""`maskdsl.compile`: a mask spec becomes a callable attention, registered as a PyTorch custom op.

Static masks need no per-call work besides the launch: the loop bounds live in the kernel.
The call goes through `torch.ops.maskdsl.attention`, so `torch.compile` sees one opaque op
(no graph break) and a fake implementation gives it shapes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from maskdsl.codegen import dispatch
from maskdsl.codegen.checks import check_call, check_out_lse, check_qkv
from maskdsl.spec.limits import padded_head_dim
from maskdsl.codegen.config import BackwardConfig, KernelConfig, default_backward_config
from maskdsl.codegen.plan import KernelPlan
from maskdsl.codegen.segment import Segment, segment, tile_run, whole
from maskdsl.spec import ir

_REGISTRY: dict[str, "CompiledAttention"] = {}


class CompiledAttention:
    """A compiled mask: call it as `fn(q, k, v, scale=None, return_lse=False)`.

    q is [B, H, L, D], k and v [B, H_kv, L, D] in the grid's row-major token order; the output
    is [B, H, L, D] in q's dtype, and the log-sum-exp [B, H, L] in float32 when asked for.
    """

    def __init__(self, mask: ir.MaskDef, plan: KernelPlan, module, source_path: Path,
                 backward_config: BackwardConfig | None = None):
        self.mask = mask
        self.plan = plan
        self.config = plan.config
        self.module = module
        self.source_path = source_path
        self.backward_config = backward_config
        self._backward = None
        self._gluon = None
        self._checked: set = set()  # tensor signatures whose checks passed (`_check`)
        self._forwards: dict = {}  # tensor signature -> the forward that runs it (`_forward`)
        self.key = f"{mask.content_hash()}:{plan.config.key()}"
        if backward_config is not None:
            self.key += f":{backward_config.key()}"
        _REGISTRY[self.key] = self

    @property
    def pads_head_dim(self) -> bool:
        """Whether the kernels take any head_dim `checks.head_dim_error` allows (padded inside to a
        power of two): the static ones do; the top-k ones take powers of two until they pad too."""
        return not self.mask.dynamic

    @property
    def source(self) -> str:
        """The source the kernel was executed from (verified in memory; the cache file may have changed since)."""
        return getattr(self.module, "__maskdsl_source__", None) or self.source_path.read_text()

    def __repr__(self) -> str:
        return f"CompiledAttention({self.mask.name} = {self.mask.expr.fmt()}, {self.config.key()})"

    def __call__(self, q, k, v, scale: float | None = None, return_lse: bool = False, out=None, documents=None,
                 prefix=None):
        if documents is not None or prefix is not None:  # only `document & ...` masks take them (codegen.documents)
            raise ValueError(f"mask {self.mask.name!r} has no `document` term, so documents=/prefix= mean nothing "
                             "to it; write `document & (...)` to make the mask per document")
        self._check(q, k, v, scale)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        if out is not None:  # writes into a caller's buffer (tests poison it first)
            lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
            self.launch(q, k, v, scale, out, lse)
            return (out, lse) if return_lse else out
        if torch.compiler.is_compiling():  # torch.compile sees the one opaque custom op
            o, lse = torch.ops.maskdsl.attention(q, k, v, self.key, scale)
        else:  # eager: the same kernels and gradient formula without the custom-op dispatcher's host time
            o, lse = _EagerAttention.apply(q, k, v, self, scale)
        return (o, lse) if return_lse else o

    def _check(self, q, k, v, scale) -> None:
        """check_qkv and check_call, run once per tensor signature (they read only shapes, strides, dtypes
        and devices): a warm call pays a dictionary lookup, not the checks."""
        try:
            sig = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
                   q.device, k.device, v.device)
        except AttributeError:  # not tensors: the checks say what is wrong
            sig = None
        if sig is None or sig not in self._checked:
            check_qkv(q, k, v, self.mask.layout.tokens, self.mask.layout.name, self.pads_head_dim)
            check_call(q, k, None)
            if len(self._checked) > 64:
                self._checked.clear()
            self._checked.add(sig)
        if scale is not None:
            check_call(q, k, scale)

    def decode(self, q, k_cache, v_cache, cache_seqlens, page_table=None, **kwargs):
        """The new tokens q [B, H, q_len <= 16, D] against a KV cache that already holds them (docs/SERVING.md:
        contiguous [B, H_kv, max_len, D] or paged [pages, H_kv, page_size, D] with `page_table`)."""
        from maskdsl.codegen.decode import decode_call

        return decode_call(self.key, self.mask, q, k_cache, v_cache, cache_seqlens, page_table, **kwargs)

    @property
    def gluon_schedule(self):
        """The Gluon forward's schedule and tables for this mask (maskdsl.analysis.gluon_rule), computed on first use."""
        if self._gluon is None:
            from maskdsl.codegen.gluon_plan import GluonSchedule

            self._gluon = GluonSchedule.of(self.plan)
        return self._gluon

    def gluon_blocker(self, q, k=None, v=None, out=None, lse=None) -> str | None:
        """Why `launch` runs the Triton template instead of the Gluon forward for these tensors, or None
        (`codegen.dispatch.can_run_gluon`, which states the rule). k, v and out default to q's layout,
        lse to the one the op allocates."""
        return dispatch.can_run_gluon(self, q, k, v, out, lse)

    def gluon_ok(self, q, k=None, v=None, out=None, lse=None) -> bool:
        """Whether `launch` takes the Gluon forward for these tensors (`gluon_blocker` says why not)."""
        return self.gluon_blocker(q, k, v, out, lse) is None

    def launch(self, q, k, v, scale, out, lse, tiles: range | None = None) -> None:
        """Run the kernel into `out`/`lse`; `tiles` limits it to a range of query tiles (a slice to check).

        The forward is `codegen.dispatch.choose_forward`'s; a slice always runs the template, whose
        tiles it counts in.
        """
        check_out_lse(q, out, lse)
        self._run(q, k, v, scale, out, lse, tiles)

    def _run(self, q, k, v, scale, out, lse, tiles: range | None = None) -> None:
        """`launch` after its checks (the eager op allocates out and lse itself, as the checks want them)."""
        if tiles is None and self._forward(q, k, v, out, lse) == "gluon":
            self._launch_gluon(q, k, v, scale, out, lse)
            return
        self._launch(q, k, v, scale, out, lse, whole(self.plan.shape), tiles or range(self.plan.q_tiles))

    def _forward(self, q, k, v, out, lse) -> str:
        """`dispatch.choose_forward`, remembered per signature of what it reads: the tensors' shapes,
        strides, dtypes, devices and 16-byte alignment, and the switches in the environment."""
        sig = tuple((t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16) for t in (q, k, v, out)) + (
            lse.is_contiguous(), lse.dtype, os.environ.get("MASKDSL_GLUON"), os.environ.get("MASKDSL_TMA"))
        name = self._forwards.get(sig)
        if name is None:
            name = dispatch.choose_forward(self, q, k, v, out, lse)
            if len(self._forwards) > 64:
                self._forwards.clear()
            self._forwards[sig] = name
        return name

    @property
    def frame_tiles(self) -> tuple[int, int]:
        """(query tile, key tile) extents along dimension 0: a segment's chunk starts on a multiple
        of the first and its buffer on a multiple of the second (codegen.segment)."""
        return self.config.q_tile[0], self.config.kv_tile[0]

    def segment(self, q_frames, k_frames, q_tile: int, kv_tile: int) -> Segment:
        """A checked segment of this mask's grid, for kernels with these tiles along dimension 0."""
        return segment(self.plan.shape, self.plan.dims[0].dilation, q_frames, k_frames, q_tile, kv_tile)

    def check_segment(self, seg: Segment, q, k, v) -> None:
        check_qkv(q, k, v, seg.q_rows, self.mask.layout.name, self.pads_head_dim, seg.k_rows,
                  ((seg.q0, seg.q1), (seg.k0, seg.k1)))

    def launch_segment(self, q, k, v, scale: float, out, lse, q_frames: tuple[int, int],
                       k_frames: tuple[int, int]) -> None:
        """out, lse <- attention of the queries of frames [qa, qb) over the keys of frames [ka, kb) only.

        q and out hold the chunk's rows ([B, H, (qb - qa) * inner, D]), k and v the buffer's, lse is
        float32 [B, H, (qb - qa) * inner]; the mask is the grid's. A row with no key in the buffer
        gets out 0 and lse -inf. Frames lie on `frame_tiles` boundaries (or the grid's end).
        """
        seg = self.segment(q_frames, k_frames, *self.frame_tiles)
        self.check_segment(seg, q, k, v)
        check_out_lse(q, out, lse)
        if self._gluon_segment(q, k, v, float(scale), out, lse, seg):
            return
        tiles = tile_run(seg.q_frames, self.config.q_tile[0], self.plan.dims[0].q_tiles, self.plan.q_tiles,
                         self.plan.shape[0])
        self._launch(q, k, v, float(scale), out, lse, seg, tiles)

    def _gluon_segment(self, q, k, v, scale: float, out, lse, seg: Segment) -> bool:
        """Run a 1-D segment on the Gluon forward's predicated mode when the whole grid takes it
        (gluon_rule's "runs" mode: the grid's row intervals cut to the buffer); False where the template must."""
        if self.plan.rank != 1 or self.gluon_schedule.bounds is None:
            return False
        if dispatch.tensor_blocker(q, k, v, out, lse) is not None:
            return False
        table, idle_rows, bounds, r = self.gluon_schedule.segment((seg.q0, seg.q1), (seg.k0, seg.k1), q.device)
        if not r.ok:
            return False
        from maskdsl.codegen import gluon_fwd

        if len(idle_rows):
            out.index_fill_(2, idle_rows, 0.0)
            lse.index_fill_(2, idle_rows, float("-inf"))
        gluon_fwd.launch(q, k, v, out, lse, scale, table, 0, len(table), r.shape, r.q_tile, r.kv_tile, r.mode,
                         bounds=bounds, long=r.long, k_grid=(1, 1, k.shape[2]))
        return True

    def _launch(self, q, k, v, scale: float, out, lse, seg: Segment, tiles: range) -> None:
        q0, q1, k0, k1 = seg.args
        launch_kernel(self.module.attention_fwd, self.config, q, k, v, out, lse, (), scale, tiles,
                      {**tma_descriptors(self.plan, q, k, v, out, seg), "HEAD_DIM_PAD": padded_head_dim(q.shape[-1]),
                       "q_frame0": q0, "q_frame1": q1, "k_frame0": k0, "k_frame1": k1})

    def _launch_gluon(self, q, k, v, scale, out, lse) -> None:
        from maskdsl.codegen import gluon_fwd

        table, idle_rows, bounds = self.gluon_schedule.on(q.device)
        if len(idle_rows):  # query tiles that see no key: output 0 and LSE -inf, as the template writes them
            out.index_fill_(2, idle_rows, 0.0)
            lse.index_fill_(2, idle_rows, float("-inf"))
        r = self.gluon_schedule.ranges
        items = len(table) * q.shape[0] * q.shape[1]
        per = self.gluon_schedule.items_per_program(items, dispatch.sm_count(q.device))
        gluon_fwd.launch(q, k, v, out, lse, scale, table, 0, len(table), r.shape, r.q_tile, r.kv_tile, r.mode,
                         bounds=bounds, long=r.long, per=per)

    def backward_kernels(self, head_dim: int = 128):
        """The rendered backward (codegen.backward), built on the first gradient, not at compile time."""
        if self._backward is None:
            from maskdsl.codegen.backward import BackwardKernels

            config = self.backward_config or default_backward_config(self.mask, head_dim)
            self._backward = BackwardKernels(self.mask, config)
        return self._backward

    def launch_backward(self, q, k, v, out, lse, dout, scale, dq, dk, dv) -> None:
        """dq, dk, dv (pre-allocated, shaped like q, k, v) <- the gradients for dout; `lse` is the forward's.

        The interface `maskdsl::attention_backward` dispatches to (top-k kernels implement it too).
        The backward is `codegen.dispatch.choose_backward`'s.
        """
        if dispatch.choose_backward(self, q, k, v, out, dout, lse) == "gluon":
            from maskdsl.codegen import gluon_bwd

            gluon_bwd.gluon_backward(q, k, v, out, lse, dout, scale, dq, dk, dv, self.gluon_backward_schedule)
            return
        self.backward_kernels(q.shape[-1]).launch(q, k, v, out, lse, dout, scale, dq, dk, dv)

    @property
    def gluon_backward_schedule(self):
        """The Gluon backward's transposed whole-tile schedule (codegen.gluon_bwd_plan), computed on first use."""
        if getattr(self, "_gluon_bwd", None) is None:
            from maskdsl.codegen.gluon_bwd_plan import GluonBackwardSchedule

            self._gluon_bwd = GluonBackwardSchedule(self.gluon_schedule.ranges)
        return self._gluon_bwd

    def backward_frame_tiles(self, head_dim: int = 128) -> tuple[int, int]:
        """(query, key) frame alignment of a backward segment: the lcm of the backward kernels' query
        tiles and of their key tiles along dimension 0 (codegen.backward.BackwardKernels.frame_tiles).
        A chunk and buffer that serve the forward too align to lcm(this, `frame_tiles`)."""
        return self.backward_kernels(head_dim).frame_tiles

    def launch_backward_segment(self, q, k, v, out, lse, dout, scale: float, dq, dk, dv,
                                q_frames: tuple[int, int], k_frames: tuple[int, int]) -> None:
        """One segment's gradients: dq <- this buffer's part of the chunk's dQ, dk, dv <- the chunk's
        part of the buffer's dK, dV (written, not accumulated).

        q, out, dout, dq hold the chunk's rows, k, v, dk, dv the buffer's (as `launch_segment`); out and
        lse are the chunk's final output and log-sum-exp, merged over all its buffers. Summing dq over
        the buffers gives dQ, summing dk, dv over the chunks gives dK, dV.
        """
        kernels = self.backward_kernels(q.shape[-1])
        seg = self.segment(q_frames, k_frames, *kernels.frame_tiles)
        self.check_segment(seg, q, k, v)
        check_out_lse(q, out, lse, lse_written=False)
        kernels.launch(q, k, v, out, lse, dout, float(scale), dq, dk, dv, seg)


def tma_descriptors(plan: KernelPlan, q, k, v, out, seg: Segment | None = None) -> dict:
    """Copy-engine (TMA) descriptors for Q, K, V and O when the layout allows them, else the pointer path.

    A descriptor addresses a tile as a box of the grid: [batch x head, n_0, .., n_r-1, head_dim];
    `codegen.dispatch.tma_blocker` says when the layout allows one. Anything else keeps the pointer
    loads, which read any strides. A segment's tensors hold its frames of dimension 0 only (the
    kernel subtracts its first frame).
    """
    if dispatch.tma_blocker(plan, q, k, v, out) is not None:
        return {"desc_q": None, "desc_k": None, "desc_v": None, "desc_o": None, "TMA": False}
    from triton.tools.tensor_descriptor import TensorDescriptor

    cfg = plan.config
    seg = seg or whole(plan.shape)
    q_shape, k_shape = (seg.q1 - seg.q0, *plan.shape[1:]), (seg.k1 - seg.k0, *plan.shape[1:])
    descs = {}
    for name, t, tile, shape in (("desc_q", q, cfg.q_tile, q_shape), ("desc_k", k, cfg.kv_tile, k_shape),
                                 ("desc_v", v, cfg.kv_tile, k_shape), ("desc_o", out, cfg.q_tile, q_shape)):
        batch, heads = t.shape[:2]
        descs[name] = TensorDescriptor(t, [batch * heads, *shape, t.shape[-1]], dispatch.tma_strides(plan, t),
                                       [1, *tile, t.shape[-1]])
    return {**descs, "TMA": True}


def launch_kernel(kernel, config: KernelConfig, q, k, v, out, lse, extra: tuple, scale: float, tiles: range,
                  kwargs: dict | None = None) -> None:
    """One program per (query tile, batch x head); `extra` are the template's pointers after LSE and
    `kwargs` its keyword arguments (the static kernel's copy-engine descriptors)."""
    batch, heads = q.shape[:2]
    kernel[(len(tiles), batch * heads)](
        q, k, v, out, lse, *extra, scale * 1.4426950408889634,  # exp2-based softmax: scale by log2(e)
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, heads // k.shape[1], tiles.start,
        HEAD_DIM=q.shape[-1], STORE_LSE=True, DOT_F32=q.dtype == torch.bfloat16 and dispatch.interpreting(),
        num_warps=config.num_warps, num_stages=config.num_stages, **(kwargs or {}),
    )


@torch.library.custom_op("maskdsl::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: str,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _REGISTRY[key]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    fn.launch(q, k, v, scale, out, lse)
    return out, lse


@_attention_op.register_fake
def _(q, k, v, key, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("maskdsl::attention_backward", mutates_args=())
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           dout: torch.Tensor, key: str, scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if dout.stride(-1) != 1:  # autograd may hand an expanded gradient (stride 0)
        dout = dout.contiguous()
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    _REGISTRY[key].launch_backward(q, k, v, out, lse, dout, scale, dq, dk, dv)
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, key, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, key, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.key, ctx.scale = key, scale
    ctx.mark_non_differentiable(lse)  # the returned log-sum-exp is a constant for autograd


def _attention_grad(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.maskdsl.attention_backward(q, k, v, out, lse, dout, ctx.key, ctx.scale)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_attention_grad, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The custom op's forward and gradient for eager calls (`CompiledAttention.__call__`): the same
    launches, the same saved tensors, the log-sum-exp non-differentiable; only the dispatcher is skipped."""

    @staticmethod
    def forward(ctx, q, k, v, fn, scale):
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        fn._run(q, k, v, scale, out, lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.fn, ctx.scale = fn, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
        ctx.fn.launch_backward(q, k, v, out, lse, dout, ctx.scale, dq, dk, dv)
        return dq, dk, dv, None, None
