"""Per-rank prediction for context parallelism: the grid sharded along its outermost dimension.

Each rank owns whole query tiles along dimension 0 (chunk edges fall on tile edges, so a rank's query
tiles are exactly the tiles the single-GPU schedule gives its frames); it receives the key frames its
`maskdsl.analysis.shard_plan` names (the exact halo rounded out to whole key tiles: what `maskdsl.distributed`
sends), and the exchange hides behind compute when its time over the link is shorter than the
rank's attention. The rank's compute is its share of visited tiles of
the single-GPU prediction: exact for tile counts, an estimate for time (the share of waves and
tails a rank's smaller launch sees is not modelled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from maskdsl.spec import ir
from maskdsl.analysis.counts import layout_dilation, num_products
from maskdsl.analysis.shard_plan import shard_plan
from maskdsl.simulator.simulation import simulate
from maskdsl.lang.parser import as_spec


@dataclass(frozen=True)
class RankPrediction:
    rank: int
    chunks: tuple[tuple[int, int], ...]  # its frames [first, end) along dimension 0 (two chunks under zig-zag)
    query_tiles: int
    visited_tiles: int
    full_tiles: int
    segments: int  # kernel calls of its forward (own keys first, then each remote run)
    halo_rows: int  # key rows received: the exact halo rounded out to whole key tiles
    halo_bytes: int  # K and V rows received for the forward, all kv heads and the batch
    compute_ms: float | None  # None without calibrated constants for the GPU
    comm_ms: float  # halo_bytes over the link
    hidden: bool | None  # the exchange fits behind the rank's compute
    gather_bytes: int = 0  # K and V of every other rank: what an all-gather (or a full ring pass) brings here
    gather_ms: float = 0.0  # gather_bytes over the link

    @property
    def predicted_ms(self) -> float | None:
        """The rank's forward with the halo exchange: compute, or the link if the exchange does not hide."""
        return None if self.compute_ms is None else max(self.compute_ms, self.comm_ms)

    @property
    def gather_baseline_ms(self) -> float | None:
        """The all-gather baseline's forward: every key fetched first (nothing to overlap it with: the
        rank's keys are all it could attend before the gather), then the same tiles."""
        return None if self.compute_ms is None else self.compute_ms + self.gather_ms

    @property
    def speedup_over_gather(self) -> float | None:
        """How much faster the halo exchange should be than the all-gather baseline on this rank."""
        return None if self.compute_ms is None else self.gather_baseline_ms / self.predicted_ms


def simulate_sharded(spec, mask: str, ranks: int, q_tile, kv_tile=None, link_gb_per_s: float = 400.0,
                     gpu: str | None = None, zigzag: bool = False) -> list[RankPrediction]:
    """Per-rank tiles, halo rows and bytes, and predicted compute and communication (forward).

    `link_gb_per_s`: the point-to-point bandwidth between neighbouring ranks (H100 NVLink: about 450 GB/s
    one way). The problem (heads, kv heads, head_dim, dtype, batch) is the spec's attention statement.
    """
    spec = as_spec(spec)
    mdef = spec.mask(mask)
    if mdef.dynamic:
        raise ValueError(f"mask {mask!r} has a top-k term: its keys come from the data, so it needs a ring "
                         "pass of every K/V slab rather than a halo (maskdsl.distributed gathers every frame)")
    shape = mdef.layout.shape
    if layout_dilation(num_products(mdef.expr, shape), len(shape))[0] > 1:
        raise ValueError(f"mask {mask!r}: the outermost dimension is dilated, so its tiles are laid out by "
                         "dilation group, not as slabs of frames; shard an undilated outermost dimension")
    result = simulate(spec, mask, q_tile, kv_tile, gpu=gpu)
    qt0, kt0 = result.q_tile[0], result.kv_tile[0]
    tiles0 = math.ceil(shape[0] / qt0)
    visits = result.visits_per_query_tile.reshape(tiles0, -1)
    full = result.full_per_query_tile.reshape(tiles0, -1)
    plan = shard_plan(mdef.expr, shape, ranks, math.lcm(qt0, kt0), kt0, zigzag)
    att = spec.attention_for(mask) or ir.Attention("default", mask, heads=8, kv_heads=8, head_dim=128,
                                                   dtype="bf16", batch=1)
    total = float(visits.sum())
    row_bytes = 2 * att.head_dim * att.kv_heads * att.batch * ir.DTYPE_BYTES.get(att.dtype, 2)  # K and V
    out = []
    for r in range(ranks):
        rows = [slice(a // qt0, -(-b // qt0)) for a, b in plan.chunks[r]]
        visited = sum(int(visits[s].sum()) for s in rows)
        nbytes = plan.received_bytes(r, att.head_dim, att.kv_heads, att.batch, ir.DTYPE_BYTES.get(att.dtype, 2))
        compute = None if result.predicted_ms is None or not total else result.predicted_ms * visited / total
        comm = nbytes / (link_gb_per_s * 1e9) * 1e3
        gather = (shape[0] - plan.local_frames(r)) * plan.inner * row_bytes
        out.append(RankPrediction(r, plan.chunks[r], sum(int(visits[s].size) for s in rows), visited,
                                  sum(int(full[s].sum()) for s in rows), sum(len(s) for s in plan.segments[r]),
                                  plan.received_rows(r), nbytes, compute, comm,
                                  None if compute is None else comm <= compute,
                                  gather, gather / (link_gb_per_s * 1e9) * 1e3))
    return out
