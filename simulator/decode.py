"""Decode's predicted time: the bytes a step moves over HBM bandwidth, plus a floor per kernel launch.

A decode step reads, per sequence and kv head, the K and V rows of the key ranges it reaches
(maskdsl.analysis.decode_reach: the same ranges the kernel computes on the device), the new queries,
and writes the outputs; split over programs, each split also writes a partial output and LSE in
fp32 that the merge reads back. A top-k mask's step also reads the blocks its heads picked (data:
the caller counts them, `picked_keys`) and, for the selection, every cached key once (`selection_keys`). Nothing here is compute-bound at q_len <= 16 (a GQA group of 8 at
q_len 8 is 64 rows against each key: far below the tensor cores' balance point), so the time is

    launches * floor_us + bytes / (hbm_gbps * efficiency)

`hbm_gbps` is the GPU entry's spec bandwidth (simulator/gpu_costs.json); `efficiency` is the share of
it a streaming kernel reaches and `floor_us` a kernel's shortest time on the device (launch latency
and one dependent chain of loads); both stay at these uncalibrated defaults until `maskdsl bench
--decode` runs are fitted (docs/SERVING.md says how the bench reports them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maskdsl.analysis.decode_reach import ReachTable, reached_keys
from maskdsl.simulator.cost import CostModel

DEFAULT_EFFICIENCY = 1.0  # the spec bandwidth: the prediction is a lower bound on time until fitted
DEFAULT_FLOOR_US = 2.0  # per kernel launch on the device; a placeholder until fitted
SELECTION_LAUNCHES = 40  # about as many torch operations (each a launch) as the top-k selection runs (codegen.decode.select)


@dataclass(frozen=True)
class DecodeStep:
    """One decode call's shapes: `lengths` are the sequences' cache lengths (new tokens included)."""

    lengths: tuple[int, ...]
    heads: int
    kv_heads: int
    q_len: int
    head_dim: int
    dtype_bytes: int = 2
    splits: int = 1
    capacity: int | None = None  # keys a sequence's cache holds (None: the grid's length)
    page_size: int = 0  # a paged cache also reads one int32 page number per key row it gathers
    picked_keys: int = 0  # top-k: keys of picked blocks outside the static ranges (all sequences and kv heads)
    selection_keys: int = 0  # top-k: cached keys the selection averages (K only; all sequences and kv heads)


@dataclass(frozen=True)
class DecodePrediction:
    kv_bytes: int  # K and V rows reached: the figure of merit's numerator
    bytes: int  # everything the step moves (K/V, Q, output, partials, page numbers)
    launches: int
    time_us: float

    @property
    def kv_tbps(self) -> float:
        """Reached K/V bytes per second at the predicted time, in TB/s."""
        return self.kv_bytes / self.time_us / 1e6


def step_bytes(table: ReachTable, step: DecodeStep) -> tuple[int, int]:
    """(K/V bytes reached, all bytes moved) by one step."""
    keys = reached_keys(table, np.asarray(step.lengths), step.q_len, step.capacity)
    row = step.head_dim * step.dtype_bytes
    kv = (int(keys.sum()) * step.kv_heads + step.picked_keys) * 2 * row
    batch = len(step.lengths)
    rows = batch * step.heads * step.q_len
    io = rows * row * 2 + rows * 4  # q in, out and LSE out
    partial = rows * step.splits * (step.head_dim + 1) * 4 * 2 if step.splits > 1 else 0  # written, read back
    pages = kv // (2 * row) * 4 if step.page_size else 0
    selection = step.selection_keys * row + batch * step.heads * step.q_len * row if step.selection_keys else 0
    return kv, kv + io + partial + pages + selection


def predict_decode(table: ReachTable, step: DecodeStep, model: CostModel | None = None,
                   efficiency: float = DEFAULT_EFFICIENCY, floor_us: float = DEFAULT_FLOOR_US) -> DecodePrediction:
    """The predicted time of one decode step on `model`'s GPU (default: the H100 entry)."""
    model = model or CostModel.for_gpu()
    if not model.hbm_gbps:
        raise ValueError(f"the cost entry {model.name!r} has no HBM bandwidth (hbm_gbps); decode's time is bytes "
                         "over bandwidth")
    kv, total = step_bytes(table, step)
    launches = (1 if step.splits == 1 else 2) + (SELECTION_LAUNCHES if step.selection_keys else 0)
    time_us = launches * floor_us + total / (model.hbm_gbps * 1e9 * efficiency) * 1e6
    return DecodePrediction(kv, total, launches, time_us)
