"""`fn.decode(...)`: a compiled mask run on a few new tokens per sequence against a KV cache.

Convention (docs/SERVING.md): the new tokens' keys and values are already in the cache and
`cache_seqlens[b]` counts them, so sequence b's q_len new tokens sit at positions
cache_seqlens[b] - q_len .. cache_seqlens[b] - 1 of the mask's grid, and each attends to the cached
keys the mask gives that position on the grid. A mask that lets a query see a key past the new
tokens is refused (`maskdsl.analysis.decode_reach.decode_problem` when the decode path is built,
`checks.value_problem` at each call unless skipped).

Everything a launch derives from the lengths is computed by the kernel from `cache_seqlens` on the
device; the host chooses the tiles and the number of splits from shapes only, so growing lengths
never recompile and a step can be captured in a CUDA graph (with `check_values=False`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from maskdsl.analysis.decode_reach import decode_problem, reach_table, reach_table_of
from maskdsl.codegen import dispatch
from maskdsl.codegen.decode import kernel
from maskdsl.codegen.decode.checks import CacheShape, DecodeError, check_decode, value_problem
from maskdsl.codegen.decode.predicate import load_predicate
from maskdsl.spec import ir

MAX_SPLITS = 64
MAX_PLANS = 256  # signatures remembered per mask (a server sees a few: its batch sizes and q_lens)
MIN_TILES_PER_SPLIT = 2  # a split shorter than this spends more on its partial's write and merge than it saves
FILL = 0.85  # the least share of its last wave of programs `num_splits` accepts without looking further
SHARED_BYTES = 227 * 1024  # shared memory a program may use on sm_90 (programs per SM follow from it)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class CompiledDecode:
    """The decode path of one mask (static, or with a top-k term); `maskdsl.compile(...).decode` builds it
    on first use (`decoder`): its reach table, its rendered predicate and, for top-k, its selection."""

    def __init__(self, mask: ir.MaskDef):
        self.mask = mask
        self.key = mask.content_hash()  # what `maskdsl::decode` names it by
        self.tokens = mask.layout.tokens
        shape = tuple(mask.layout.shape)
        if mask.dynamic:  # S | (picked & R): the intervals are S's, every key a pick can add is R's
            from maskdsl.codegen.decode.select import DecodeSelection

            self.selection = DecodeSelection(mask)
            form = self.selection.form
            self.table = reach_table_of(form.static, shape)
            envelope = reach_table_of(ir.union(*filter(None, (form.static, form.restrict))), shape)
        else:
            self.selection = None
            self.table = envelope = reach_table(mask)
        if (problem := decode_problem(mask, envelope)) is not None:
            raise DecodeError(problem + "; decode needs a mask causal in token order, e.g. `(... | sink(4)) & causal` "
                              "(docs/SERVING.md)")
        self.last_key = envelope.last
        self.kernels = load_predicate(mask)
        self.attends = self.kernels.attends
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._block_tiles: dict[int, int] = {}
        self._plans: dict[tuple, _Plan] = {}
        self.launch_config: tuple[int, int, int] | None = None
        _DECODERS.setdefault(self.key, self)  # the `maskdsl::decode` op finds it by its key

    def __repr__(self) -> str:
        return f"CompiledDecode({self.mask.name} = {self.mask.expr.fmt()})"

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(intervals [L, 4], last key [L]) int32 on `device`, uploaded once."""
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = (torch.from_numpy(self.table.intervals).to(device),
                                torch.from_numpy(self.last_key).to(device))
        return self._on[device]

    def tiles(self, shape: CacheShape) -> tuple[int, int, int, int]:
        """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a call's shapes; `launch_config` (BLOCK_N, num_warps,
        num_stages), when set, replaces the last three (what `maskdsl bench --decode --decode-configs` sweeps)."""
        rows = shape.group * shape.q_len
        wide = shape.head_dim > 128  # a 256-column fp32 accumulator: smaller tiles keep it in registers (sm_90)
        block_m = min(32 if wide else 64, max(16, _pow2(rows)))
        if self.launch_config is not None:
            return (block_m, *self.launch_config)
        return block_m, 32 if wide else 64, 4, 2

    def configure(self, launch_config: tuple[int, int, int] | None) -> None:
        """Set (BLOCK_N, num_warps, num_stages) for the calls that follow (None: the defaults of `tiles`)."""
        if launch_config is not None:
            block_n, warps, stages = launch_config
            if block_n < 16 or block_n & (block_n - 1) or warps not in (1, 2, 4, 8, 16) or stages < 1:
                raise DecodeError(f"launch config {launch_config!r}: BLOCK_N a power of two >= 16, num_warps a power "
                                  "of two up to 16, num_stages >= 1")
            launch_config = (int(block_n), int(warps), int(stages))
        self.launch_config = launch_config
        self._plans.clear()

    def num_splits(self, shape: CacheShape, device, block_m: int, block_n: int) -> int:
        """Splits of each row block's keys, from shapes only (the same call at any lengths launches the same
        grid): the fewest that fill the GPU's program slots in whole waves (at least one wave, the last at
        least FILL full), else the best filled; never so many that a split of the widest reach (the mask's,
        cut to the cache) gets fewer than MIN_TILES_PER_SPLIT tiles."""
        programs = shape.batch * shape.kv_heads * -(-shape.group * shape.q_len // block_m)
        reach = min(shape.capacity, self.tokens, self.table.widest + shape.q_len)
        tiles = -(-reach // block_n) + 1
        if self.selection is not None:
            tiles += self.selection.n_picks(shape.group) * self.block_tiles(block_n)
        most = max(1, min(tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))
        _, _, _, stages = self.tiles(shape)
        tile_bytes = 2 * block_n * shape.head_dim * 2  # a K and a V tile, 2-byte elements
        per_sm = max(1, min(4, SHARED_BYTES // (stages * tile_bytes + block_m * shape.head_dim * 2)))
        slots = (dispatch.sm_count(device) if device.type == "cuda" else 4) * per_sm
        fill = [(programs * s / slots) / math.ceil(programs * s / slots) for s in range(1, most + 1)]
        for s, f in enumerate(fill, 1):
            if programs * s >= slots and f >= FILL:
                return s
        return 1 + max(range(most), key=lambda i: (fill[i], -i))

    def block_tiles(self, block_n: int) -> int:
        """Key tiles of block_n keys that the row-major span of a top-k block can touch (the most of any block)."""
        if block_n not in self._block_tiles:
            from maskdsl.harness.topk import block_boxes

            boxes = block_boxes(self.mask.layout.shape, self.selection.form.topk.block)  # [blocks, rank, 2]
            first = last = 0
            for d, n in enumerate(self.mask.layout.shape):
                first, last = first * n + boxes[:, d, 0], last * n + boxes[:, d, 1] - 1
            self._block_tiles[block_n] = int((last // block_n - first // block_n + 1).max())
        return self._block_tiles[block_n]

    def block_means(self, k_cache, cache_seqlens, page_table=None):
        """A top-k mask's `KeyBlockMeans` of a filled cache (codegen.decode.select): keep them beside the
        cache, `append` each step's new keys, and pass them to `decode(..., block_means=)` so that the
        selection reads the block means instead of the whole cache."""
        if self.selection is None:
            raise DecodeError(f"mask {self.mask.name!r} has no top-k term: it has no block means to keep")
        capacity = k_cache.shape[2] if page_table is None else page_table.shape[1] * k_cache.shape[2]
        return self.selection.block_means(k_cache, cache_seqlens, page_table, capacity)

    def __call__(self, q, k_cache, v_cache, cache_seqlens, page_table=None, *, scale: float | None = None,
                 return_lse: bool = False, check_values: bool = True, num_splits: int | None = None, out=None,
                 block_means=None):
        if torch.compiler.is_compiling():  # torch.compile sees one opaque op (`maskdsl::decode`)
            return _op_call(self.key, q, k_cache, v_cache, cache_seqlens, page_table, scale, return_lse, check_values,
                            num_splits, out, block_means)
        key = _signature(q, k_cache, v_cache, cache_seqlens, page_table, out, num_splits)
        plan = self._plans.get(key)
        if plan is None:  # a new signature: every shape check, then the launch arguments, once
            plan = self._plan(q, k_cache, v_cache, cache_seqlens, page_table, out, num_splits)
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        if scale is None:
            scale = plan.scale
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise DecodeError(f"scale must be a finite number (or None for 1/sqrt(head_dim)), got {scale!r}")
        if block_means is not None:
            self._check_means(block_means, plan.shape, q.device)
        intervals, last = self.tables(q.device)
        if check_values and (problem := value_problem(plan.shape, cache_seqlens, page_table, last, self.tokens)):
            raise DecodeError(problem)
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype) if out is None else out
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        self._run(plan, q, k_cache, v_cache, cache_seqlens, page_table, float(scale), out, lse, intervals, block_means)
        return (out, lse) if return_lse else out

    def _check_means(self, means, shape: CacheShape, device) -> None:
        if self.selection is None:
            raise DecodeError(f"block_means= is for masks with a top-k term; mask {self.mask.name!r} has none")
        want = (shape.batch, shape.kv_heads, self.selection.blocks, shape.head_dim)
        if (tuple(means.sums.shape) != want or tuple(means.counts.shape) != want[:3]
                or means.sums.device != device or means.counts.device != device):
            raise DecodeError(f"block_means hold sums {tuple(means.sums.shape)} on {means.sums.device}; this call "
                              f"needs [B, H_kv, blocks, D] = {list(want)} on {device} (CompiledDecode.block_means)")

    def launch(self, shape: CacheShape, q, k_cache, v_cache, cache_seqlens, page_table, scale: float, out, lse,
               num_splits: int | None = None) -> None:
        """The split kernel (and the merge when it splits) into `out` and `lse`; no value checks, no sync."""
        plan = self._arguments(shape, q, k_cache, v_cache, cache_seqlens, page_table, out, num_splits)
        self._run(plan, q, k_cache, v_cache, cache_seqlens, page_table, scale, out, lse, self.tables(q.device)[0])

    def _plan(self, q, k_cache, v_cache, cache_seqlens, page_table, out, num_splits) -> "_Plan":
        """Every check of the shapes, then `_arguments`."""
        shape = check_decode(q, k_cache, v_cache, cache_seqlens, page_table, self.tokens)
        if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                       or not 1 <= num_splits <= MAX_SPLITS):
            raise DecodeError(f"num_splits must be an integer from 1 to {MAX_SPLITS}, got {num_splits!r}")
        if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                                or out.stride(-1) != 1):
            raise DecodeError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a contiguous last "
                              f"dimension; got {tuple(out.shape)} {out.dtype}")
        return self._arguments(shape, q, k_cache, v_cache, cache_seqlens, page_table, out, num_splits)

    def _arguments(self, shape: CacheShape, q, k_cache, v_cache, cache_seqlens, page_table, out,
                   num_splits) -> "_Plan":
        """What the launches take besides the tensors and the scale, for checked shapes."""
        block_m, block_n, warps, stages = self.tiles(shape)
        splits = num_splits or self.num_splits(shape, q.device, block_m, block_n)
        m_tiles = -(-shape.group * shape.q_len // block_m)
        o_strides = out.stride()[:3] if out is not None else (q.shape[1] * q.shape[2] * q.shape[3],
                                                               q.shape[2] * q.shape[3], q.shape[3])
        pages = page_table if shape.paged else cache_seqlens
        ints = (*q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *o_strides, pages.stride(0),
                shape.capacity, max(shape.num_pages, 1))
        consts = dict(ATTENDS=self.attends, TOKENS=self.tokens, HEADS=shape.heads, GROUP=shape.group,
                      Q_LEN=shape.q_len, Q_PAD=max(2, _pow2(shape.q_len)), HEAD_DIM=shape.head_dim, BLOCK_M=block_m,
                      BLOCK_N=block_n, PAGED=shape.paged, PAGE_SIZE=max(shape.page_size, 1), DIRECT=splits == 1,
                      DOT_F32=q.dtype == torch.bfloat16 and dispatch.interpreting(), num_warps=warps,
                      num_stages=stages)
        if self.selection is not None:
            m = self.kernels
            consts.update(TOPK=True, RESTRICT=m.restrict, KEY_BLOCK=m.key_block, BLOCK_FIRST=m.block_first,
                          BLOCK_LAST=m.block_last, N_BLOCKS=self.selection.blocks,
                          N_PICKS=self.selection.n_picks(shape.group), BLOCK_TILES=self.block_tiles(block_n))
        merge = dict(HEADS=shape.heads, Q_LEN=shape.q_len, HEAD_DIM=shape.head_dim, SPLITS_PAD=max(2, _pow2(splits)),
                     num_warps=4)
        return _Plan(shape, (shape.batch, shape.kv_heads * m_tiles, splits), splits, ints, consts, o_strides, merge,
                     1.0 / math.sqrt(shape.head_dim))

    def _run(self, plan: "_Plan", q, k_cache, v_cache, cache_seqlens, page_table, scale: float, out, lse,
             intervals, block_means=None) -> None:
        shape = plan.shape
        if plan.splits == 1:
            part_o = part_l = lse
        else:
            rows = shape.batch * shape.heads * shape.q_len * plan.splits
            part_o = torch.empty((rows, shape.head_dim), device=q.device, dtype=torch.float32)
            part_l = torch.empty((rows,), device=q.device, dtype=torch.float32)
        picked = plist = cache_seqlens  # not read without a top-k term
        if self.selection is not None:
            picked, plist = self.selection.picks(q, k_cache, cache_seqlens, page_table, shape.capacity, block_means)
        pages = page_table if shape.paged else cache_seqlens
        kernel.decode_split[plan.grid](q, k_cache, v_cache, cache_seqlens, pages, intervals, out, lse, part_o, part_l,
                                       picked, plist, scale * kernel.LOG2E, *plan.ints, **plan.consts)
        if plan.splits > 1:
            kernel.decode_merge[(shape.batch * shape.heads * shape.q_len,)](
                part_o, part_l, out, lse, plan.splits, *plan.out_strides, **plan.merge)


@dataclass(frozen=True, eq=False)
class _Plan:
    """What a call of one signature launches with, besides its tensors and scale (`CompiledDecode._plan`)."""

    shape: CacheShape
    grid: tuple[int, int, int]
    splits: int
    ints: tuple[int, ...]  # strides, capacity, pool size
    consts: dict  # the split kernel's constexprs and launch options
    out_strides: tuple[int, ...]
    merge: dict
    scale: float  # the default: 1 / sqrt(head_dim)


def _signature(q, k_cache, v_cache, cache_seqlens, page_table, out, num_splits) -> tuple:
    """Everything the checks and the launch arguments depend on, and nothing the values do: a call with the
    same signature reuses the checked plan (a warm decode step's host work is this tuple, a dict lookup,
    the allocations and the launches)."""
    key = [num_splits]
    for t in (q, k_cache, v_cache, cache_seqlens, page_table, out):
        if not isinstance(t, torch.Tensor):
            key.append(None if t is None else type(t))
            continue
        key += (t.shape, t.stride(), t.dtype, t.device)
    if isinstance(q, torch.Tensor) and q.device.type == "cpu":
        key.append(dispatch.interpreting())  # whether the CPU may run kernels at all
    return tuple(key)


_DECODERS: dict[str, CompiledDecode] = {}  # a mask's content hash, its text or a CompiledAttention's key -> its path


def decoder(mask: ir.MaskDef) -> CompiledDecode:
    """The decode path of `mask`, built once per mask content (its tables and predicate)."""
    key = mask.content_hash()
    if key not in _DECODERS:
        _DECODERS[key] = CompiledDecode(mask)
    return _DECODERS[key]


def decode_call(key: str, mask: ir.MaskDef, q, k_cache, v_cache, cache_seqlens, page_table=None, **kwargs):
    """`CompiledAttention.decode` (named by its `key`): the decode path of its mask, found without hashing
    the mask again, and under torch.compile the `maskdsl::decode` op (the op finds the path by the key)."""
    if torch.compiler.is_compiling():  # the op names the mask by its text, which builds the path if need be
        text = f"layout g = grid({', '.join(str(n) for n in mask.layout.shape)})\nmask m = {mask.expr.fmt()}\n"
        return _op_call(text, q, k_cache, v_cache, cache_seqlens, page_table, **kwargs)
    fn = _DECODERS.get(key)
    if fn is None:
        fn = _DECODERS[key] = decoder(mask)
    return fn(q, k_cache, v_cache, cache_seqlens, page_table, **kwargs)


def _op_call(key, q, k_cache, v_cache, cache_seqlens, page_table, scale=None, return_lse=False, check_values=True,
             num_splits=None, out=None, block_means=None):
    if out is not None:
        raise DecodeError("out= is not taken under torch.compile: use the returned output")
    sums, counts = (None, None) if block_means is None else (block_means.sums, block_means.counts)
    o, lse = torch.ops.maskdsl.decode(q, k_cache, v_cache, cache_seqlens, page_table, key,
                                      None if scale is None else float(scale), check_values, num_splits or 0, sums,
                                      counts)
    return (o, lse) if return_lse else o


def _resolve(key: str) -> CompiledDecode:
    """The decode path named `key`: a CompiledDecode's content hash, or a mask's text (`decode_call`)."""
    fn = _DECODERS.get(key)
    if fn is None:
        from maskdsl.lang.parser import parse

        fn = _DECODERS[key] = decoder(parse(key).mask("m"))
    return fn


@torch.library.custom_op("maskdsl::decode", mutates_args=())
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
               page_table: torch.Tensor | None, key: str, scale: float | None, check_values: bool,
               num_splits: int, means_sums: torch.Tensor | None,
               means_counts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _resolve(key)
    means = None
    if means_sums is not None and means_counts is not None and fn.selection is not None:
        from maskdsl.codegen.decode.select import KeyBlockMeans

        means = KeyBlockMeans(means_sums, means_counts, fn.selection.owner(q.device))
    return fn(q, k_cache, v_cache, cache_seqlens, page_table, scale=scale, return_lse=True, check_values=check_values,
              num_splits=num_splits or None, block_means=means)


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, page_table, key, scale, check_values, num_splits, means_sums, means_counts):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)
