"""Kernel configurations: tile shapes per dimension, warps and pipeline depth, and the untuned
configs codegen compiles with when nobody chose one (the tiles and launch rules are maskdsl.analysis.tiles';
the ranked defaults `maskdsl.compile` uses are autotune.policy's)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from maskdsl.spec import ir
from maskdsl.analysis.tiles import block_tile, forward_launch, split, topk_launch

_KEY = re.compile(r"q(\d+(?:x\d+)*)_k(\d+(?:x\d+)*)_w(\d+)_s(\d+)")


@dataclass(frozen=True)
class KernelConfig:
    """A query tile and a key tile (boxes of the grid, one extent per dimension) plus launch knobs.

    Tile volumes must be powers of two (Triton's block shapes); per-dimension extents are
    powers of two too, so every factorization of a volume over the grid is expressible.
    """

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        from maskdsl.codegen.checks import check_config_fields  # torch: only once a config is built

        check_config_fields(self)

    @property
    def block_m(self) -> int:
        return _prod(self.q_tile)

    @property
    def block_n(self) -> int:
        return _prod(self.kv_tile)

    def key(self) -> str:
        return (f"q{'x'.join(map(str, self.q_tile))}_k{'x'.join(map(str, self.kv_tile))}"
                f"_w{self.num_warps}_s{self.num_stages}")

    @classmethod
    def from_key(cls, key: str) -> "KernelConfig":
        """The inverse of `key()`: 'q2x8x8_k1x8x8_w8_s3' -> KernelConfig((2, 8, 8), (1, 8, 8), 8, 3).

        The one parser of config keys: the tuning database, the cost fit and the benchmarks store keys.
        """
        m = _KEY.fullmatch(key.strip())
        if not m:
            raise ValueError(f"not a kernel config key: {key!r}; expected e.g. 'q2x8x8_k1x8x8_w8_s3' "
                             "(query tile, key tile, warps, stages)")
        tile = lambda text: tuple(int(x) for x in text.split("x"))  # noqa: E731
        return cls(tile(m[1]), tile(m[2]), int(m[3]), int(m[4]))

    def validate(self, rank: int) -> None:
        for name, tile in (("q_tile", self.q_tile), ("kv_tile", self.kv_tile)):
            if len(tile) != rank:
                raise ValueError(f"config.{name}={tile} has {len(tile)} entries but the layout has {rank} dimensions")
            if any(t < 1 or t & (t - 1) for t in tile):
                raise ValueError(f"config.{name}={tile}: every extent must be a power of two")
            if not 16 <= _prod(tile) <= 256:
                raise ValueError(f"config.{name}={tile} holds {_prod(tile)} tokens; use 16 to 256")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"config.num_warps={self.num_warps} must be 1, 2, 4, 8 or 16")
        if not 1 <= self.num_stages <= 6:
            raise ValueError(f"config.num_stages={self.num_stages} must be between 1 and 6")


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def default_config(mask: ir.MaskDef, head_dim: int = 128) -> KernelConfig:
    """A config that is correct everywhere and reasonable on Hopper; tuning finds better ones."""
    shape = mask.layout.shape
    block_n = 64 if head_dim > 64 else 128
    return KernelConfig(split(128, shape), split(block_n, shape), *forward_launch(128, head_dim))


# What `maskdsl.compile` gives a static mask's backward unless the user says: True the split one (bitwise
# equal run to run, the measured kernels), False the atomic-dQ backward (BackwardConfig.atomic: five
# products per tile pair instead of seven; last bits vary run to run). The split stays the default until
# the atomic one is measured faster on a GPU (docs/TRAINING.md).
DETERMINISTIC = True


@dataclass(frozen=True)
class BackwardConfig:
    """The backward's two walking kernels, each a KernelConfig read the forward's way round:
    `dkdv.kv_tile` is the key tile a dK/dV program owns and `dkdv.q_tile` the query tiles it walks;
    `dq` is laid out like the forward (its program owns `dq.q_tile`). The preprocess needs no config.
    """

    dkdv: KernelConfig
    dq: KernelConfig
    # dQ added by the dK/dV programs in float32 atomics (five products per tile pair, no dQ kernel; a GQA
    # group's heads on programs of their own) instead of the dQ kernel's seven-product split, whose
    # gradients are bitwise equal run to run. `dq` is then unused. The user's `deterministic` decides it.
    atomic: bool = False

    def key(self) -> str:
        return f"bwd-{self.dkdv.key()}-{self.dq.key()}" + ("-atomic" if self.atomic else "")

    @classmethod
    def from_key(cls, key: str) -> "BackwardConfig":
        """The inverse of `key()`: 'bwd-q64_k64_w4_s2-q128_k64_w8_s2[-atomic]'."""
        parts = key.strip().split("-")
        atomic = len(parts) == 4 and parts[3] == "atomic"
        if len(parts) != 3 + atomic or parts[0] != "bwd":
            raise ValueError(f"not a backward config key: {key!r}; expected e.g. 'bwd-q64_k64_w4_s2-q128_k64_w8_s2' "
                             "(the dK/dV kernel's config, then the dQ kernel's, then '-atomic' for the atomic dQ)")
        return cls(KernelConfig.from_key(parts[1]), KernelConfig.from_key(parts[2]), atomic)

    def validate(self, rank: int) -> None:
        self.dkdv.validate(rank)
        self.dq.validate(rank)


def default_backward_config(mask: ir.MaskDef, head_dim: int = 128) -> BackwardConfig:
    """Conservative for Hopper's shared memory and registers; tuning finds better ones.

    dK/dV keeps two [key tile, head_dim] float32 accumulators in registers, dQ one [query tile,
    head_dim]: at head_dim 128 a 64-key tile with 4 warps and a 128-row query tile with 8 warps
    stay near 64 accumulator registers per thread.
    """
    shape = mask.layout.shape
    if head_dim > 64:
        dkdv = KernelConfig(split(64, shape), split(64, shape), num_warps=4, num_stages=2)
    else:
        dkdv = KernelConfig(split(64, shape), split(128, shape), num_warps=8, num_stages=2)
    dq = KernelConfig(split(128, shape), split(64, shape), num_warps=8, num_stages=2)
    return BackwardConfig(dkdv, dq)


def topk_default_config(mask: ir.MaskDef) -> KernelConfig | None:
    """The top-k kernel's untuned config: its largest tile of at most 128 tokens dividing the top-k
    block, for queries and keys alike; None where no tile of 16 tokens or more divides it."""
    from maskdsl.harness.topk import normal_form

    tile = block_tile(normal_form(mask.expr).topk.block, 128)
    return None if tile is None else KernelConfig(tile, tile, *topk_launch(tile))
