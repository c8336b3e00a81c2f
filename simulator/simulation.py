"""`simulate`: what a tiled attention kernel will do for one mask and one tile configuration.

Counts are exact (``simulator.counting``); the speedups follow GNA's definitions:

* upper bound = dense tiles / visited tiles (a kernel that skips empty tiles for free and pays
  for every visited tile as for a dense one can go no faster);
* FLOP-ideal = 1 / density (what a kernel that computed only attended pairs would reach);
* perfectly block-sparse = no visited tile needs the mask (then the two bounds agree when the
  tiles divide the grid);
* worst-tile speedup = key tiles / the most key tiles any query tile visits: the GNA paper's
  simulator bound (its Table/figures' "speedup upper bound"), which assumes the slowest query
  tile is the critical path. Key tiles are counted on the padded tile grid (ceil per dimension)
  and a key tile is visited when it intersects the query tile's key range; that definition
  reproduces the paper's published values (tests/test_simulator_paper_bound.py).

The calibrated prediction (``simulator.cost``) adds what the bounds leave out: the per-CTA fixed
cost, occupancy and waves, launch-order imbalance, ragged and union tiles, and a dense baseline
that is the dense SDPA kernel itself.

Top-k masks depend on the data. The simulator then reports expectations (``expected=True``):
each query tile is taken to pick k * ceil(block / V_k) key tiles uniformly at random among those
the rest of the expression allows (the "envelope": the expression with top-k read as `full`),
on top of the exact static part (top-k read as the empty mask). With nothing else restricting
it, the density this gives is the static density plus k / key_blocks of the rest.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from maskdsl.spec import ir
from maskdsl.analysis.counts import NotAnalyzable
from maskdsl.analysis.row_runs import dispatch_order
from maskdsl.analysis.gluon_rule import TILE as GLUON_TILE
from maskdsl.simulator.cost import CostModel, KernelWork
from maskdsl.simulator.backward import BackwardPrediction, simulate_backward
from maskdsl.simulator.counting import TileStats, tile_stats
from maskdsl.simulator.gluon import gluon_plan
from maskdsl.simulator.selection import SelectionWork, selection_work
from maskdsl.simulator.tiles import check_tile
from maskdsl.lang.parser import as_spec


@dataclass(frozen=True)
class SimResult:
    """The tile schedule of one configuration, its bounds, and the calibrated prediction."""

    mask: str
    shape: tuple[int, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    permute: bool
    q_tiles: int
    kv_tiles: int
    dense_tiles: int
    visited_tiles: float  # an int unless `expected` (top-k)
    full_tiles: float
    partial_tiles: float
    attended_pairs: float  # useful work: attended (query, key) pairs
    executed_pairs: int  # work a kernel does: visited tiles x padded tile volumes
    density: float
    upper_bound_speedup: float
    flop_ideal_speedup: float
    perfectly_block_sparse: bool
    max_visits: float  # key tiles visited by the busiest query tile
    mean_visits: float
    predicted_time: float  # cost-model units (one full 128x128 tile on one SM)
    predicted_dense_time: float  # the dense SDPA baseline, same units
    predicted_speedup: float
    predicted_ms: float | None
    gpu: str
    cost_source: str
    expected: bool = False  # True for top-k masks: the tile counts are expectations
    notes: tuple[str, ...] = ()
    worst_tile_speedup: float = math.nan  # GNA paper: kv_tiles / max_visits
    ctas_per_sm: int = 1  # CTAs of this config resident on one SM
    waves: float = 0.0  # CTAs / (SMs x CTAs per SM)
    num_warps: int = 0
    num_stages: int = 0
    union_kernel: bool = False  # the top-k loop runs every visited tile with the predicate
    gluon: bool = False  # the prediction is for Hopper's Gluon forward (simulator.gluon), not the template
    backward: "BackwardPrediction | None" = field(default=None, compare=False)  # simulate(backward=...)
    work: KernelWork = field(default=None, compare=False, repr=False)  # what the cost model scheduled
    visits_per_query_tile: np.ndarray = field(default=None, compare=False, repr=False)
    full_per_query_tile: np.ndarray = field(default=None, compare=False, repr=False)

    @property
    def config(self) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
        return self.q_tile, self.kv_tile, self.permute

    @property
    def predicted_fwd_bwd_ms(self) -> float | None:
        if self.backward is None or self.predicted_ms is None:
            return None
        return self.predicted_ms + self.backward.ms

    @property
    def predicted_fwd_bwd_speedup(self) -> float | None:
        """Dense SDPA forward + backward over ours, both predicted (None without the dense backward's constant)."""
        b = self.backward
        if b is None or b.dense_ms is None or self.predicted_ms is None:
            return None
        dense_fwd_ms = self.predicted_ms * self.predicted_speedup
        return (dense_fwd_ms + b.dense_ms) / (self.predicted_ms + b.ms)

    @property
    def imbalance(self) -> float:
        """Busiest query tile over the mean: 1.0 is perfectly balanced."""
        return self.max_visits / self.mean_visits if self.mean_visits else 1.0

    def to_dict(self) -> dict:
        """Plain JSON-able fields (per-query-tile arrays left out; they are long)."""
        out = {}
        for name in self.__dataclass_fields__:
            if name in ("visits_per_query_tile", "full_per_query_tile", "work"):
                continue
            if name == "backward":
                out[name] = None if self.backward is None else {
                    **self.backward.to_dict(), "fwd_bwd_ms": self.predicted_fwd_bwd_ms,
                    "fwd_bwd_speedup": self.predicted_fwd_bwd_speedup}
                continue
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        for name in ("upper_bound_speedup", "flop_ideal_speedup", "worst_tile_speedup"):
            if math.isinf(out[name]):
                out[name] = None  # JSON has no infinity: an empty mask
        return out


def simulate(spec, mask: str, q_tile, kv_tile=None, permute: bool = True, gpu: str | None = None,
             costs: CostModel | str | os.PathLike | None = None, num_warps: int | None = None,
             num_stages: int | None = None, backward=False) -> SimResult:
    """Simulate `mask` of `spec` (an ir.Spec or a path to a .mask file) with the given tiles.

    `kv_tile` defaults to `q_tile`. `gpu` names the cost constants (gpu_costs.json); `costs`
    is a CostModel or a JSON file of fitted constants overriding the built-in ones. Warps and
    stages (occupancy) default to codegen's untuned choice; batch, heads and head_dim come from
    the spec's `attention` statement for the mask. `backward` also predicts the backward pass
    (`SimResult.backward`, when the GPU's backward constants are known): True with this config's
    tiles for both backward kernels, or a backward config (`.dkdv`, `.dq`: codegen.config.BackwardConfig).
    """
    spec = as_spec(spec)
    mdef = spec.mask(mask)
    shape = mdef.layout.shape
    q_tile = check_tile(q_tile, shape, "q_tile")
    kv_tile = q_tile if kv_tile is None else check_tile(kv_tile, shape, "kv_tile")
    if not isinstance(permute, bool):
        raise ValueError(f"permute must be True or False, got {permute!r}")
    model = costs if isinstance(costs, CostModel) else CostModel.for_gpu(gpu, costs)
    att = spec.attention_for(mask)
    copies = att.batch * att.heads if att else 1
    head_dim = att.head_dim if att else 128
    try:
        if mdef.dynamic:
            stats, visits, full, pairs, notes = _topk(mdef.expr, shape, q_tile, kv_tile, permute)
        else:
            stats = tile_stats(mdef.expr, shape, q_tile, kv_tile, permute)
            visits, full, pairs, notes = stats.visits, stats.full, stats.attended, ()
    except NotAnalyzable as exc:
        hint = "; hint: simulate the row-major layout with permute=False (--no-permute)" if permute else ""
        raise NotAnalyzable(f"mask {mask!r}: {exc}{hint}") from None
    # top-k runs every visited tile through its predicate loop; a static union runs its dominant term like a
    # single term (full tiles unmasked, codegen.plan) and its other terms' boxes masked: full/partial as one term
    union_kernel = mdef.dynamic
    kernel_full = full if stats.kernel_full is None or mdef.dynamic else stats.kernel_full
    zero = np.zeros(len(visits))
    if union_kernel:
        work = KernelWork(zero, zero, visits, math.prod(q_tile), math.prod(kv_tile), head_dim, num_warps,
                          num_stages, copies, _selection(mdef.expr, shape, att),
                          pipelined=_topk_pipelined(mdef.expr, shape, kv_tile))
    else:
        work = KernelWork(kernel_full, visits - kernel_full, zero, math.prod(q_tile), math.prod(kv_tile), head_dim,
                          num_warps, num_stages, copies,
                          gluon_work=_gluon_work(mdef.expr, shape, q_tile, kv_tile, permute, att, copies, stats))
    prediction = None
    if backward is not False and backward is not None and not mdef.dynamic:
        prediction = simulate_backward(spec, mask, None if backward is True else backward, q_tile, kv_tile,
                                       costs=model, permute=permute)
    return _result(mdef.name, shape, q_tile, kv_tile, permute, stats, visits, full, pairs, model, work,
                   mdef.dynamic, notes, prediction)


def _gluon_work(expr, shape, q_tile, kv_tile, permute, att, copies, stats: TileStats) -> KernelWork | None:
    """The call's launch on Hopper's Gluon forward when the mask qualifies (`simulator.gluon`), else None:
    every visited tile full at the kernel's 128-token tiles, so one column of full tiles per busy query tile."""
    head_dim = att.head_dim if att else 128
    plan = gluon_plan(expr, shape, q_tile, kv_tile, permute, head_dim, att.dtype if att else "bf16")
    if not plan.eligible:
        return None
    same = (plan.q_tile, plan.kv_tile) == (tuple(q_tile), tuple(kv_tile))
    kstats = stats if same else tile_stats(expr, shape, plan.q_tile, plan.kv_tile, True)
    visits = np.asarray(kstats.visits)
    busy = visits > 0  # the kernel's grid walks the busy query tiles only
    zero = np.zeros(int(busy.sum()))
    if plan.predicated and any(n > 1 for n in shape[:-1]):  # boxes: the tiles not full in some dimension masked
        full = np.asarray(kstats.full if kstats.kernel_full is None else kstats.kernel_full)[busy]
        return KernelWork(full, visits[busy] - full, zero, GLUON_TILE, GLUON_TILE, head_dim, copies=copies,
                          gluon=True)  # dispatched in tile order (the "boxes" mode's table)
    order, long = dispatch_order(visits[busy]) if plan.predicated else (None, 0)  # the whole-tile mode: tile order
    return KernelWork(visits[busy], zero, zero, GLUON_TILE, GLUON_TILE, head_dim, copies=copies, gluon=True,
                      order=order, long=long)


def _result(name, shape, q_tile, kv_tile, permute, stats: TileStats, visits, full, pairs, model: CostModel,
            work: KernelWork, expected, notes, backward=None) -> SimResult:
    tokens = math.prod(shape)
    vq, vk = math.prod(q_tile), math.prod(kv_tile)
    nq, nk = stats.q_tiles, stats.k_tiles
    visited = _num(visits.sum())
    full_tiles = _num(full.sum())
    partial = _num(visited - full_tiles)
    density = float(pairs) / tokens**2
    sched = model.schedule(work)
    dense = model.dense_schedule(tokens, work.copies, work.head_dim, nq, nk, vq, vk)
    time, dense_time = sched.time, dense.time
    warps, stages = work.launch()
    max_visits = _num(visits.max()) if nq else 0
    gluon = model.kernel_work(work).gluon
    if gluon:
        notes = notes + ("predicted for the Gluon forward (at 128x128 tiles: every visited tile full and one box "
                         "per query tile; on a 1-D order the rule's predicated runs mode, on a grid "
                         "the per-dimension predicate of its boxes mode): its 128-token tiles, whatever "
                         "the config's on a 1-D order",)
    elif work.gluon_work is not None:
        notes = notes + (f"the mask qualifies for Hopper's Gluon forward, but {model.name}'s constants do not "
                         "model it: predicted for the Triton template",)
    if model.placeholder:
        notes = notes + (f"predicted speedup uses PLACEHOLDER constants for {model.name}; "
                         "replace them with device measurements",)
    return SimResult(
        mask=name, shape=tuple(shape), q_tile=q_tile, kv_tile=kv_tile, permute=permute,
        q_tiles=nq, kv_tiles=nk, dense_tiles=nq * nk,
        visited_tiles=visited, full_tiles=full_tiles, partial_tiles=partial,
        attended_pairs=_num(pairs), executed_pairs=int(round(visited * vq * vk)), density=density,
        upper_bound_speedup=nq * nk / visited if visited else math.inf,
        flop_ideal_speedup=1.0 / density if density else math.inf,
        perfectly_block_sparse=bool(partial == 0),
        max_visits=max_visits, mean_visits=float(visits.mean()) if nq else 0.0,
        predicted_time=time, predicted_dense_time=dense_time,
        predicted_speedup=dense_time / time if time else math.inf,
        predicted_ms=time * model.tile_us / 1000.0 if model.tile_us else None,
        gpu=model.name, cost_source=model.source, expected=expected, notes=tuple(notes),
        visits_per_query_tile=np.asarray(visits), full_per_query_tile=np.asarray(full),
        worst_tile_speedup=nk / max_visits if max_visits else math.inf,
        ctas_per_sm=sched.ctas_per_sm, waves=sched.waves, num_warps=warps, num_stages=stages,
        union_kernel=bool(work.union.any()), gluon=gluon, backward=backward, work=work,
    )


def _num(x):
    """Exact counts stay ints; expectations (top-k) stay floats."""
    return float(x) if isinstance(x, (float, np.floating)) else int(x)


# --- top-k: expectations around the exact static part -------------------------------------------

def _replace_topk(expr: ir.MaskExpr, as_full: bool) -> ir.MaskExpr | None:
    """The expression with every top-k term read as `full` (as_full) or as the empty mask (None)."""
    if isinstance(expr, ir.TopK):
        return ir.Full() if as_full else None
    if isinstance(expr, ir.Union_):
        kept = [p for t in expr.terms if (p := _replace_topk(t, as_full)) is not None]
        return ir.union(*kept) if kept else None
    if isinstance(expr, ir.Intersection):
        parts = [_replace_topk(t, as_full) for t in expr.terms]
        return None if any(p is None for p in parts) else ir.intersection(*parts)
    return expr


def _selection(expr, shape, att) -> SelectionWork:
    """The top-k call's selection pass (one top-k term: codegen.topk.forward's normal form has one)."""
    node = next(n for n in ir.walk(expr) if isinstance(n, ir.TopK))
    if att is None:
        return selection_work(shape, node.block)
    return selection_work(shape, node.block, att.batch, att.heads, att.kv_heads, att.head_dim, att.dtype)


def _topk_pipelined(expr, shape, kv_tile) -> bool:
    """Whether the top-k kernel walks its picked tiles in a pipelined loop: codegen.topk.forward's fast loop, taken
    when nothing but the picks is attended (no static part, no restriction) and the blocks tile the grid in
    whole tiles; any other top-k mask branches around every tile's loads, which stops Triton prefetching
    them (`simulator.pipeline`). Restated here: the simulator does not import codegen."""
    node = next(n for n in ir.walk(expr) if isinstance(n, ir.TopK))
    whole = all(n % b == 0 and b % t == 0 for n, b, t in zip(shape, node.block, kv_tile))
    return _replace_topk(expr, as_full=False) is None and isinstance(_replace_topk(expr, as_full=True), ir.Full) \
        and whole


def _topk(expr, shape, q_tile, kv_tile, permute):
    static = _replace_topk(expr, as_full=False)
    envelope = _replace_topk(expr, as_full=True)
    s = tile_stats(static, shape, q_tile, kv_tile, permute)
    e = tile_stats(envelope, shape, q_tile, kv_tile, permute)
    vk = math.prod(kv_tile)
    picks = sum(node.k * -(-node.volume // vk) for node in ir.walk(expr) if isinstance(node, ir.TopK))
    n_e, n_s = e.visits.astype(np.float64), s.visits.astype(np.float64)
    share = np.divide(np.minimum(picks, n_e), n_e, out=np.zeros_like(n_e), where=n_e > 0)
    visits = n_s + share * (n_e - n_s)
    full_share = np.divide(e.full, n_e, out=np.zeros_like(n_e), where=n_e > 0)
    full = s.full + share * (n_e - n_s) * full_share
    pairs = float(s.pairs.sum() + (share * (e.pairs - s.pairs)).sum())
    notes = (f"top-k: tile counts, density and speedups are EXPECTATIONS: each query tile picks {picks} key "
             "tile(s) uniformly among those the rest of the mask allows, on top of the exact static part",)
    return s, visits, full, pairs, notes
