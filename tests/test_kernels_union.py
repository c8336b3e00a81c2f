"""Unions of product terms: the dominant term runs like a single term, the others only where it does not.

Forward and backward under the interpreter against the float64 reference from NaN-poisoned outputs,
and the forward's tile visits spied on: every key tile with an attended pair is visited exactly once,
a tile runs without the predicate only when every row sees every key of it, and the union runs
exactly as many unmasked tiles as its dominant term alone.
"""

import numpy as np
import pytest
import torch

import maskdsl
from maskdsl.codegen.build import compile_attention
from maskdsl.codegen.config import BackwardConfig, KernelConfig
from maskdsl.codegen.plan import build_plan, tile_rows
from maskdsl.codegen.render import render
from maskdsl.harness.measure import relative_error as rel_err

from conftest import case_seed

CASES = [
    # (id, spec text, q_tile, kv_tile); the sink comes first in some texts: the plan reorders
    ("1d-window-sink", "layout s = grid(101)\nmask m = sink(5) | sliding_window(37)", (16,), (16,)),
    ("1d-causal-window-sink", "layout s = grid(133)\nmask m = sliding_window(40, causal=true) | sink(4)", (32,), (16,)),
    ("2d-neighborhood-sink", "layout g = grid(15, 14)\nmask m = neighborhood(window=(9, 9)) | sink(6)", (4, 4), (4, 4)),
    ("3d-two-neighborhoods", ("layout v = grid(5, 6, 7)\nmask m = neighborhood(window=(2, 3, 3)) | "
                              "neighborhood(window=(5, 5, 5), causal=(true, false, false))"), (1, 4, 4), (2, 2, 4)),
    ("1d-heavy-overlap", "layout s = grid(97)\nmask m = sliding_window(30) | sliding_window(34, causal=true)",
     (16,), (16,)),
    ("1d-dilated-sink-strided", "layout s = grid(50)\nmask m = dilated(window=5, dilation=3) | sink(4)", (16,), (16,)),
]


def _compile(text, q_tile, kv_tile):
    spec = maskdsl.parse(text)
    cfg = KernelConfig(q_tile, kv_tile)
    return spec, compile_attention(spec, "m", cfg, BackwardConfig(cfg, cfg))


def _inputs(spec, heads, kv_heads, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = spec.masks[0].layout.tokens
    shapes = [(1, h, tokens, dim) for h in (heads, kv_heads, kv_heads, heads)]
    return tuple(torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes)


@pytest.mark.parametrize("name,text,q_tile,kv_tile", CASES, ids=[c[0] for c in CASES])
def test_union_forward_and_backward_match_reference(name, text, q_tile, kv_tile):
    spec, fn = _compile(text, q_tile, kv_tile)
    q, k, v, do = _inputs(spec, 2, 1, 16, case_seed(name))
    qf, kf, vf, dof = (t.float() for t in (q, k, v, do))
    out = torch.full_like(qf, float("nan"))
    lse = torch.full(qf.shape[:3], float("nan"))
    fn.launch(qf, kf, vf, 0.25, out, lse)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = maskdsl.reference_attention(*leaves, spec, "m", scale=0.25, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "an output element was not written"
    assert rel_err(out.double(), ref.detach()) < 2e-5
    torch.testing.assert_close(lse.double(), ref_lse.detach(), rtol=1e-5, atol=1e-5)

    grads = [torch.full_like(t, float("nan")) for t in (qf, kf, vf)]
    fn.launch_backward(qf, kf, vf, out, lse, dof, 0.25, *grads)
    want = torch.autograd.grad(ref, leaves, do)
    for n, a, b in zip("qkv", grads, want):
        assert not torch.isnan(a).any(), f"d{n}: an element was not written"
        assert rel_err(a.double(), b) < 1e-5, (n, rel_err(a.double(), b))


def _visits(fn, q):
    """Per query tile: the (key tile coordinates, masked) pairs `_attend_tile` ran, spied on in the
    interpreter (a nested jit call resolves `_attend_tile` through the module's globals)."""
    module = fn.module
    real = module._attend_tile
    rank = fn.plan.rank
    log = []

    def scalar(x):
        h = getattr(x, "handle", x)
        return np.asarray(getattr(h, "data", h)).reshape(-1)[0]

    def spy(*args, **kwargs):
        bound = dict(zip(real.arg_names, args), **kwargs)
        log.append((tuple(int(scalar(bound[f"c_{d}"])) for d in range(rank)), bool(scalar(bound["MASKED"]))))
        return real(*args, **kwargs)

    out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
    per_tile = []
    module._attend_tile = spy
    try:
        for t in range(fn.plan.q_tiles):
            log.clear()
            fn.launch(q, q, q, 0.5, out, lse, tiles=range(t, t + 1))
            per_tile.append(list(log))
    finally:
        module._attend_tile = real
    return per_tile


def _key_tile(plan, c):
    """Flat token indices of key tile c (an undilated layout)."""
    keys = [0]
    for dim, ci in zip(plan.dims, c):
        coords = [x for x in range(ci * dim.kv_tile, (ci + 1) * dim.kv_tile) if x < dim.extent]
        keys = [k + x * dim.stride for k in keys for x in coords]
    return keys


def _all_key_tiles(plan):
    tiles = [()]
    for dim in plan.dims:
        tiles = [c + (x,) for c in tiles for x in range(-(-dim.extent // dim.kv_tile))]
    return tiles


@pytest.mark.parametrize("text,alone,q_tile,kv_tile", [
    ("layout s = grid(150)\nmask m = sliding_window(40, causal=true) | sink(4)",
     "layout s = grid(150)\nmask m = sliding_window(40, causal=true)", (32,), (16,)),
    ("layout g = grid(14, 12)\nmask m = sink(6) | neighborhood(window=(9, 7))",
     "layout g = grid(14, 12)\nmask m = neighborhood(window=(9, 7))", (4, 4), (4, 4)),
], ids=["1d-causal-window-sink", "2d-neighborhood-sink"])
def test_union_visits_each_tile_once_and_full_tiles_unmasked(text, alone, q_tile, kv_tile):
    spec, fn = _compile(text, q_tile, kv_tile)
    plan = fn.plan
    mask = maskdsl.reference_mask(spec, "m").numpy()
    q = torch.randn(1, 1, mask.shape[0], 16, generator=torch.Generator().manual_seed(case_seed(text)))
    visits = _visits(fn, q)
    unmasked = 0
    for t, tile_visits in enumerate(visits):
        rows = tile_rows(plan, t)
        coords = [c for c, _ in tile_visits]
        assert len(coords) == len(set(coords)), f"query tile {t} visits a key tile twice: {sorted(coords)}"
        needed = {c for c in _all_key_tiles(plan) if mask[np.ix_(rows, _key_tile(plan, c))].any()}
        assert set(coords) == needed, f"query tile {t}: visited {sorted(coords)}, attended {sorted(needed)}"
        for c, masked in tile_visits:
            keys = _key_tile(plan, c)
            if not masked:
                unmasked += 1
                assert len(keys) == plan.config.block_n and mask[np.ix_(rows, keys)].all(), (t, c)
    _, fn_alone = _compile(alone, q_tile, kv_tile)
    alone_unmasked = sum(not m for tile in _visits(fn_alone, q) for _, m in tile)
    assert unmasked == alone_unmasked > 0, "the union must run its dominant term's full tiles unmasked"


def test_dominant_term_leads_and_its_full_box_has_no_predicate():
    spec = maskdsl.parse("layout s = grid(65536)\nmask m = sink(4) | sliding_window(4096, causal=true)")
    plan = build_plan(spec.masks[0], KernelConfig((128,), (64,), num_stages=3))
    assert plan.full_box
    assert [td.restricts_queries for (td,) in plan.terms] == [False, True, False], "the window leads"
    source = render(plan)
    assert "full_lo_0_0, full_hi_0_0,\n" in source
    call = source[source.index("full_lo_0_0, full_hi_0_0,\n"):]
    assert call[:call.index(")")].endswith("MASKED=False"), "the full box runs without the predicate"
    assert "num_stages=3" in source, "the boxes are software-pipelined"
    # term 1 (sink rows) walks only what lies outside term 0's box: two boxes, no per-tile check
    term1 = source[source.index("# term 1"):source.index("# term 2")]
    assert term1.count("_attend_box(") == 2 and "seen" not in term1
