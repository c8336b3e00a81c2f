"""Render the kernels of a handful of masks as text, without loading them: what the text tests read.

Run as a script to print each rendered backward's line count:
`python tests/rendered_kernels.py` (the before/after figures of issue 24's backward text).
"""

from __future__ import annotations

import sys
from pathlib import Path

import maskdsl
from maskdsl.codegen.backward import render_backward, schedule_tables
from maskdsl.codegen.config import default_backward_config, default_config
from maskdsl.codegen.plan import build_plan
from maskdsl.codegen.render import render

ROOT = Path(__file__).resolve().parent.parent

# (name, spec file or text, mask name)
MASKS = [
    ("video_gna", ROOT / "examples" / "video_gna.mask", "gna"),
    ("window_1d", ROOT / "bench" / "suite" / "window_1d_32k.mask", "window"),
    ("neighborhood_2d", ROOT / "bench" / "suite" / "neighborhood_2d.mask", "local"),
    ("dilated_2d", ROOT / "bench" / "suite" / "dilated_2d.mask", "sparse"),
    ("union_2d_sink", ROOT / "bench" / "suite" / "union_2d_sink.mask", "sparse"),
    ("strided_1d", "layout s = grid(45)\nmask m = neighborhood(window=5, dilation=3) | sliding_window(4)", "m"),
    ("topk_window", ROOT / "bench" / "suite" / "topk_window_16k.mask", "nsa"),
    ("topk_video", ROOT / "bench" / "suite" / "topk_video_3d.mask", None),
]


def _mask(source, name):
    spec = maskdsl.parse(source.read_text() if isinstance(source, Path) else source)
    return spec.masks[0] if name is None else spec.mask(name)


def forward_text(mask) -> str:
    if mask.dynamic:
        from maskdsl.codegen.render import render_template
        from maskdsl.codegen.topk.forward import TEMPLATE, _context, topk_config
        from maskdsl.codegen.topk.grid import TopKGrid
        from maskdsl.harness.topk import normal_form

        cfg = topk_config(mask, None)
        grid = TopKGrid(mask.layout.shape, normal_form(mask.expr).topk.block, cfg.q_tile)
        return render_template(TEMPLATE, **_context(mask, normal_form(mask.expr), cfg, grid, False))
    return render(build_plan(mask, default_config(mask)))


def backward_text(mask) -> str:
    if mask.dynamic:
        from maskdsl.codegen.render import render_template
        from maskdsl.codegen.topk.forward import topk_config
        from maskdsl.codegen.topk.backward import MAX_TILE, TEMPLATE
        from maskdsl.codegen.topk.backward_text import backward_context
        from maskdsl.codegen.topk.grid import TopKGrid
        from maskdsl.analysis.tiles import block_tile
        from maskdsl.harness.topk import normal_form

        form, cfg = normal_form(mask.expr), topk_config(mask, None)
        tile = block_tile(cfg.q_tile, MAX_TILE)
        grid = TopKGrid(mask.layout.shape, form.topk.block, tile)
        return render_template(TEMPLATE, **backward_context(mask, form, cfg, grid))
    config = default_backward_config(mask)
    plan_kv, plan_q = build_plan(mask, config.dkdv), build_plan(mask, config.dq)
    return render_backward(plan_kv, plan_q, schedule_tables(plan_kv, plan_q))


def masks():
    return [(name, _mask(source, mname)) for name, source, mname in MASKS]


if __name__ == "__main__":
    which = sys.argv[1:] or ["backward"]
    for name, mask in masks():
        counts = []
        for kind in which:
            text = (backward_text if kind == "backward" else forward_text)(mask)
            counts.append(f"{kind} {len(text.splitlines())} lines, {len(text)} characters")
        print(f"{name:18s} {', '.join(counts)}   # {mask.expr.fmt()} on {mask.layout.shape}")
