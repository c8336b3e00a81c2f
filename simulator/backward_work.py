"""One backward kernel's launch as the cost model sees it: per program the pairs it walks, its config.

Kept apart from `simulator.cost` (which re-exports it) so each module stays one subject: the forward's
cost model there, the backward's per-program features here; `simulator.backward` builds these from
the exact transposed counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maskdsl.simulator.schedule import ctas_per_sm, warpgroup_split

REFERENCE_TILE = 128  # as simulator.cost: constants are per 128x128 pair at head_dim 128
# per backward program: a 128x128 pair of the dK/dV walk, of the dQ walk, the program's fixed cost
BACKWARD_FEATURES = ("dkdv_pair", "dq_pair", "program")
# 128x128x128 products per walked pair (FlashAttention-2's split): dK/dV recomputes S^T = K Q^T and
# dP^T = V dO^T and accumulates dV += P^T dO, dK += dS^T Q; dQ recomputes S and dP and accumulates dQ += dS K
PRODUCTS = {"dkdv": 4, "dq": 3}


@dataclass(frozen=True)
class BackwardWork:
    """One backward kernel's launch: per program the tiles it walks (full / partial), its config, copies.

    dK/dV: a program owns a key tile and walks the query tiles that see it, summing the GQA group's
    query heads (`group`); dQ: a program owns a query tile and walks its key tiles, like the forward.
    """

    kernel: str  # "dkdv" or "dq"
    full: np.ndarray  # [programs] walked tiles run without the predicate
    partial: np.ndarray  # [programs] walked tiles run with it (every visited tile of a union mask)
    own: int  # tokens of the tile a program owns
    other: int  # tokens of each tile it walks
    head_dim: int = 128
    num_warps: int = 4
    num_stages: int = 2
    copies: int = 1  # programs per tile: batch x kv heads (dK/dV) or batch x heads (dQ)
    group: int = 1  # query heads a program sums (dK/dV under GQA)

    @property
    def ctas_per_sm(self) -> int:
        return ctas_per_sm(self.own, self.other, self.head_dim, self.num_warps, self.num_stages)

    @property
    def programs(self) -> int:
        return len(self.full) * self.copies

    def pair_unit(self, beta: float) -> float:
        """SM time of one walked full pair per microsecond of its kernel's constant: the pair factor,
        head_dim, the GQA group and the warpgroups' split of the owned rows (`schedule.warpgroup_split`:
        every product of both kernels has the owned tile's rows as its M)."""
        pair = (self.own * self.other / REFERENCE_TILE**2) ** beta
        return pair * self.group * self.head_dim / REFERENCE_TILE * warpgroup_split(self.own, self.num_warps)

    def features(self, beta: float, partial: float) -> np.ndarray:
        """[programs, 3] SM-time per microsecond-constant (BACKWARD_FEATURES), before the slot factor."""
        unit = self.pair_unit(beta)
        walk = (np.asarray(self.full, np.float64) + partial * np.asarray(self.partial, np.float64)) * unit
        zero = np.zeros(len(walk))
        cols = [walk, zero] if self.kernel == "dkdv" else [zero, walk]
        fixed = np.full(len(walk), (self.own / REFERENCE_TILE) ** beta * self.head_dim / REFERENCE_TILE)
        return np.stack(cols + [fixed], axis=1)
