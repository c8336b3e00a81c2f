"""What the Gluon forward (codegen.gluon_fwd) can run: which masks (with each query tile's key-tile
range), which tensors, and the per-device tables a launch reads. Nothing here imports Gluon, so the
rule is checked (and tested) on machines where the kernel cannot run.

The Gluon kernel has no predicate at all: a query tile of BLOCK_M rows walks key tiles [lo, hi)
of BLOCK_N keys, every one of them seen entirely by every row. So a mask qualifies when, at those
tiles, (1) every visited tile of every query tile is full and (2) a query tile's visited key tiles
are one contiguous run. Perfectly block-sparse masks do (dense, block(n), neighborhood(window=w,
stride=s) with tiles dividing s and w, unions of nested blocks); a plain sliding window or causal
mask does not (its diagonal tiles are partial) and runs on the Triton template.

The ranges come from the exact integer row bounds of the analysis' product terms
(`maskdsl.intervals.evaluate`, tabulated per tile by `maskdsl.transpose.query_tile_ranges`), the
same numbers the Triton template and the backward's tables are built from. A union is accepted
when each term's visited tiles are full for that term (then they are full for the union) and the
terms' runs merge into one; a tile that only the union fills is refused, which costs speed, never
correctness. Only the token order of the last grid dimension is handled: every other dimension
must have extent 1 (the kernel's tiles are runs of consecutive tokens).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from maskdsl.codegen.checks import tma_aligned
from maskdsl.codegen.plan import KernelPlan
from maskdsl.intervals import SymRel, evaluate
from maskdsl.transpose import query_tile_ranges

BLOCK_M = 128
BLOCK_N = 128
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TileRanges:
    """Per query tile t the key tiles [lo[t], hi[t]) it visits (lo == hi: none), or why the mask does not qualify.

    `reason` is None when the Gluon kernel can run the mask; then lo/hi are int32 [q tiles].
    """

    lo: np.ndarray
    hi: np.ndarray
    reason: str | None = None
    block_m: int = BLOCK_M

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def busy(self) -> np.ndarray:
        """Indices of the query tiles that visit at least one key tile (the kernel's grid), ascending."""
        return np.nonzero(self.hi > self.lo)[0].astype(np.int32)

    @property
    def idle(self) -> np.ndarray:
        """Indices of the query tiles that visit nothing: their rows output 0 and LSE -inf."""
        return np.nonzero(self.hi <= self.lo)[0].astype(np.int32)


def _refused(reason: str, block_m: int = BLOCK_M) -> TileRanges:
    empty = np.zeros(0, np.int32)
    return TileRanges(empty, empty, reason, block_m)


def tile_ranges(plan: KernelPlan, block_m: int = BLOCK_M, block_n: int = BLOCK_N) -> TileRanges:
    """The [lo, hi) key-tile range of every `block_m`-row query tile of the plan's mask (module docstring)."""
    *outer, n = plan.shape
    if any(e != 1 for e in outer):
        return _refused(f"grid {plan.shape}: only a 1-D token order (every dimension but the last of extent 1)")
    if any(d.dilation != 1 for d in plan.dims):
        return _refused("dilated layout: a tile is not a run of consecutive tokens")
    if n % block_m or n % block_n:
        return _refused(f"{n} tokens is not a multiple of the {block_m} x {block_n} tiles")
    spans = []
    for term in plan.terms:
        if not all(_sees_key0(td) for td in term[:-1]):
            continue  # an extent-1 dimension where the term attends nothing: the term is empty
        td = term[-1]
        if td.dilation != 1:
            return _refused("a dilated (strided) term: none of its tiles is full")
        lo, hi = evaluate(SymRel(1, td.lo, td.hi, td.qa, td.qb), n)
        tab = query_tile_ranges(lo, hi, 1, block_m, block_n)  # [q tiles, (a, b, fa, fb)], inclusive
        seen = tab[:, 0] <= tab[:, 1]
        if not (np.array_equal(tab[seen, 0], tab[seen, 2]) and np.array_equal(tab[seen, 1], tab[seen, 3])):
            t = int(np.nonzero(seen & ((tab[:, 0] != tab[:, 2]) | (tab[:, 1] != tab[:, 3])))[0][0])
            return _refused(f"query tile {t} visits partially seen key tiles (the kernel has no predicate)")
        spans.append(np.where(seen[:, None], tab[:, :2] + [0, 1], 0))  # half-open, (0, 0) when unseen
    return _merge(spans, n // block_m, block_m)


def _sees_key0(td) -> bool:
    lo, hi = evaluate(SymRel(td.dilation, td.lo, td.hi, td.qa, td.qb), 1)
    return bool(lo[0] <= 0 <= hi[0])


def _merge(spans: list[np.ndarray], q_tiles: int, block_m: int) -> TileRanges:
    """One [lo, hi) per query tile from every term's half-open runs, or a refusal where they leave a gap."""
    if not spans:
        zero = np.zeros(q_tiles, np.int32)
        return TileRanges(zero, zero.copy(), None, block_m)
    runs = np.stack(spans, axis=1)  # [q tiles, terms, 2]
    used = runs[:, :, 1] > runs[:, :, 0]
    big = np.iinfo(np.int64).max
    lo = np.where(used, runs[:, :, 0], big).min(1)
    hi = np.where(used, runs[:, :, 1], -1).max(1)
    if len(spans) > 1:
        for t in np.nonzero(used.sum(1) > 1)[0]:
            reach = lo[t]
            for a, b in sorted(map(tuple, runs[t][used[t]])):
                if a > reach:
                    return _refused(f"query tile {t} visits key tiles in more than one run (gap at tile {reach})")
                reach = max(reach, b)
    none = ~used.any(1)
    lo, hi = np.where(none, 0, lo), np.where(none, 0, hi)
    return TileRanges(lo.astype(np.int32), hi.astype(np.int32), None, block_m)


def row_stride(t: torch.Tensor) -> int | None:
    """The stride of t's [batch x heads x tokens] rows when they fold into one 2-D TMA box, else None.

    The copy-engine rule of `compiled.tma_descriptors` (unit last stride, 16-byte aligned base and
    strides, batch folding into heads) plus heads folding into tokens, so the kernel addresses
    every row with one coordinate (int32: fewer than 2**31 rows).
    """
    batch, heads, tokens, _ = t.shape
    sb, sh, sl, sd = t.stride()
    if not tma_aligned(t, [sl, sd]) or batch * heads * tokens >= 2 ** 31:
        return None
    if (heads > 1 and sh != tokens * sl) or (batch > 1 and sb != heads * tokens * sl):
        return None
    return sl


def tensor_blocker(q, k, v, out, lse=None) -> str | None:
    """Why the Gluon forward cannot take these tensors (mask aside), or None. Cheapest checks first.

    The kernel writes LSE as [batch x heads x tokens] float32; None stands for the op's own.
    """
    if os.environ.get("MASKDSL_GLUON") == "0":
        return "MASKDSL_GLUON=0"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "Triton's interpreter runs Triton kernels only"
    if not q.is_cuda:
        return f"tensors on {q.device.type}, not CUDA"
    if _capability(q.device) != 9:
        return f"compute capability {_capability(q.device)}.x; the kernel is Hopper's (9.x)"
    return layout_blocker(q, k, v, out, lse)


def layout_blocker(q, k, v, out, lse=None) -> str | None:
    """The device-independent half of `tensor_blocker`: dtype, head_dim and memory layout."""
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype}; the kernel takes float16 and bfloat16"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]}; the kernel takes {HEAD_DIMS}"
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if row_stride(t) is None:
            return f"{name} (strides {t.stride()}) does not fold into one TMA box of rows"
    if lse is not None and not (lse.is_contiguous() and lse.dtype == torch.float32):
        return "lse is not a contiguous float32 tensor"
    return None


_CAPABILITY: dict[torch.device, int] = {}


def _capability(device: torch.device) -> int:
    if device not in _CAPABILITY:
        _CAPABILITY[device] = torch.cuda.get_device_capability(device)[0]
    return _CAPABILITY[device]


class GluonSchedule:
    """A mask's tile ranges as the kernel reads them, copied to each device once.

    `table`: int32 [busy tiles, 3] rows (query tile, lo, hi) in tile order, the kernel's grid;
    `idle_rows`: int64 token indices of the tiles that visit nothing, filled with 0 / -inf apart.
    """

    def __init__(self, ranges: TileRanges):
        busy = ranges.busy
        self.ranges = ranges
        self.table = np.stack([busy, ranges.lo[busy], ranges.hi[busy]], axis=1).astype(np.int32)
        self.idle_rows = (ranges.idle[:, None].astype(np.int64) * ranges.block_m + np.arange(ranges.block_m)).reshape(-1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = (torch.from_numpy(self.table).to(device), torch.from_numpy(self.idle_rows).to(device))
        return self._on[device]
