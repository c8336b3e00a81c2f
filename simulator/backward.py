"""The backward pass's schedule and predicted time: the same tile pairs, walked both ways.

The backward runs three kernels (codegen.backward): a preprocess (delta = rowsum(dO * O), a pass
over memory, left to the launch constant), a dK/dV kernel with one program per key tile walking the
query tiles that see it (the *transposed* visits, `counting.key_tile_stats`), and a dQ kernel with
one program per query tile walking its key tiles (the forward's visits, `counting.tile_stats`),
each with its own tiles, warps and stages. Each kernel is scheduled like the forward
(`CostModel.backward_kernel_us`); the backward's time is their sum.

The simulator cannot import codegen, so a backward config is anything with `.dkdv` and `.dq`
carrying `q_tile`, `kv_tile`, `num_warps` and `num_stages` (codegen.config.BackwardConfig is one).
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
    """Predicted backward of one config: each kernel's time, their sum and the dense SDPA backward."""

    dkdv: BackwardWork
    dq: BackwardWork
    dkdv_ms: float
    dq_ms: float
    dense_ms: float | None  # the dense SDPA backward; None without its constant
    tiles: tuple = ()  # ((q_tile, kv_tile) of dK/dV, of dQ), for the label

    @property
    def ms(self) -> float:
        return self.dkdv_ms + self.dq_ms

    @property
    def speedup(self) -> float | None:
        return self.dense_ms / self.ms if self.dense_ms and self.ms else None

    def label(self) -> str:
        def one(w: BackwardWork, q, k) -> str:
            return f"q{'x'.join(map(str, q))}_k{'x'.join(map(str, k))}_w{w.num_warps}_s{w.num_stages}"
        return f"bwd-{one(self.dkdv, *self.tiles[0])}-{one(self.dq, *self.tiles[1])}"

    def to_dict(self) -> dict:
        return {"config": self.label(), "dkdv_ms": self.dkdv_ms, "dq_ms": self.dq_ms, "ms": self.ms,
                "dense_ms": self.dense_ms, "speedup": self.speedup,
                "dkdv_ctas_per_sm": self.dkdv.ctas_per_sm, "dq_ctas_per_sm": self.dq.ctas_per_sm,
                "dkdv_programs": self.dkdv.programs, "dq_programs": self.dq.programs}


def backward_work(spec, mask: str, kernel: str, q_tile, kv_tile, num_warps: int | None = None,
                  num_stages: int | None = None, permute: bool = True) -> BackwardWork:
    """What one backward kernel launches: per program its full and partial walked tiles (exact counts)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    spec = as_spec(spec)
    mdef = spec.mask(mask)
    if mdef.dynamic:
        raise ValueError(f"mask {mask!r} has a top-k term: the simulator predicts the backward of static masks")
    shape = mdef.layout.shape
    q_tile = check_tile(q_tile, shape, "q_tile")
    kv_tile = check_tile(kv_tile, shape, "kv_tile")
    att = spec.attention_for(mask)
    batch, heads, kv_heads, head_dim = (att.batch, att.heads, att.kv_heads, att.head_dim) if att else (1, 1, 1, 128)
    union = len(products(mdef.expr, tuple(shape))) > 1  # several terms: every pair takes the predicate
    if kernel == "dkdv":
        visits, full = key_tile_stats(mdef.expr, shape, q_tile, kv_tile, permute)
        own, other, copies, group = math.prod(kv_tile), math.prod(q_tile), batch * kv_heads, heads // kv_heads
    else:
        stats = tile_stats(mdef.expr, shape, q_tile, kv_tile, permute)
        visits = stats.visits
        full = stats.full if stats.kernel_full is None else stats.kernel_full
        own, other, copies, group = math.prod(q_tile), math.prod(kv_tile), batch * heads, 1
    if union:
        full = np.zeros_like(visits)
    warps, stages = default_backward_launch(kernel, own, head_dim)
    return BackwardWork(kernel, np.asarray(full), np.asarray(visits - full), own, other, head_dim,
                        num_warps or warps, num_stages or stages, copies, group)


def _model(gpu, costs) -> CostModel:
    return costs if isinstance(costs, CostModel) else CostModel.for_gpu(gpu, costs)


def predict_kernel(spec, mask: str, kernel: str, q_tile, kv_tile, num_warps: int | None = None,
                   num_stages: int | None = None, gpu: str | None = None, costs=None) -> float | None:
    """Predicted ms of one backward kernel with this config; None until the GPU's backward is calibrated."""
    model = _model(gpu, costs)
    if not model.backward_calibrated:
        return None
    us = model.backward_kernel_us(backward_work(spec, mask, kernel, q_tile, kv_tile, num_warps, num_stages))
    return us / 1000.0


def simulate_backward(spec, mask: str, config=None, q_tile=None, kv_tile=None, gpu: str | None = None,
                      costs=None, permute: bool = True) -> BackwardPrediction | None:
    """The predicted backward of `config` (a BackwardConfig or alike); without one, both kernels take
    the forward's `q_tile` / `kv_tile` with codegen's untuned warps and stages. None until calibrated."""
    model = _model(gpu, costs)
    if not model.backward_calibrated:
        return None
    if config is None:
        if q_tile is None:
            raise ValueError("simulate_backward needs a backward config or the tiles; hint: pass q_tile/kv_tile")
        tiles = KernelConfigLike(tuple(q_tile), tuple(kv_tile or q_tile))
        kernels = (tiles, tiles)
    else:
        kernels = (config.dkdv, config.dq)
    works = [backward_work(spec, mask, name, c.q_tile, c.kv_tile, c.num_warps, c.num_stages, permute)
             for name, c in zip(KERNELS, kernels)]
    dkdv_us, dq_us = (model.backward_kernel_us(w) for w in works)
    spec = as_spec(spec)
    tokens = spec.mask(mask).layout.tokens
    att = spec.attention_for(mask)
    dense = model.dense_backward_us(tokens, (att.batch * att.heads) if att else 1, att.head_dim if att else 128)
    return BackwardPrediction(works[0], works[1], dkdv_us / 1000.0, dq_us / 1000.0,
                              None if dense is None else dense / 1000.0,
                              ((tuple(kernels[0].q_tile), tuple(kernels[0].kv_tile)),
                               (tuple(kernels[1].q_tile), tuple(kernels[1].kv_tile))))
