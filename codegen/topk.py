"""Compiled attention for masks with a top-k term: score, select, then attend (1-D token order).

The call is three launches: K pooling, fused Q pooling + block scores, and the attention
kernel over S | (picked & R). Selection in between is torch's stable sort on the block-level
scores (ties to the lower index). Only the [query blocks, key blocks] candidate map of R is
computed at compile time (closed form); nothing is ever [L, L].
"""

from __future__ import annotations

import math
from functools import cached_property

from maskdsl.codegen.compiled import _REGISTRY, CompiledAttention, launch_kernel
from maskdsl.codegen.config import KernelConfig
from maskdsl.codegen.bounds import KernelDim, term_text
from maskdsl.codegen.context import join, query_text, wrap
from maskdsl.codegen.plan import DimPlan, TermDim, UnsupportedMask
from maskdsl.codegen.printer import Temps
from maskdsl.codegen.render import UNNAMED, comment_safe, kernel_key, load_module, render_template
from maskdsl import ir
from maskdsl.analysis import NotAnalyzable, products
from maskdsl.topk import candidate_blocks, normal_form

TEMPLATE = "attention_topk.py.jinja"


def _terms(expr, shape, what) -> list[tuple[TermDim, ...]]:
    if expr is None:
        return []
    try:
        terms = products(expr, shape)
    except NotAnalyzable as exc:
        raise UnsupportedMask(f"{what}: {exc}") from None
    if any(t.sym[0].dilation != 1 for t in terms):
        raise UnsupportedMask(f"{what}: dilation is not supported together with top-k")
    return [(TermDim.of(t.sym[0], shape[0]),) for t in terms]


def _context(mask: ir.MaskDef, form, config: KernelConfig, q_tiles: int, nblocks: int) -> dict:
    """The top-k template's input: the shared query-tile text, the S and R terms' bounds, the calls."""
    from maskdsl.version import __version__

    tokens, block, bn = mask.layout.tokens, form.topk.block, config.block_n
    dim = KernelDim(0, DimPlan(tokens, 1, 1, config.block_m, bn), 1, 1)
    temps = Temps()
    s_terms = [term_text(f"s{t}", term, [dim], temps, full=True)
               for t, term in enumerate(_terms(form.static, mask.layout.shape, f"mask {mask.name!r}, static part"))]
    r_terms = [term_text(f"r{t}", term, [dim], temps, full=True)
               for t, term in enumerate(_terms(form.restrict, mask.layout.shape,
                                               f"mask {mask.name!r}, top-k restriction"))]

    def inside(kind, terms):
        return [f"(kt >= {kind}_lo_{t.label}_0) & (kt <= {kind}_hi_{t.label}_0)" for t in terms]

    def pred(terms):
        return [f"_between(kc, lo_{t.label}_0, hi_{t.label}_0)" for t in terms]

    def either(conds):
        return conds[0] if len(conds) == 1 else " | ".join(f"({c})" for c in conds)

    past_end = [f"kt * {bn} >= {tokens}"] if tokens % block else []  # the last block's tiles past the grid
    covered = [either(inside("kt", s_terms[:s])) for s in range(len(s_terms))]
    covered.append(either(past_end + inside("kt", s_terms)) if past_end or s_terms else "")
    r_full = either(inside("full", r_terms))
    if tokens % bn:
        r_full = f"((kt + 1) * {bn} <= {tokens}) & ({r_full})"
    tpb = block // bn
    bounds = [f"{b}_{t.label}_0" for t in s_terms + r_terms for b in ("lo", "hi")]
    state = ["acc", "m_i", "l_i", "q", "qk_scale", "kt"]
    memory = ["k_base", "v_base", "stride_kl", "stride_vl"]

    def call(picked, masked, static):
        return wrap("acc, m_i, l_i = _attend_tile(", [state, bounds, memory + [
            picked, "HEAD_DIM", "DOT_F32", f"MASKED={masked}", f"STATIC={static}"]], 12)

    params = state + bounds + memory + ["picked", "HEAD_DIM: tl.constexpr", "DOT_F32: tl.constexpr",
                                        "MASKED: tl.constexpr", "STATIC: tl.constexpr"]
    return dict(
        # the name is not rendered (the file is the same whatever the mask is called); comment texts are escaped
        version=__version__, mask_name=UNNAMED, mask_text=comment_safe(mask.expr.fmt()), topk=form.topk,
        tokens=tokens, s_text=comment_safe(form.static.fmt() if form.static else "none"),
        r_text=comment_safe(form.restrict.fmt()), cfg=config,
        block_m=config.block_m, block_n=bn, q_tiles=q_tiles, nblocks=nblocks, k_eff=min(form.topk.k, nblocks),
        tiles_per_block=tpb, s_terms=s_terms, r_terms=r_terms,
        fast_picked=not s_terms and isinstance(form.restrict, ir.Full) and tokens % bn == 0,
        q=query_text([dim], config.block_m, bn, tma=False),
        fdiv=any("_fdiv(" in line for t in s_terms + r_terms for line in t.rows + t.tiles),
        tile_params="\n".join(wrap("def _attend_tile(", params, 0, tail=""))[len("def _attend_tile("):],
        keep_static=join("keep = ", pred(s_terms) + [f"(picked & {either(pred(r_terms))})"], " | ", 12)
        if s_terms else ["keep = False"],
        keep_picked=join("keep = ", pred(r_terms), " | ", 12), covered=covered, r_full=r_full,
        picked_block="picked_row + kt" if tpb == 1 else f"picked_row + kt // {tpb}",
        picked_count="n_picked" if tpb == 1 else f"n_picked * {tpb}",
        s_full=either(inside("full", s_terms)) if s_terms else "False",
        picked_tile="tl.load(idx_row + it)" if tpb == 1 else f"tl.load(idx_row + it // {tpb}) * {tpb} + it % {tpb}",
        calls={"static_full": call("False", False, True), "static_masked": call("picked", True, True),
               "picked_full": call("False", False, False), "picked_masked": call("False", True, False)},
    )


def topk_config(mask: ir.MaskDef, config: KernelConfig | None) -> KernelConfig:
    block = normal_form(mask.expr).topk.block
    tile = config.q_tile[0] if config else min(block, 128)
    if block % 16 or tile & (tile - 1) or block % tile or tile < 16:
        raise UnsupportedMask(f"topk block={block}: the kernel needs a block that is a multiple of a power-of-two "
                              f"tile of 16..256 tokens (e.g. 64 or 128)")
    warps = config.num_warps if config else 8 if tile >= 128 else 4
    stages = config.num_stages if config else 2
    return KernelConfig((tile,), (tile,), warps, stages)


class CompiledTopKAttention(CompiledAttention):
    """Same call surface as CompiledAttention; `launch` also runs the scoring and the selection."""

    def __init__(self, mask: ir.MaskDef, config: KernelConfig | None = None):  # noqa: super() is for static plans
        if mask.layout.rank != 1:
            raise UnsupportedMask(f"mask {mask.name!r}: top-k runs on 1-D layouts (token sequences); "
                                  f"{mask.layout.name!r} has {mask.layout.rank} dimensions")
        form = normal_form(mask.expr)
        self.mask, self.form = mask, form
        self.config = topk_config(mask, config)
        tokens = mask.layout.tokens
        self.nblocks = math.ceil(tokens / form.topk.block)
        self.q_tiles = math.ceil(tokens / self.config.block_m)
        self.candidates = candidate_blocks(form, mask.layout.shape)
        context = _context(mask, form, self.config, self.q_tiles, self.nblocks)
        key = kernel_key(mask.content_hash(), self.config.key(), TEMPLATE)
        self.module, self.source_path = load_module(key, lambda: render_template(TEMPLATE, **context))
        self.key = f"{mask.content_hash()}:{self.config.key()}"
        self.last_picks = None
        _REGISTRY[self.key] = self

    def __repr__(self) -> str:
        return f"CompiledTopKAttention({self.mask.name} = {self.mask.expr.fmt()}, {self.config.key()})"

    def select(self, q, k):
        from maskdsl.codegen.topk_select import block_scores, select

        scores = block_scores(q, k, self.form.topk.block)
        cand = self.candidates.to(q.device)
        return select(scores, cand, self.form.topk.k)

    def launch(self, q, k, v, scale, out, lse, tiles: range | None = None) -> None:
        picked, idx, count = self.select(q, k)
        self.last_picks = picked
        launch_kernel(self.module.attention_fwd, self.config, q, k, v, out, lse, (picked, idx, count), scale,
                      tiles or range(self.q_tiles))

    @cached_property
    def backward(self):
        """The backward kernels, rendered on first use (inference never pays for them)."""
        from maskdsl.codegen.topk_backward import TopKBackward

        return TopKBackward(self)

    def launch_backward(self, q, k, v, out, lse, dout, scale, dq, dk, dv, selection=None) -> None:
        """Write dq, dk, dv for the forward's selection (not differentiated, as in NSA and MoBA).

        The selection is recomputed from q and k by `select`, the forward's own code path: pooling,
        scoring and the stable sort are deterministic, so it is the forward's, bit for bit, with no
        state kept between calls. `selection` (select's triple) skips the recomputation.
        """
        self.backward.launch(q, k, v, out, lse, dout, scale, dq, dk, dv,
                             self.select(q, k) if selection is None else selection)
