"""The calibrated cost model: per-query-tile work -> predicted kernel time, per GPU.

One CTA of the kernel handles one query tile of one (batch, head). Its SM time is

    t_q = h * [ pair * spill * (full_q * c_full + partial_q * c_partial + union_q * c_union) + qs * c_tile ]

* full / partial: key tiles the single-term kernel runs without / with the mask predicate (a
  ragged key tile is always partial: the kernel's fully-seen box stops at the last whole tile);
* union: key tiles visited through the several-term loop of a union mask (sinks, causal in
  several dimensions, top-k), which evaluates the predicate and does not software-pipeline;
* c_tile: the per-CTA fixed cost (prologue, Q load, epilogue, O and LSE store), paid by a ragged
  query tile in full, as is every visited key tile: the GPU computes whole tiles;
* pair = (V_q V_k / 128^2)^beta, qs = (V_q / 128)^beta, V = padded tile volume, h = the kernel's
  head_dim / 128: the kernels run head_dim padded to a power of two (96 does 128 columns' work);
* spill = max(1, registers the config's state asks for / 255) multiplies the pair terms: a config
  whose accumulators do not fit the registers (128 rows on 4 warps) reloads the excess every tile.

CTAs are then placed by `simulator.schedule`: k = `ctas_per_sm` of the config share each SM
(a CTA occupies its slot for k * t_q, or longer where its tiles wait for their K/V loads:
`simulator.pipeline`, one constant `load_us`), and the `sms * k` slots take the batch x heads copies of
the per-tile times in launch order (greedy list scheduling: waves, the last partial wave, and
imbalance as the GPU's block scheduler produces them); once the last CTA is dispatched, an SM's
remaining residents speed up as its slots empty, each at most to its time alone
(`schedule.shared_schedule`). Plus `launch_us` per kernel, and for a
top-k mask its selection pass (`simulator.selection`): `topk_call_us` per call plus its bytes at
the HBM bandwidth `hbm_gbps`.

On Hopper a mask whose visited 128x128 tiles are all full, one box of key tiles per query tile
(`simulator.gluon`), runs the warp-specialized Gluon forward instead of the template: its CTA is
one busy query tile at the kernel's own 128x128 tiles (on a 1-D order whatever the config's), one
per SM, costing h * (full_q * c_gluon + c_tile). A mask of one product term on a grid runs it with a
per-dimension predicate (gluon_rule's "boxes" mode); a masked key tile there costs c_gluon plus the
template's predicate premium c_partial - c_full. `c_gluon` is fitted only from runs that record the
Gluon path; an entry without it predicts the template for every mask.

The baseline of `predicted_speedup` is the dense SDPA kernel `maskdsl bench` measures (cuDNN or
FlashAttention on the flat, unpadded sequence): ceil(L/128) CTAs per (batch, head), each
ceil(L/128) dense tiles of `dense_tile_us` plus `dense_cta` tiles of fixed cost, in whole waves
over the SMs. Entries without `dense_tile_us` (older fits) fall back to this kernel with every
tile full, in the same units, so speedups stay unit-free.

Constants live in gpu_costs.json in units of "one full 128x128 tile" (c_full = 1), `tile_us`
turning units into microseconds. A fitted override is a JSON file of the same shape, passed as
`path` or named by the MASKDSL_GPU_COSTS environment variable.

The backward (`BackwardWork`, `backward_kernel_us`) has its own constants, in microseconds so a
refit of the forward's units leaves them valid: per visited 128x128 pair of the dK/dV walk and of
the dQ walk, per program, and the partial pairs' premium; scheduled by the same occupancy and list
scheduling. They stay None until measured (`simulator.calibrate_backward`): the prediction is then None.
The atomic-dQ backward's walk costs its five products at the dK/dV walk's rate per product plus
`bwd_atomic_us` per 128 rows x head_dim of float32 atomic adds (None until measured: no atomic
prediction), and its float32 buffers' zero-fill and cast passes their bytes at `hbm_gbps`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from maskdsl.cache import cache_root
from maskdsl.simulator.backward_work import PRODUCTS, BackwardWork
from maskdsl.simulator.headdim import head_dim_scale, kernel_head_dim, product_share
from maskdsl.simulator.pipeline import split
from maskdsl.simulator.schedule import (ctas_per_sm, default_launch, shared_schedule, spill_factor, uniform_makespan,
                                        warpgroup_split)
from maskdsl.simulator.selection import SelectionWork

DEFAULT_GPU = "NVIDIA H100 80GB HBM3"
REFERENCE_TILE = 128  # the constants are for 128-token query and key tiles and head_dim 128
DENSE_TILE = 128  # the dense SDPA baseline's query and key tiles
_BUILTIN = Path(__file__).with_name("gpu_costs.json")
# per-CTA work terms (the Gluon forward's full tile; the K/V loads a slot waits for, `simulator.pipeline`);
# the fit adds launch_us and topk_call_us
FEATURES = ("full", "partial", "union", "tile", "gluon_full", "load")
LOAD = FEATURES.index("load")


@dataclass(frozen=True)
class KernelWork:
    """What one launch does: per query tile key-tile counts by kind, the config, and the copies."""

    full: np.ndarray  # [NQ] key tiles run without the predicate
    partial: np.ndarray  # [NQ] key tiles run with it (single-term kernel)
    union: np.ndarray  # [NQ] key tiles run by the several-term loop
    block_m: int
    block_n: int
    head_dim: int = 128
    num_warps: int | None = None  # None: codegen's untuned default for the block size
    num_stages: int | None = None
    copies: int = 1  # batch x heads
    selection: SelectionWork | None = None  # a top-k call's selection pass, before the attention kernel
    gluon: bool = False  # this is the Gluon forward's launch (128x128 tiles, all full, busy query tiles only)
    gluon_work: "KernelWork | None" = None  # the same call on the Gluon forward, when the mask is eligible
    pipelined: bool = True  # the union loop prefetches its loads (False: top-k's general loop, loads in branches)
    order: np.ndarray | None = None  # dispatch order of the query tiles (None: tile order; `launch_rows`)
    long: int = 0  # the first `long` of `order` go head-major, before every head's rest

    def launch_rows(self) -> np.ndarray:
        """Each CTA's query tile (row of the per-tile arrays), in the order the GPU dispatches them.

        The template and the whole-tile Gluon forward: tile-major within a head, then the next head.
        The predicated Gluon forward (`maskdsl.analysis.row_runs.dispatch_order`): its `long` tiles of every head
        first, head-major, then each head's rest by descending work, so a sink's tile of the last head
        does not start near the end and a causal mask's longest tiles do not run last."""
        n = len(self.full)
        if self.order is None:
            return np.tile(np.arange(n), self.copies)
        head = np.asarray(self.order[:self.long])
        return np.concatenate([np.repeat(head, self.copies), np.tile(self.order[self.long:], self.copies)])

    def launch(self) -> tuple[int, int]:
        warps, stages = default_launch(self.block_m, self.head_dim)
        return self.num_warps or warps, self.num_stages or stages

    @property
    def ctas_per_sm(self) -> int:
        if self.gluon:  # 12 warps that take every register of the SM (codegen.gluon_fwd): one CTA
            return 1
        warps, stages = self.launch()
        return ctas_per_sm(self.block_m, self.block_n, kernel_head_dim(self.head_dim), warps, stages)

    @property
    def spill(self) -> float:
        """The key tiles' slowdown when the config's registers spill (`schedule.spill_factor`)."""
        return spill_factor(self.block_m, self.block_n, kernel_head_dim(self.head_dim), self.launch()[0])

    def tile_unit(self, beta: float, share: float = 1.0) -> float:
        """SM time of one key tile per unit of its constant: the pair factor, register spill, the
        warpgroups' split of a short tile (`schedule.warpgroup_split`) and head_dim (`simulator.headdim`:
        `share` the products' part of a pair's time at 128, the rest the softmax's)."""
        h = head_dim_scale(self.head_dim, share, overlapped=self.gluon)
        if self.gluon:
            return h
        pair = (self.block_m * self.block_n / REFERENCE_TILE**2) ** beta
        return pair * self.spill * warpgroup_split(self.block_m, self.launch()[0]) * h

    def features(self, beta: float, share: float = 1.0) -> np.ndarray:
        """[NQ, 6] SM-time per unit of each constant (FEATURES order), before the slot factor k; the
        load column is zero here (waiting is not SM time: `CostModel.slot_features` adds it).

        A template launch fills the first four columns; a Gluon launch its own full-tile column (its
        tiles are the reference 128x128, so no pair factor, and its warp-specialized state does not
        spill) and the shared per-CTA column: held out of the fit, a Gluon-only CTA cost was
        determined by one case alone (blocked_3d, 4 tiles a CTA) and missed it by 55%. The per-CTA cost
        (loading Q, storing O) is proportional to head_dim."""
        h = kernel_head_dim(self.head_dim) / REFERENCE_TILE
        n = len(self.full)
        zero = np.zeros(n)
        unit = self.tile_unit(beta, share)
        if self.gluon:  # a masked tile (the "boxes" mode, head_dim 128) is a Gluon tile plus the template's premium
            part = np.asarray(self.partial, np.float64)
            return np.stack([-part * h, part * h, zero, np.full(n, h),
                             (np.asarray(self.full, np.float64) + part) * unit, zero], axis=1)
        cols = [np.asarray(x, dtype=np.float64) * unit for x in (self.full, self.partial, self.union)]
        return np.stack(cols + [np.full(n, (self.block_m / REFERENCE_TILE) ** beta * h), zero, zero], axis=1)


MAX_SCHEDULED = 1 << 21
"""Most CTAs a launch is list-scheduled one by one. Copies (batch x heads) repeat the same query tiles,
so past this a launch is scheduled at two copy counts c and 2c within the bound and extended linearly
in the copies: the steady state adds (span(2c) - span(c)) / c per copy. Memory and time stay bounded
however large the batch (a batch of 2,000,000,000 would otherwise list 477 GiB of CTAs)."""


def _by_copies(copies: int, programs: int, span_of) -> float:
    """span_of(copies), extended linearly from two scheduled copy counts past MAX_SCHEDULED CTAs."""
    if copies <= 2 or copies * programs <= MAX_SCHEDULED:
        return span_of(copies)
    c = max(1, MAX_SCHEDULED // (2 * max(programs, 1)))
    low, high = span_of(c), span_of(2 * c)
    return low + (copies - c) * (high - low) / c


@dataclass(frozen=True)
class Schedule:
    """The predicted launch: time (units), occupancy, waves."""

    time: float
    ctas: int
    ctas_per_sm: int
    slots: int

    @property
    def waves(self) -> float:
        return self.ctas / self.slots


@dataclass(frozen=True)
class CostModel:
    """Per-GPU constants (units: one full 128x128 tile on one SM) and where they came from."""

    name: str
    c_full: float
    c_partial: float
    c_tile: float
    sms: int
    tile_us: float | None = None
    source: str = ""
    pair_exponent: float = 1.0  # cost of a tile pair ~ (V_q V_k)^beta: small tiles use the tensor cores worse
    c_union: float | None = None  # None: as c_partial
    launch_us: float = 0.0
    dense_tile_us: float | None = None  # the dense SDPA baseline, per 128x128 tile on one SM
    dense_cta: float = 0.0  # its fixed cost per CTA, in its tiles
    bwd_dkdv_us: float | None = None  # backward, us per visited 128x128 pair of the dK/dV walk; None: unfitted
    bwd_dq_us: float | None = None  # ... of the dQ walk
    bwd_program_us: float = 0.0  # per backward program (a 128-token owned tile)
    bwd_partial: float = 1.0  # a partial pair (mask predicate) costs this many full ones
    bwd_pair_exponent: float | None = None  # None: the forward's
    bwd_atomic_us: float | None = None  # atomic-dQ backward: per 128 rows x head_dim of float32 atomic adds
    dense_bwd_tile_us: float | None = None  # the dense SDPA backward, per 128x128 tile on one SM
    topk_call_us: float = 0.0  # a top-k call's fixed selection cost (host-synchronised launches), us
    hbm_gbps: float | None = None  # HBM bandwidth (spec), GB/s: the selection pass's traffic
    c_gluon: float | None = None  # the Gluon forward's full 128x128 tile (units); None: no Gluon path modelled
    load_us: float = 0.0  # latency of a key tile's K/V loads under load (simulator.pipeline); 0: no waiting
    tensor_tflops: float | None = None  # dense bf16 tensor-core rate (spec): head_dim's share (simulator.headdim)
    sfu_tflops: float | None = None  # exponentials per second (spec, 1e12); None: time proportional to head_dim

    @property
    def placeholder(self) -> bool:
        return "PLACEHOLDER" in self.source.upper()

    @classmethod
    def for_gpu(cls, name: str | None = None, path: str | os.PathLike | None = None) -> "CostModel":
        """Constants for GPU `name` (as torch.cuda.get_device_name says it; a unique substring works).

        Entries from `path` (or $MASKDSL_GPU_COSTS) override the built-in ones, so fitted constants
        win over the shipped defaults.
        """
        table = _load(_BUILTIN)
        fitted = fitted_path()
        if fitted.exists():  # what the last `maskdsl bench --suite` on this machine fitted
            table.update(_load(fitted))
        override = path or os.environ.get("MASKDSL_GPU_COSTS")
        if override:
            table.update(_load(Path(override)))
        name = name or DEFAULT_GPU
        key = _match(name, table)
        return cls.from_entry(key, table[key])

    @classmethod
    def from_entry(cls, name: str, entry: dict) -> "CostModel":
        opt = lambda k: None if entry.get(k) is None else float(entry[k])  # noqa: E731
        try:
            model = cls(name=name, c_full=float(entry["c_full"]), c_partial=float(entry["c_partial"]),
                        c_tile=float(entry["c_tile"]), sms=int(entry["sms"]), tile_us=opt("tile_us"),
                        source=str(entry.get("source", "")), pair_exponent=float(entry.get("pair_exponent", 1.0)),
                        c_union=opt("c_union"), launch_us=float(entry.get("launch_us") or 0.0),
                        dense_tile_us=opt("dense_tile_us"), dense_cta=float(entry.get("dense_cta") or 0.0),
                        bwd_dkdv_us=opt("bwd_dkdv_us"), bwd_dq_us=opt("bwd_dq_us"),
                        bwd_program_us=float(entry.get("bwd_program_us") or 0.0),
                        bwd_partial=float(entry.get("bwd_partial") or 1.0),
                        bwd_pair_exponent=opt("bwd_pair_exponent"), dense_bwd_tile_us=opt("dense_bwd_tile_us"),
                        bwd_atomic_us=opt("bwd_atomic_us"),
                        topk_call_us=float(entry.get("topk_call_us") or 0.0), hbm_gbps=opt("hbm_gbps"),
                        c_gluon=opt("c_gluon"), load_us=float(entry.get("load_us") or 0.0),
                        tensor_tflops=opt("tensor_tflops"), sfu_tflops=opt("sfu_tflops"))
        except KeyError as exc:
            raise ValueError(f"cost entry for {name!r} lacks {exc.args[0]!r}; "
                             "hint: give c_full, c_partial, c_tile and sms") from None
        consts = [model.c_full, model.c_partial, model.c_tile, model.c_union or 0.0, model.launch_us, model.dense_cta,
                  model.topk_call_us, model.hbm_gbps or 0.0, model.c_gluon or 0.0, model.load_us,
                  model.tensor_tflops or 0.0, model.sfu_tflops or 0.0]
        if model.sms <= 0 or min(consts) < 0:
            raise ValueError(f"cost entry for {name!r} needs sms > 0 and non-negative constants, got {entry}")
        return model

    @property
    def coefficients(self) -> np.ndarray:
        """The per-CTA constants in FEATURES order (units)."""
        union = self.c_partial if self.c_union is None else self.c_union
        load = self.load_us / self.tile_us if self.tile_us else 0.0
        return np.array([self.c_full, self.c_partial, union, self.c_tile, self.c_gluon or 0.0, load])

    @property
    def share(self) -> float:
        """The products' share of a pair's time at head_dim 128 (`simulator.headdim`)."""
        return product_share(self.tensor_tflops, self.sfu_tflops)

    @property
    def has_gluon(self) -> bool:
        """Whether this GPU's entry models the Gluon forward (Hopper entries fitted on its timings)."""
        return self.c_gluon is not None

    def kernel_work(self, work: KernelWork) -> KernelWork:
        """The launch this GPU runs for the call: the Gluon forward's when the mask is eligible and the
        entry models it, else the template's (a GPU without Gluon constants predicts the template)."""
        return work.gluon_work if work.gluon_work is not None and self.has_gluon else work

    def query_tile_times(self, work: KernelWork) -> np.ndarray:
        """[NQ] SM time (units) of each query tile's CTA."""
        return work.features(self.pair_exponent, self.share) @ self.coefficients

    def slot_features(self, work: KernelWork, beta: float, coef: np.ndarray, k: int | None = None) -> np.ndarray:
        """[NQ, 6] slot time per unit of each constant (FEATURES order), k co-resident CTAs included.

        Each kind of key tile is compute-bound (k times its SM time) or waits for its loads
        (`simulator.pipeline`), whichever binds at the constants `coef` (FEATURES order, any one unit):
        `slot_features(w, beta, coef) @ coef` is the slot time, linear in the constants for fixed regimes.
        `k` (default the config's occupancy) is the number of CTAs sharing the SM; k = 1 is a CTA alone."""
        k = work.ctas_per_sm if k is None else k
        feats = work.features(beta, self.share)
        out = feats * k
        if work.gluon or coef[LOAD] <= 0:  # the warp-specialized kernel keeps its loads in flight
            return out
        unit, stages = work.tile_unit(beta, self.share), work.launch()[1]
        for i, (count, piped) in enumerate(zip((work.full, work.partial, work.union), (True, True, work.pipelined))):
            cf, lf = split(coef[i] * unit, k, stages, piped, coef[LOAD])
            out[:, i] = feats[:, i] * cf
            out[:, LOAD] += np.asarray(count, np.float64) * lf
        return out

    def schedule(self, work: KernelWork) -> Schedule:
        """Predicted time (units) of the kernel: CTAs sharing SMs (`schedule.shared_schedule`), plus launch."""
        work = self.kernel_work(work)
        k = work.ctas_per_sm
        slots = self.sms * k
        n = len(work.full)
        if work.copies > 2 and n * work.copies > MAX_SCHEDULED:
            time = _by_copies(work.copies, n, lambda c: self.schedule(replace(work, copies=c)).time)
            return Schedule(time, n * work.copies, k, slots)
        rows = work.launch_rows()
        coef = self.coefficients
        per_tile = self.slot_features(work, self.pair_exponent, coef) @ coef
        if k == 1 and len(per_tile) and np.ptp(per_tile) == 0:
            span = uniform_makespan(len(rows), float(per_tile[0]), slots)
        else:
            alone = self.slot_features(work, self.pair_exponent, coef, k=1) @ coef if k > 1 else per_tile
            span = shared_schedule(per_tile[rows], alone[rows], self.sms, k)
        extra = (self._launch_units() + self.selection_us(work) / self.tile_us) if self.tile_us else 0.0
        return Schedule(span + extra, len(rows), k, slots)

    def selection_bytes_us(self, work: KernelWork) -> float:
        """The selection pass's memory traffic at the HBM bandwidth (us); 0 for static masks."""
        if work.selection is None or not self.hbm_gbps:
            return 0.0
        return work.selection.bytes / (self.hbm_gbps * 1e3)

    def selection_us(self, work: KernelWork) -> float:
        """A top-k call's selection pass before its attention kernel (us): fixed cost plus traffic."""
        if work.selection is None:
            return 0.0
        return self.topk_call_us + self.selection_bytes_us(work)

    def critical_features(self, work: KernelWork, beta: float, coef: np.ndarray) -> np.ndarray:
        """Feature sums (FEATURES order, slot factor included) of the jobs on the slot finishing last.

        With `coef` (FEATURES order) the makespan is features @ coef exactly: linear in the
        constants for as long as the same slot stays critical, which is what the fit iterates on.
        """
        work = self.kernel_work(work)
        k = work.ctas_per_sm
        feats = self.slot_features(work, beta, coef)
        per_tile = feats @ coef
        rows, slots = work.launch_rows(), self.sms * k
        if k == 1 and len(per_tile) and np.ptp(per_tile) == 0:  # equal jobs go round-robin: the last one's slot
            on = rows[np.arange(len(rows) - 1, -1, -slots)]
            return np.bincount(on, minlength=len(feats)) @ feats
        alone = self.slot_features(work, beta, coef, k=1) @ coef if k > 1 else per_tile
        return shared_schedule(per_tile[rows], alone[rows], self.sms, k, feats=feats[rows])[1]

    def dense_schedule(self, tokens: int, copies: int, head_dim: int, q_tiles: int = 0, k_tiles: int = 0,
                       block_m: int = DENSE_TILE, block_n: int = DENSE_TILE) -> Schedule:
        """The dense baseline (units). With `dense_tile_us`: the SDPA kernel on the flat sequence;
        without: this kernel's tiles (`q_tiles` x `k_tiles`), all full."""
        h = head_dim / REFERENCE_TILE
        if self.dense_tile_us is not None and self.tile_us:
            n = math.ceil(tokens / DENSE_TILE)
            per_cta = h * (n + self.dense_cta) * self.dense_tile_us / self.tile_us
            return Schedule(uniform_makespan(n * copies, per_cta, self.sms) + self._launch_units(), n * copies, 1,
                            self.sms)
        work = KernelWork(np.full(q_tiles, k_tiles), np.zeros(q_tiles), np.zeros(q_tiles), block_m, block_n,
                          head_dim, copies=copies)
        return self.schedule(work)

    @property
    def backward_calibrated(self) -> bool:
        return self.bwd_dkdv_us is not None and self.bwd_dq_us is not None

    @property
    def atomic_backward_calibrated(self) -> bool:
        return self.backward_calibrated and self.bwd_atomic_us is not None

    @property
    def backward_coefficients(self) -> np.ndarray:
        """The backward's constants in BACKWARD_FEATURES order (us); an atomic-dQ pair's products at the
        dK/dV walk's rate per product (the fit ties the walks to one cost per product)."""
        per_product = self.bwd_dkdv_us / PRODUCTS["dkdv"]
        return np.array([self.bwd_dkdv_us, self.bwd_dq_us, self.bwd_program_us, PRODUCTS["atomic"] * per_product,
                         self.bwd_atomic_us or 0.0])

    def backward_kernel_us(self, work: "BackwardWork") -> float | None:
        """Predicted time (us) of one backward kernel, None until the backward constants are measured
        (for the atomic-dQ walk, until `bwd_atomic_us` is).

        Scheduled like the forward: `ctas_per_sm` slots per SM, each program occupying its slot for
        k times its SM time, greedy list scheduling in launch order, plus one launch.
        """
        if not self.backward_calibrated or (work.atomic and self.bwd_atomic_us is None):
            return None
        coef = self.backward_coefficients
        k = work.ctas_per_sm
        per_program = (work.features(self.backward_exponent, self.bwd_partial) * k) @ coef

        def span(copies: int) -> float:
            jobs = np.tile(per_program, copies)  # as the fit
            return shared_schedule(jobs, jobs / k, self.sms, k)

        return _by_copies(work.copies, len(per_program), span) + self.launch_us

    @property
    def backward_exponent(self) -> float:
        return self.pair_exponent if self.bwd_pair_exponent is None else self.bwd_pair_exponent

    def memory_pass_us(self, nbytes: float, passes: int) -> float:
        """`passes` memory-bound kernels moving `nbytes` in all (us): the bytes at `hbm_gbps` plus a launch
        each. Without a bandwidth only the launches: the traffic is then in no constant."""
        traffic = nbytes / (self.hbm_gbps * 1e3) if self.hbm_gbps else 0.0
        return traffic + passes * self.launch_us

    def dense_backward_us(self, tokens: int, copies: int, head_dim: int) -> float | None:
        """The dense SDPA backward (us): ceil(L/128) key-tile programs per (batch, head), each walking
        ceil(L/128) tiles, in whole waves; None without `dense_bwd_tile_us`."""
        if self.dense_bwd_tile_us is None:
            return None
        n = math.ceil(tokens / DENSE_TILE)
        per_cta = head_dim / REFERENCE_TILE * n * self.dense_bwd_tile_us
        return uniform_makespan(n * copies, per_cta, self.sms) + self.launch_us

    def _launch_units(self) -> float:
        return self.launch_us / self.tile_us if self.tile_us else 0.0


def fitted_path() -> Path:
    """Where `maskdsl bench --suite` stores the constants it fits, next to the tuning database."""
    return cache_root() / "gpu_costs.json"


def _load(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"cost file {path} does not exist; hint: pass the JSON the benchmark wrote") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"cost file {path} is not valid JSON: {exc}") from None
    table = data.get("gpus", data) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"cost file {path} must map GPU names to entries (optionally under \"gpus\")")
    return {k: v for k, v in table.items() if isinstance(v, dict)}


def _match(name: str, table: dict) -> str:
    if name in table:
        return name
    lowered = {k.lower(): k for k in table}
    if name.lower() in lowered:
        return lowered[name.lower()]
    hits = [k for k in table if name.lower() in k.lower() or k.lower() in name.lower()]
    if len(hits) == 1:
        return hits[0]
    known = ", ".join(sorted(table))
    what = "matches several entries" if hits else "has no cost constants"
    raise KeyError(f"GPU {name!r} {what}; known: {known}. Hint: add an entry to a JSON file and pass it "
                   "as path= (or $MASKDSL_GPU_COSTS)")
