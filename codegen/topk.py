"""Compiled attention for masks with a top-k term: score, select, then attend (1-D token order).

The call is three launches: K pooling, fused Q pooling + block scores, and the attention
kernel over S | (picked & R). Selection in between is torch's stable sort on the block-level
scores (ties to the lower index). Only the [query blocks, key blocks] candidate map of R is
computed at compile time (closed form); nothing is ever [L, L].
"""

from __future__ import annotations

import math


from maskdsl.codegen.compiled import _REGISTRY, CompiledAttention, launch_kernel
from maskdsl.codegen.config import KernelConfig
from maskdsl.codegen.plan import TermDim, UnsupportedMask
from maskdsl.codegen.render import UNNAMED, comment_safe, kernel_key, load_module, render_template
from maskdsl import ir
from maskdsl.analysis import NotAnalyzable, products
from maskdsl.topk import candidate_blocks, normal_form

TEMPLATE = "attention_topk.py.jinja"


def _terms(expr, shape, what):
    if expr is None:
        return []
    try:
        terms = products(expr, shape)
    except NotAnalyzable as exc:
        raise UnsupportedMask(f"{what}: {exc}") from None
    out = []
    for t in terms:
        rel = t.sym[0]
        if rel.dilation != 1:
            raise UnsupportedMask(f"{what}: dilation is not supported together with top-k")
        n = shape[0]
        out.append(TermDim(rel.lo, rel.hi, rel.qa, rel.query_stop(n), rel.qa > 0 or rel.query_stop(n) < n))
    return out


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
        s_terms = _terms(form.static, mask.layout.shape, f"mask {mask.name!r}, static part")
        r_terms = _terms(form.restrict, mask.layout.shape, f"mask {mask.name!r}, top-k restriction")
        self.candidates = candidate_blocks(form, mask.layout.shape)
        from maskdsl.version import __version__

        # The name is not rendered (the file is the same whatever the mask is called); texts in comments are escaped.
        context = dict(version=__version__, mask_name=UNNAMED, mask_text=comment_safe(mask.expr.fmt()), topk=form.topk,
                       tokens=tokens, s_text=comment_safe(form.static.fmt() if form.static else "none"),
                       r_text=comment_safe(form.restrict.fmt()),
                       cfg=self.config, block_m=self.config.block_m, block_n=self.config.block_n,
                       q_tiles=self.q_tiles, nblocks=self.nblocks, k_eff=min(form.topk.k, self.nblocks),
                       tiles_per_block=form.topk.block // self.config.block_n,
                       s_terms=s_terms, r_terms=r_terms,
                       fast_picked=not s_terms and isinstance(form.restrict, ir.Full) and tokens % self.config.block_n == 0)
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

