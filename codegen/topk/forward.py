"""Compiled attention for masks with a top-k term: score, select, then attend (any grid rank).

The call is three launches: K pooling, fused Q pooling + block scores, and the attention
kernel over S | (picked & R). Query and key tiles are boxes of the grid that divide the top-k
block (codegen.topk.grid), addressed like the static kernel's (copy-engine loads included). Selection in between is torch's stable sort on the block-level
scores (ties to the lower index). Only the [query blocks, key blocks] candidate map of R is
computed at compile time (closed form); nothing is ever [L, L].
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
import triton

from maskdsl.codegen.checks import check_out_lse
from maskdsl.codegen.compiled import _REGISTRY, CompiledAttention, launch_kernel, tma_descriptors
from maskdsl.codegen.config import KernelConfig, topk_default_config
from maskdsl.codegen.context import _mul, all_of, any_of, join, query_text, wrap
from maskdsl.codegen.plan import KernelPlan, UnsupportedMask
from maskdsl.codegen.printer import Temps
from maskdsl.codegen.cache import load_module
from maskdsl.codegen.render import UNNAMED, comment_safe, kernel_key, render_template
from maskdsl.codegen.topk.grid import TopKGrid, term_texts
from maskdsl.spec import ir
from maskdsl.harness.topk import candidate_blocks, normal_form

TEMPLATE = "attention_topk.py.jinja"




def _inside(coord: str, kind: str, label: str, rank: int) -> str:
    """Tile (coord_0, ..) inside a term's box of key tiles (`kt`: visited, `full`: fully seen)."""
    return all_of([f"({coord}_{d} >= {kind}_lo_{label}_{d}) & ({coord}_{d} <= {kind}_hi_{label}_{d})"
                 for d in range(rank)])


def _context(mask: ir.MaskDef, form, config: KernelConfig, grid: TopKGrid, tma: bool) -> dict:
    """The top-k template's input: the shared query-tile text, the S and R terms' bounds, the calls."""
    from maskdsl.version import __version__

    rank = mask.layout.rank
    dims = grid.kernel_dims()
    temps = Temps()
    s_terms, r_terms = term_texts(mask, form, grid, temps)
    cvars = [f"c_{d}" for d in range(rank)]

    def pred(terms_):
        return [all_of([f"_between(kc_{d}, lo_{t.label}_{d}, hi_{t.label}_{d})" for d in range(rank)])
                for t in terms_]

    covered = [any_of([_inside("c", "kt", t.label, rank) for t in s_terms[:s]]) for s in range(len(s_terms))]
    skip = [c for c in (grid.past_grid("c"), any_of([_inside("c", "kt", t.label, rank) for t in s_terms])) if c]
    r_full = any_of([_inside("c", "full", t.label, rank) for t in r_terms])
    if grid.ragged("c"):
        r_full = f"~({grid.ragged('c')}) & ({r_full})"
    key_lines = [f"kc_{d.i} = {_mul(f'c_{d.i}', d.plan.kv_tile)} + koff_{d.i}" for d in dims]
    valid = [f"kc_{d.i} < {d.plan.extent}" for d in dims if d.ragged_kv]
    if valid:
        key_lines.append(f"key_valid = {all_of(valid)}")
    bounds = [f"{b}_{t.label}_{d}" for t in s_terms + r_terms for d in range(rank) for b in ("lo", "hi")]
    state = ["acc", "m_i", "l_i", "q", "qk_scale"]
    memory = [f"koff_{d}" for d in range(rank)] + ["k_base", "v_base", "stride_kl", "stride_vl", "desc_k", "desc_v",
                                                   "bh_kv"]

    def call(picked, masked, static):
        return wrap("acc, m_i, l_i = _attend_tile(", [state, cvars, bounds, memory + [
            picked, "HEAD_DIM", "HEAD_DIM_PAD", "TMA", "DOT_F32", f"MASKED={masked}", f"STATIC={static}"]], 12)

    params = state + cvars + bounds + memory + ["picked", "HEAD_DIM: tl.constexpr", "HEAD_DIM_PAD: tl.constexpr",
                                                "TMA: tl.constexpr",
                                                "DOT_F32: tl.constexpr", "MASKED: tl.constexpr",
                                                "STATIC: tl.constexpr"]
    next_params = cvars + [f"box_{s}_{d}" for d in range(1, rank) for s in ("lo", "hi")]
    next_lines = [f"c_{rank - 1} += 1"]
    for d in reversed(range(1, rank)):
        next_lines += [f"wrap = c_{d} > box_hi_{d}", f"c_{d - 1} = tl.where(wrap, c_{d - 1} + 1, c_{d - 1})",
                       f"c_{d} = tl.where(wrap, box_lo_{d}, c_{d})"]
    s_loops = []
    for t in s_terms:
        lab = t.label
        s_loops.append(dict(
            start=f"{', '.join(cvars)} = {', '.join(f'kt_lo_{lab}_{d}' for d in range(rank))}",
            count=" * ".join(f"(kt_hi_{lab}_{d} - kt_lo_{lab}_{d} + 1)" for d in range(rank)),
            next=f"{', '.join(cvars)} = _next_tile("
                 + ", ".join(cvars + [f"kt_{b}_{lab}_{d}" for d in range(1, rank) for b in ("lo", "hi")]) + ")"))
    tpb = grid.tpb
    return dict(
        # the name is not rendered (the file is the same whatever the mask is called); comment texts are escaped
        version=__version__, mask_name=UNNAMED, mask_text=comment_safe(mask.expr.fmt()), topk=form.topk, grid=grid,
        tokens=mask.layout.tokens, s_text=comment_safe(form.static.fmt() if form.static else "none"),
        r_text=comment_safe(form.restrict.fmt()),
        cfg=config, block_m=config.block_m, block_n=config.block_n, q_tiles=math.prod(grid.tiles),
        nblocks=grid.nblocks, k_eff=min(form.topk.k, grid.nblocks), s_terms=s_terms, r_terms=r_terms,
        fast_picked=not s_terms and isinstance(form.restrict, ir.Full) and grid.exact and not valid,
        q=query_text(dims, config.block_m, config.block_n, tma=tma),
        fdiv=any("_fdiv(" in line for t in s_terms + r_terms for line in t.rows + t.tiles),
        tile_params="\n".join(wrap("def _attend_tile(", params, 0, tail=""))[len("def _attend_tile("):],
        key_lines=key_lines, key_valid="key_valid" if valid else "None", load_masked="MASKED" if valid else "False",
        key_flat=" + ".join(_mul(f"kc_{d.i}", d.plan.stride) for d in dims),
        kv_tma_offsets=", ".join(_mul(f"c_{d}", grid.tile[d]) for d in range(rank)),
        keep_static=join("keep = ", pred(s_terms) + [f"(picked & ({any_of(pred(r_terms))}))"], " | ", 12)
        if s_terms else ["keep = False"],
        keep_picked=join("keep = ", pred(r_terms), " | ", 12), covered=covered, skip=" | ".join(f"({c})" for c in skip)
        if len(skip) > 1 else "".join(skip), r_full=r_full,
        qblock=grid.block_of_rows("first"), picked_block=grid.block_of_tiles("c"),
        picked_count="n_picked" if tpb == 1 else f"n_picked * {tpb}",
        pick_lines=(["kb = tl.load(idx_row + it)"] if tpb == 1 else
                    [f"kb = tl.load(idx_row + it // {tpb})", f"sub = it % {tpb}"]) + grid.tiles_of_pick("c", "kb", "sub"),
        s_full=any_of([_inside("c", "full", t.label, rank) for t in s_terms]) or "False", s_loops=s_loops,
        cvars=", ".join(cvars), next_params=", ".join(next_params), next_lines=next_lines,
        calls={"static_full": call("False", False, True), "static_masked": call("picked", True, True),
               "picked_full": call("False", False, False), "picked_masked": call("False", True, False)},
    )


def topk_config(mask: ir.MaskDef, config: KernelConfig | None) -> KernelConfig:
    """The kernel's tile: a power-of-two box dividing the top-k block (the same for queries and keys)."""
    block = normal_form(mask.expr).topk.block
    shape = mask.layout.shape
    if config is None:
        config = topk_default_config(mask)
        if config is None:
            raise UnsupportedMask(f"topk block={_fmt(block)}: the kernel needs a block whose extents have a "
                                  f"power-of-two tile of 16..256 tokens dividing them (e.g. 64, 128 or (2, 8, 8))")
        return config
    config.validate(len(shape))
    if config.q_tile != config.kv_tile or any(b % t for b, t in zip(block, config.q_tile)):
        raise UnsupportedMask(f"topk block={_fmt(block)} with config {config.key()}: the top-k kernel needs equal "
                              f"query and key tiles that divide the block in every dimension")
    return config


def _fmt(block: tuple[int, ...]) -> str:
    return str(block[0]) if len(block) == 1 else str(block)


class CompiledTopKAttention(CompiledAttention):
    """Same call surface as CompiledAttention; `launch` also runs the scoring and the selection."""

    def __init__(self, mask: ir.MaskDef, config: KernelConfig | None = None):  # noqa: super() is for static plans
        form = normal_form(mask.expr)
        self.mask, self.form = mask, form
        self.config = topk_config(mask, config)
        shape = mask.layout.shape
        self.grid = TopKGrid(shape, form.topk.block, self.config.q_tile)
        self.nblocks = self.grid.nblocks
        self.q_tiles = math.prod(self.grid.tiles)
        # the copy engine's view of the grid: the static kernel's (undilated) plan, for its descriptors
        self.plan = KernelPlan(mask.name, mask.expr.fmt(), shape, tuple(d.plan for d in self.grid.kernel_dims()), (),
                               self.config)
        self.candidates = candidate_blocks(form, shape)
        self._candidates: dict = {}
        context = _context(mask, form, self.config, self.grid, self.plan.tma_ok)
        key = kernel_key(mask.content_hash(), self.config.key(), TEMPLATE)
        self.module, self.source_path = load_module(key, lambda: render_template(TEMPLATE, **context))
        self.key = f"{mask.content_hash()}:{self.config.key()}"
        self.last_picks = None
        self._checked: set = set()  # tensor signatures whose checks passed (CompiledAttention._check)
        _REGISTRY[self.key] = self

    def __repr__(self) -> str:
        return f"CompiledTopKAttention({self.mask.name} = {self.mask.expr.fmt()}, {self.config.key()})"

    def select(self, q, k):
        from maskdsl.codegen.topk.select import block_scores, select

        scores = block_scores(q, k, self.mask.layout.shape, self.form.topk.block)
        cand = self._candidates.get(q.device)
        if cand is None:  # copied once per device: a copy per call made the host wait for the GPU every call
            cand = self._candidates[q.device] = self.candidates.to(q.device)
        return select(scores, cand, self.form.topk.k)

    def launch(self, q, k, v, scale, out, lse, tiles: range | None = None) -> None:
        picked, idx, count = self.select(q, k)
        self.last_picks = picked
        dim = q.shape[-1]
        pad = triton.next_power_of_2(dim)
        # the copy engine's box is HEAD_DIM wide: padded head dims take the pointer loads
        tma = tma_descriptors(self.plan, q, k, v, out) if pad == dim else {
            "desc_q": None, "desc_k": None, "desc_v": None, "desc_o": None, "TMA": False}
        launch_kernel(self.module.attention_fwd, self.config, q, k, v, out, lse, (picked, idx, count), scale,
                      tiles or range(self.q_tiles), {**tma, "HEAD_DIM_PAD": pad})

    def _run(self, q, k, v, scale, out, lse, tiles: range | None = None) -> None:
        self.launch(q, k, v, scale, out, lse, tiles)  # the selection is per call: nothing to remember

    @cached_property
    def backward(self):
        """The backward kernels, rendered on first use (inference never pays for them)."""
        from maskdsl.codegen.topk.backward import TopKBackward

        return TopKBackward(self)

    def launch_backward(self, q, k, v, out, lse, dout, scale, dq, dk, dv, selection=None) -> None:
        """Write dq, dk, dv for the forward's selection (not differentiated, as in NSA and MoBA).

        The selection is recomputed from q and k by `select`, the forward's own code path: pooling,
        scoring and the stable sort are deterministic, so it is the forward's, bit for bit, with no
        state kept between calls. `selection` (select's triple) skips the recomputation.
        """
        self.backward.launch(q, k, v, out, lse, dout, scale, dq, dk, dv,
                             self.select(q, k) if selection is None else selection)

    # ---- context parallelism (maskdsl.distributed): a top-k chunk selects from every key ----
    @property
    def frame_tiles(self) -> tuple[int, int]:
        """A chunk holds whole top-k blocks along dimension 0 (its pooled queries are then its own); keys
        come whole: the buffer is always the grid."""
        return self.form.topk.block[0], 1

    def backward_frame_tiles(self, head_dim: int = 128) -> tuple[int, int]:
        return self.frame_tiles

    def _embed(self, x, frames: tuple[int, int], fill: float = 0.0):
        """A whole-grid tensor holding the chunk's rows of `x` and `fill` elsewhere."""
        n = math.prod(self.mask.layout.shape[1:])
        whole = x.new_full((*x.shape[:2], self.mask.layout.tokens, *x.shape[3:]), fill)
        whole[:, :, frames[0] * n:frames[1] * n] = x
        return whole

    def _check_chunk(self, q_frames, k_frames) -> tuple[int, int]:
        n0 = self.mask.layout.shape[0]
        if tuple(k_frames) != (0, n0):
            raise ValueError(f"k_frames={tuple(k_frames)}: a top-k mask selects its key blocks from every key, so "
                             f"its buffer is the whole grid; pass k_frames=(0, {n0})")
        return self.segment(q_frames, k_frames, self.frame_tiles[0], 1).q_frames

    def launch_segment(self, q, k, v, scale: float, out, lse, q_frames, k_frames) -> None:
        """The chunk's queries over every key. Runs the kernel on the chunk's query tiles of a whole-grid
        query tensor (zeros elsewhere): exact, but O(L) memory per rank, and the selection scores every
        query block (a top-k chunk does not yet avoid the whole grid's pooling)."""
        qa, qb = self._check_chunk(q_frames, k_frames)
        check_out_lse(q, out, lse)
        n = math.prod(self.mask.layout.shape[1:])
        whole_out = torch.empty_like(self._embed(q, (qa, qb)))
        whole_lse = torch.empty(whole_out.shape[:3], device=q.device, dtype=torch.float32)
        per_frame = self.q_tiles // self.grid.tiles[0]
        tiles = range(qa // self.config.q_tile[0] * per_frame, -(-qb // self.config.q_tile[0]) * per_frame)
        self.launch(self._embed(q, (qa, qb)), k, v, scale, whole_out, whole_lse, tiles)
        out.copy_(whole_out[:, :, qa * n:qb * n])
        lse.copy_(whole_lse[:, :, qa * n:qb * n])

    def launch_backward_segment(self, q, k, v, out, lse, dout, scale: float, dq, dk, dv, q_frames, k_frames) -> None:
        """The chunk's gradients through the whole-grid backward: other rows carry q = dO = O = 0 and
        lse = +inf, so their probabilities are 0 and they add nothing to dK, dV. Exact; every query tile
        is walked (the backward does not shrink with the rank count yet)."""
        qa, qb = self._check_chunk(q_frames, k_frames)
        n = math.prod(self.mask.layout.shape[1:])
        wq, wo, wd = (self._embed(t, (qa, qb)) for t in (q, out, dout))
        wl = self._embed(lse[..., None], (qa, qb), float("inf"))[..., 0]
        wdq = torch.empty_like(wq)
        self.launch_backward(wq, k, v, wo, wl, wd, scale, wdq, dk, dv)
        dq.copy_(wdq[:, :, qa * n:qb * n])