"""The top-k selection pass that runs before a top-k kernel's attention: its memory traffic.

A top-k call (codegen.topk.forward) is three steps before the attention kernel: pool K per block, pool Q
per block fused with the block scores, then torch's stable sort of the block-level score map.
Its cost has two parts of different physics:

* memory traffic, counted here and costed at the GPU's HBM bandwidth (a spec number, not fitted):
  the pooling reads every row of Q and K once, and the score map ([batch, heads, query blocks,
  key blocks] fp32) is written once and then passed over by `select` (masked_fill, the sort's
  values and indices, the picked bitmap);
* a fixed per-call cost (`CostModel.topk_call_us`, fitted): host work a call exposes by synchronising
  with the stream. It fits to 0 once the top-k kernel's unpipelined loop waits for its loads
  (`simulator.pipeline`), which is what it otherwise stands in for.

Why not count the pooled keys each query block re-reads in the score kernel: they are a few MB,
L2-resident, and the suite's top-k cases cannot tell a term for them apart from zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from maskdsl.spec import ir

# bytes per element of the score map: the score kernel writes it (fp32); `select` reads it for
# masked_fill (4) and its bool candidates (1), writes and sorts the masked copy (4 + 4), the sort
# writes values (4) and int64 indices (8), and the picked int8 bitmap is written (1)
SCORE_MAP_BYTES = 4 + 4 + 1 + 4 + 4 + 4 + 8 + 1


@dataclass(frozen=True)
class SelectionWork:
    """One top-k call's selection pass: what it reads and writes (bytes), for the cost model."""

    pool_bytes: int  # Q and K read once by the pooling kernels
    score_bytes: int  # the score map's traffic through scoring and `select`
    query_blocks: int
    key_blocks: int

    @property
    def bytes(self) -> int:
        return self.pool_bytes + self.score_bytes


def selection_work(shape, block, batch: int = 1, heads: int = 1, kv_heads: int | None = None,
                   head_dim: int = 128, dtype: str = "bf16") -> SelectionWork:
    """The traffic of pooling and selecting `block`-sized top-k blocks of a grid of `shape`.

    Blocks are boxes of the grid, cut by it (maskdsl.harness.topk): ceil(n_d / b_d) per dimension.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    tokens = math.prod(shape)
    blocks = math.prod(-(-n // min(b, n)) for n, b in zip(shape, block))
    width = ir.DTYPE_BYTES.get(dtype, 2)
    pool = batch * (heads + kv_heads) * tokens * head_dim * width
    score = batch * heads * blocks * blocks * SCORE_MAP_BYTES
    return SelectionWork(pool, score, blocks, blocks)
