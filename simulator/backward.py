"""The backward pass's schedule and predicted time: the same tile pairs, walked both ways.

The backward runs three kernels (codegen.backward): a preprocess (delta = rowsum(dO * O), a pass
over memory, left to the launch constant), a dK/dV kernel with one program per key tile walking the
query tiles that see it (the *transposed* visits, `counting.key_tile_stats`), and a dQ kernel with
one program per query tile walking its key tiles (the forward's visits, `counting.tile_stats`),
each with its own tiles, warps and stages. Each kernel is scheduled like the forward
(`CostModel.backward_kernel_us`); the backward's time is their sum.

The atomic-dQ backward (a config whose `atomic` is true) runs the dK/dV kernel only: each walked pair
does five products and adds its rows' dQ into a float32 buffer, a GQA group's heads on programs of
their own (adding dK/dV in float32 too). Its time is that kernel plus the buffers' passes over memory
(`atomic_pass_bytes`: zero-filled, then cast into the gradients).

The simulator cannot import codegen, so a backward config is anything with `.dkdv` and `.dq`
carrying `q_tile`, `kv_tile`, `num_warps` and `num_stages`, and optionally `atomic`
(codegen.config.BackwardConfig is one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from maskdsl.analysis.counts import products
from maskdsl.simulator.backward_work import BackwardWork
from maskdsl.simulator.cost import CostModel
from maskdsl.simulator.counting import key_tile_stats, tile_stats
from maskdsl.simulator.tiles import check_tile
from maskdsl.lang.parser import as_spec
from maskdsl.spec.ir import DTYPE_BYTES

KERNELS = ("dkdv", "dq")


def default_backward_launch(kernel: str, own: int, head_dim: int = 128) -> tuple[int, int]:
    """(num_warps, num_stages) of codegen's untuned backward kernel owning `own` tokens (its default
    BackwardConfig): two pipeline stages; 8 warps for a 128-token owned tile or a 128-wide dK/dV."""
    return (8 if own >= 128 or (kernel == "dkdv" and head_dim <= 64) else 4), 2


@dataclass(frozen=True)
class KernelConfigLike:
    """A backward kernel's config for callers without codegen: tiles as KernelConfig reads them
    (q_tile = the query tile, kv_tile = the key tile, whichever the program owns)."""

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    num_warps: int | None = None
    num_stages: int | None = None


@dataclass(frozen=True)
class BackwardPrediction:
    """Predicted backward of one config: each kernel's time, their sum and the dense SDPA backward.
    The atomic-dQ backward has no dQ kernel (`dq` None, `dq_ms` 0) and its buffers' passes (`pass_ms`)."""

    dkdv: BackwardWork
    dq: BackwardWork | None
    dkdv_ms: float
    dq_ms: float
    dense_ms: float | None  # the dense SDPA backward; None without its constant
    tiles: tuple = ()  # ((q_tile, kv_tile, warps, stages) of dK/dV, of dQ), for the label
    atomic: bool = False
    pass_ms: float = 0.0  # the atomic backward's float32 buffers: zero-fill and cast

    @property
    def ms(self) -> float:
        return self.dkdv_ms + self.dq_ms + self.pass_ms

    @property
    def speedup(self) -> float | None:
        return self.dense_ms / self.ms if self.dense_ms and self.ms else None

    def label(self) -> str:
        """The config's key (codegen.config.BackwardConfig.key)."""
        def one(q, k, warps, stages) -> str:
            return f"q{'x'.join(map(str, q))}_k{'x'.join(map(str, k))}_w{warps}_s{stages}"
        return f"bwd-{one(*self.tiles[0])}-{one(*self.tiles[1])}" + ("-atomic" if self.atomic else "")

    def to_dict(self) -> dict:
        return {"config": self.label(), "atomic": self.atomic, "dkdv_ms": self.dkdv_ms, "dq_ms": self.dq_ms,
                "pass_ms": self.pass_ms, "ms": self.ms, "dense_ms": self.dense_ms, "speedup": self.speedup,
                "dkdv_ctas_per_sm": self.dkdv.ctas_per_sm, "dq_ctas_per_sm": self.dq and self.dq.ctas_per_sm,
                "dkdv_programs": self.dkdv.programs, "dq_programs": self.dq.programs if self.dq else 0}


def _problem(spec, mask: str) -> tuple[int, int, int, int, int]:
    """(batch, heads, kv heads, head_dim, bytes per element) of the mask's attention statement (1 x 1 x 128 bf16
    without one)."""
    att = spec.attention_for(mask)
    if att is None:
        return 1, 1, 1, 128, DTYPE_BYTES["bf16"]
    return att.batch, att.heads, att.kv_heads, att.head_dim, DTYPE_BYTES[att.dtype]


def atomic_pass_bytes(spec, mask: str) -> tuple[int, int]:
    """(bytes, passes) of the atomic-dQ backward's memory passes (codegen.backward): its float32 dQ buffer
    [B, H, L, D] zero-filled (4 bytes an element), then read and cast into dQ (4 + the dtype's bytes); with
    a GQA group the float32 dK and dV buffers [B, H_kv, L, D] the same way."""
    spec = as_spec(spec)
    tokens = spec.mask(mask).layout.tokens
    batch, heads, kv_heads, head_dim, elem = _problem(spec, mask)
    per_buffer = 4 + 4 + elem  # zero-fill, read, write the gradient
    elements, passes = batch * heads * tokens * head_dim, 2
    if heads > kv_heads:
        elements += 2 * batch * kv_heads * tokens * head_dim
        passes += 4
    return elements * per_buffer, passes


def backward_work(spec, mask: str, kernel: str, q_tile, kv_tile, num_warps: int | None = None,
                  num_stages: int | None = None, permute: bool = True, atomic: bool = False) -> BackwardWork:
    """What one backward kernel launches: per program its full and partial walked tiles (exact counts).
    `atomic`: the dK/dV kernel of the atomic-dQ backward (five products per pair, one program per query head)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if atomic and kernel != "dkdv":
        raise ValueError("the atomic-dQ backward runs no dQ kernel; hint: predict its 'dkdv' kernel")
    spec = as_spec(spec)
    mdef = spec.mask(mask)
    if mdef.dynamic:
        raise ValueError(f"mask {mask!r} has a top-k term: the simulator predicts the backward of static masks")
    shape = mdef.layout.shape
    q_tile = check_tile(q_tile, shape, "q_tile")
    kv_tile = check_tile(kv_tile, shape, "kv_tile")
    batch, heads, kv_heads, head_dim, _ = _problem(spec, mask)
    union = len(products(mdef.expr, tuple(shape))) > 1  # several terms: every pair takes the predicate
    if kernel == "dkdv":
        visits, full = key_tile_stats(mdef.expr, shape, q_tile, kv_tile, permute)
        own, other, copies, group = math.prod(kv_tile), math.prod(q_tile), batch * kv_heads, heads // kv_heads
        if atomic:  # a GQA group's heads on programs of their own
            copies, group = batch * heads, 1
    else:
        stats = tile_stats(mdef.expr, shape, q_tile, kv_tile, permute)
        visits = stats.visits
        full = stats.full if stats.kernel_full is None else stats.kernel_full
        own, other, copies, group = math.prod(q_tile), math.prod(kv_tile), batch * heads, 1
    if union:
        full = np.zeros_like(visits)
    warps, stages = default_backward_launch(kernel, own, head_dim)
    return BackwardWork(kernel, np.asarray(full), np.asarray(visits - full), own, other, head_dim,
                        num_warps or warps, num_stages or stages, copies, group, atomic, atomic and heads > kv_heads)


def _model(gpu, costs) -> CostModel:
    return costs if isinstance(costs, CostModel) else CostModel.for_gpu(gpu, costs)


def predict_kernel(spec, mask: str, kernel: str, q_tile, kv_tile, num_warps: int | None = None,
                   num_stages: int | None = None, gpu: str | None = None, costs=None,
                   atomic: bool = False) -> float | None:
    """Predicted ms of one backward kernel with this config; None until the GPU's backward (with `atomic`,
    the atomic-dQ dK/dV kernel's) is calibrated. The atomic backward's buffer passes are not the kernel's:
    they are the same for every config (`simulate_backward` adds them)."""
    model = _model(gpu, costs)
    if not (model.atomic_backward_calibrated if atomic else model.backward_calibrated):
        return None
    work = backward_work(spec, mask, kernel, q_tile, kv_tile, num_warps, num_stages, atomic=atomic)
    return model.backward_kernel_us(work) / 1000.0


def simulate_backward(spec, mask: str, config=None, q_tile=None, kv_tile=None, gpu: str | None = None,
                      costs=None, permute: bool = True, atomic: bool | None = None) -> BackwardPrediction | None:
    """The predicted backward of `config` (a BackwardConfig or alike); without one, both kernels take
    the forward's `q_tile` / `kv_tile` with codegen's untuned warps and stages. `atomic` (default: the
    config's `atomic`, else False) predicts the atomic-dQ backward. None until calibrated (for the
    atomic backward, until its `bwd_atomic_us` is)."""
    model = _model(gpu, costs)
    if atomic is None:
        atomic = bool(getattr(config, "atomic", False))
    if not (model.atomic_backward_calibrated if atomic else model.backward_calibrated):
        return None
    if config is None:
        if q_tile is None:
            raise ValueError("simulate_backward needs a backward config or the tiles; hint: pass q_tile/kv_tile")
        tiles = KernelConfigLike(tuple(q_tile), tuple(kv_tile or q_tile))
        kernels = (tiles, tiles)
    else:
        kernels = (config.dkdv, config.dq)
    works = [backward_work(spec, mask, name, c.q_tile, c.kv_tile, c.num_warps, c.num_stages, permute, atomic)
             for name, c in zip(KERNELS[:1] if atomic else KERNELS, kernels)]
    dkdv_us = model.backward_kernel_us(works[0])
    dq_us = 0.0 if atomic else model.backward_kernel_us(works[1])
    pass_us = model.memory_pass_us(*atomic_pass_bytes(spec, mask)) if atomic else 0.0
    spec = as_spec(spec)
    tokens = spec.mask(mask).layout.tokens
    att = spec.attention_for(mask)
    dense = model.dense_backward_us(tokens, (att.batch * att.heads) if att else 1, att.head_dim if att else 128)
    launches = []
    for name, c, w in zip(KERNELS, kernels, works + [None]):
        if w is None:  # the atomic backward's unused dQ config: its key as codegen resolves it
            own = math.prod(c.q_tile)
            warps, stages = default_backward_launch(name, own, works[0].head_dim)
            w = KernelConfigLike(c.q_tile, c.kv_tile, c.num_warps or warps, c.num_stages or stages)
        launches.append((tuple(c.q_tile), tuple(c.kv_tile), w.num_warps, w.num_stages))
    return BackwardPrediction(works[0], None if atomic else works[1], dkdv_us / 1000.0, dq_us / 1000.0,
                              None if dense is None else dense / 1000.0, tuple(launches), atomic, pass_us / 1000.0)
