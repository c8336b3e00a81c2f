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
# per backward program: a 128x128 pair of the dK/dV walk, of the dQ walk, the program's fixed cost, a
# 128x128 pair of the atomic-dQ walk (its products), and the float32 atomic adds (per 128 rows x head_dim)
BACKWARD_FEATURES = ("dkdv_pair", "dq_pair", "program", "atomic_pair", "atomic_add")
# 128x128x128 products per walked pair (FlashAttention-2's split): dK/dV recomputes S^T = K Q^T and
# dP^T = V dO^T and accumulates dV += P^T dO, dK += dS^T Q; dQ recomputes S and dP and accumulates dQ += dS K.
# The atomic-dQ backward's dK/dV walk does the four and dQ_part = dS K, added into a float32 buffer
PRODUCTS = {"dkdv": 4, "dq": 3, "atomic": 5}


@dataclass(frozen=True)
class BackwardWork:
    """One backward kernel's launch: per program the tiles it walks (full / partial), its config, copies.

    dK/dV: a program owns a key tile and walks the query tiles that see it, summing the GQA group's
    query heads (`group`); dQ: a program owns a query tile and walks its key tiles, like the forward.
    `atomic`: the dK/dV walk of the atomic-dQ backward (5 products per pair, each pair adding its
    walked rows' dQ in float32 atomics; one program per query head, group 1); `per_head`: a GQA
    group's heads on programs of their own, each adding its dK and dV in float32 atomics at its end.
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
    atomic: bool = False  # the atomic-dQ backward's dK/dV walk
    per_head: bool = False  # its GQA programs add dK/dV atomically (one program per query head)

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
        """[programs, 5] SM-time per microsecond-constant (BACKWARD_FEATURES), before the slot factor.

        The atomic adds are counted in 128-row x head_dim float32 tiles: a walked pair adds its query
        tile's rows (`other`) whatever the mask hides, and a `per_head` program adds its dK and dV rows
        (`own`, twice) once at its end. Memory operations: no pair exponent, no warpgroup split."""
        unit = self.pair_unit(beta)
        full, part = np.asarray(self.full, np.float64), np.asarray(self.partial, np.float64)
        walk = (full + partial * part) * unit
        cols = np.zeros((len(walk), len(BACKWARD_FEATURES)))
        cols[:, 3 if self.atomic else 0 if self.kernel == "dkdv" else 1] = walk
        h = self.head_dim / REFERENCE_TILE
        cols[:, 2] = (self.own / REFERENCE_TILE) ** beta * self.head_dim / REFERENCE_TILE
        if self.atomic:
            cols[:, 4] = (full + part) * self.other / REFERENCE_TILE * h
        if self.per_head:
            cols[:, 4] += 2 * self.own / REFERENCE_TILE * h
        return cols
