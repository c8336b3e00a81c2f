"""Kernels under Triton's interpreter against the float64 reference, on small odd-sized problems.

Every run starts from a NaN-poisoned output: an element the kernel forgets to write fails.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskdsl
from maskdsl.codegen.config import KernelConfig
from maskdsl.harness.measure import relative_error as rel_err

from conftest import case_seed

CASES = [
    # (id, spec text, q_tile, kv_tile)
    ("1d-window-even", "layout s = grid(45)\nmask m = sliding_window(10)", (16,), (16,)),
    ("1d-causal-window", "layout s = grid(45)\nmask m = sliding_window(9, causal=true)", (16,), (32,)),
    ("1d-strided-causal", "layout s = grid(45)\nmask m = neighborhood(window=12, stride=4, causal=true)", (16,), (16,)),
    ("1d-dilated", "layout s = grid(50)\nmask m = dilated(window=5, dilation=3)", (16,), (16,)),
    ("1d-blocked", "layout s = grid(40)\nmask m = block(8)", (16,), (16,)),
    ("1d-full-causal", "layout s = grid(33)\nmask m = causal", (16,), (16,)),
    ("1d-dense", "layout s = grid(21)\nmask m = full", (16,), (16,)),
    ("2d-neighborhood", "layout g = grid(9, 13)\nmask m = neighborhood(window=(5, 6))", (4, 4), (4, 8)),
    ("2d-causal-dim0", "layout g = grid(9, 13)\nmask m = neighborhood(window=(4, 7), causal=(true, false))", (2, 8), (4, 4)),
    ("2d-gna-stride", "layout g = grid(10, 12)\nmask m = neighborhood(window=(6, 8), stride=(2, 4))", (2, 8), (2, 8)),
    ("2d-dilated", "layout g = grid(11, 10)\nmask m = neighborhood(window=(3, 3), dilation=(2, 3))", (4, 4), (4, 4)),
    ("3d-neighborhood", "layout v = grid(3, 5, 6)\nmask m = neighborhood(window=(2, 3, 4), stride=(1, 2, 1))",
     (1, 4, 4), (2, 2, 4)),
    ("3d-causal-frames", "layout v = grid(4, 4, 5)\nmask m = neighborhood(window=(2, 4, 3), causal=(true, false, false))",
     (2, 2, 4), (2, 4, 4)),
    ("union-sink", "layout g = grid(7, 9)\nmask m = neighborhood(window=(3, 4)) | sink(5)", (2, 8), (4, 4)),
    ("streaming-llm", "layout s = grid(40)\nmask m = (sliding_window(5, causal=true) | sink(3)) & causal", (16,), (16,)),
    ("union-two-windows", "layout s = grid(48)\nmask m = sliding_window(4) | neighborhood(window=16, stride=16)",
     (16,), (16,)),
    ("intersection-empty-rows", "layout s = grid(40)\nmask m = sink(3) & neighborhood(window=2)", (16,), (16,)),
    ("dilated-and-window", "layout s = grid(23)\nmask m = dilated(window=5, dilation=2) & sliding_window(6)", (16,), (16,)),
    ("causal-2d-flat", "layout g = grid(5, 7)\nmask m = causal & neighborhood(window=(3, 5))", (4, 4), (2, 8)),
    # perfectly block-sparse: the kernel has no partial-tile loops at all (plan.shell_free)
    ("3d-blocked-shell-free", "layout v = grid(4, 8, 8)\nmask m = block((2, 4, 4))", (2, 4, 4), (1, 4, 4)),
    ("2d-gna-shell-free", "layout g = grid(8, 16)\nmask m = neighborhood(window=(6, 8), stride=(2, 8))", (2, 8), (2, 8)),
]


def run_case(text, q_tile, kv_tile, batch=1, heads=2, kv_heads=1, dim=16, dtype=torch.float32, token_major=False):
    spec = maskdsl.parse(text)
    fn = maskdsl.compile(spec, "m", KernelConfig(q_tile, kv_tile))
    tokens = spec.masks[0].layout.tokens
    gen = torch.Generator().manual_seed(case_seed(text, q_tile, kv_tile, batch, heads, kv_heads, dim, dtype, token_major))

    def draw(h):
        if token_major:  # [B, L, H, D] memory seen as [B, H, L, D], as many models hold it
            return torch.randn(batch, tokens, h, dim, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(batch, h, tokens, dim, generator=gen).to(dtype)

    q, k, v = draw(heads), draw(kv_heads), draw(kv_heads)
    out = torch.full_like(q, float("nan"))
    o, lse = fn(q, k, v, out=out, return_lse=True)
    ref, ref_lse = maskdsl.reference_attention(q, k, v, spec, "m", return_lse=True)
    assert not torch.isnan(o).any(), "an output element was not written (or is NaN)"
    assert not torch.isnan(lse).any()
    return o.double(), lse.double(), ref, ref_lse


@pytest.mark.parametrize("name,text,q_tile,kv_tile", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference_fp32(name, text, q_tile, kv_tile):
    o, lse, ref, ref_lse = run_case(text, q_tile, kv_tile)
    assert rel_err(o, ref) < 2e-3
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows with no key must have LSE -inf, the others finite"
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-4)
    assert torch.all(o[~finite] == 0), "rows with no key must be 0"


def test_gqa_batch_and_head_dim_64():
    o, _, ref, _ = run_case("layout g = grid(6, 7)\nmask m = neighborhood(window=(3, 5))", (4, 4), (2, 8),
                            batch=2, heads=4, kv_heads=2, dim=64)
    assert rel_err(o, ref) < 2e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_against_fp32_reference(dtype):
    o, _, ref, _ = run_case("layout s = grid(45)\nmask m = sliding_window(11)", (16,), (16,), dtype=dtype)
    assert rel_err(o, ref) < (2e-2 if dtype == torch.bfloat16 else 5e-3)


@settings(max_examples=6, deadline=None)
@given(st.integers(5, 13), st.integers(5, 13), st.data())
def test_random_2d_neighborhoods(n0, n1, data):
    w0, w1 = data.draw(st.integers(1, n0)), data.draw(st.integers(1, n1))
    s0, s1 = data.draw(st.integers(1, w0)), data.draw(st.integers(1, w1))
    c0 = data.draw(st.booleans())
    text = (f"layout g = grid({n0}, {n1})\nmask m = neighborhood(window=({w0}, {w1}), stride=({s0}, {s1}), "
            f"causal=({str(c0).lower()}, false))")
    q_tile = data.draw(st.sampled_from([(4, 4), (2, 8), (1, 16)]))
    kv_tile = data.draw(st.sampled_from([(4, 4), (2, 8), (8, 2)]))
    o, _, ref, _ = run_case(text, q_tile, kv_tile, heads=1)
    assert rel_err(o, ref) < 2e-3, text


def test_strided_views_are_accepted(gen):
    spec = maskdsl.parse("layout s = grid(20)\nmask m = sliding_window(5)")
    fn = maskdsl.compile(spec, "m", KernelConfig((16,), (16,)))
    base = torch.randn(1, 20, 2, 16, generator=gen)  # [B, L, H, D], as many models hold it
    q = base.transpose(1, 2)
    out = fn(q, q, q)
    ref = maskdsl.reference_attention(q, q, q, spec, "m")
    assert rel_err(out.double(), ref) < 2e-3


BAD_ARGS = [
    ("wrong tokens", lambda q: (q[:, :, :7], q[:, :, :7], q[:, :, :7]), "has 7 tokens"),
    ("3-D tensor", lambda q: (q[0], q, q), "must be [B, H, L, D]"),
    ("int dtype", lambda q: (q.to(torch.int32), q, q), "dtype is torch.int32"),
    ("mixed dtypes", lambda q: (q, q.to(torch.float16), q), "share one dtype"),
    ("kv heads", lambda q: (q.expand(1, 3, 20, 16), q.expand(1, 2, 20, 16), q.expand(1, 2, 20, 16)),
     "must divide query heads"),
    ("head_dim", lambda q: (q[..., :12], q[..., :12], q[..., :12]), "head_dim 12 is not supported"),
    ("last dim stride", lambda q: (q.transpose(2, 3).contiguous().transpose(2, 3)[..., :16, :],) * 3, None),
]


@pytest.mark.parametrize("name,make,words", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_bad_arguments_name_the_argument(name, make, words):
    spec = maskdsl.parse("layout s = grid(20)\nmask m = sliding_window(5)")
    fn = maskdsl.compile(spec, "m", KernelConfig((16,), (16,)))
    q = torch.randn(1, 1, 20, 16)
    if words is None:  # a square [20, 16] can't be transposed in place; build a real non-unit last stride
        t = torch.randn(1, 1, 16, 40)[..., ::2].transpose(2, 3)
        with pytest.raises(ValueError, match="contiguous in its last dimension"):
            fn(t, t, t)
        return
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        fn(*make(q))


def test_bad_config_is_a_clear_error():
    spec = maskdsl.parse("layout g = grid(8, 8)\nmask m = neighborhood(window=3)")
    with pytest.raises(ValueError, match="every extent must be a power of two"):
        maskdsl.compile(spec, "m", KernelConfig((3, 8), (4, 4)))
    with pytest.raises(ValueError, match="has 1 entries but the layout has 2"):
        maskdsl.compile(spec, "m", KernelConfig((16,), (4, 4)))


def test_torch_compile_has_no_graph_break(gen):
    spec = maskdsl.parse("layout s = grid(20)\nmask m = sliding_window(5)")
    fn = maskdsl.compile(spec, "m", KernelConfig((16,), (16,)))

    def model(q, k, v):
        return fn(q * 2.0, k, v) + 1.0

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    q, k, v = (torch.randn(1, 1, 20, 16, generator=gen) for _ in range(3))
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v))


def test_source_is_cached_readable_and_a_warm_compile_renders_nothing(tmp_path, monkeypatch):
    """docs/DESIGN.md §7's warm-compile target rests on this: a second compile of the same mask and config neither
    renders nor re-imports (same module); a new process renders again and finds its verified file."""
    from maskdsl.codegen import cache, render

    monkeypatch.setenv("MASKDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "_LOADED", {})  # whatever earlier tests in this process compiled
    monkeypatch.setattr(cache, "_RENDERED", {})
    rendered = []
    real = render.render
    monkeypatch.setattr(render, "render", lambda plan: rendered.append(plan) or real(plan))
    spec = maskdsl.parse("layout g = grid(9, 13)\nmask m = neighborhood(window=(5, 6))")
    cfg = KernelConfig((4, 4), (4, 8))
    fn = maskdsl.compile(spec, "m", cfg)
    again = maskdsl.compile(spec, "m", cfg)
    assert len(rendered) == 1 and again.module is fn.module
    monkeypatch.setattr(cache, "_LOADED", {})  # as a fresh process sees it
    monkeypatch.setattr(cache, "_RENDERED", {})
    fresh = maskdsl.compile(spec, "m", cfg)
    assert fresh.source_path == fn.source_path and len(rendered) == 2 and fresh.module is not fn.module
    assert again.source_path == fn.source_path and fn.source_path.parent == tmp_path / "kernels"
    assert "neighborhood(window=(5, 6))" in fn.source and "q_tile=(4, 4)" in fn.source
    compile(fn.source, str(fn.source_path), "exec")  # it is valid Python


def test_default_scale_is_inverse_sqrt_head_dim(gen):
    spec = maskdsl.parse("layout s = grid(16)\nmask m = full")
    fn = maskdsl.compile(spec, "m", KernelConfig((16,), (16,)))
    q, k, v = (torch.randn(1, 1, 16, 32, generator=gen) for _ in range(3))
    a = fn(q, k, v)
    b = fn(q, k, v, scale=1 / math.sqrt(32))
    c = fn(q, k, v, scale=0.5)
    torch.testing.assert_close(a, b)
    assert rel_err(c.double(), maskdsl.reference_attention(q, k, v, spec, "m", scale=0.5)) < 2e-3


def test_nn_module_matches_reference_and_compiles_fullgraph(gen):
    from maskdsl.nn import MaskedAttention

    spec = maskdsl.parse("layout g = grid(6, 7)\nmask m = neighborhood(window=(3, 5), stride=(1, 2))")
    layer = MaskedAttention(spec, "m", KernelConfig((4, 4), (2, 8)))
    assert "neighborhood(window=(3, 5), stride=(1, 2))" in repr(layer)
    q, k, v = (torch.randn(2, 2, 42, 32, generator=gen) for _ in range(3))
    ref = maskdsl.reference_attention(q, k, v, spec, "m")
    assert rel_err(layer(q, k, v).double(), ref) < 2e-3
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert rel_err(compiled(q, k, v).double(), ref) < 2e-3


def _tile_classes(spec, plan):
    """(visited, partial) tile-pair counts from the oracle's dense mask: independent of the plan's algebra.

    A key tile is a box of the grid (no dilation here); it is full for a query tile when it lies inside
    the grid and every (row, key) pair is attended, as the kernel's full-tile loop assumes.
    """
    import itertools

    from maskdsl.codegen.plan import tile_rows
    from maskdsl.harness.semantics import static_mask

    shape = plan.shape
    dense = static_mask(spec.masks[0].expr, shape)
    flat = torch.tensor([math.prod(shape[d + 1:]) for d in range(len(shape))])
    boxes = [range(-(-n // t)) for n, t in zip(shape, plan.config.kv_tile)]
    visited = partial = 0
    for tile in range(plan.q_tiles):
        rows = torch.tensor(tile_rows(plan, tile))
        if len(rows) == 0:
            continue
        for box in itertools.product(*boxes):
            axes = [torch.arange(b * t, (b + 1) * t) for b, t in zip(box, plan.config.kv_tile)]
            coords = torch.cartesian_prod(*axes).view(-1, len(shape))
            inside = (coords < torch.tensor(shape)).all(1)
            seen = dense[rows][:, (coords[inside] * flat).sum(1)]
            if seen.any():
                visited += 1
                partial += int(not (inside.all() and seen.all()))
    return visited, partial


SHELL_CASES = [
    ("layout v = grid(4, 8, 8)\nmask m = block((2, 4, 4))", (2, 4, 4), (1, 4, 4)),
    ("layout v = grid(4, 8, 8)\nmask m = block((2, 4, 4))", (2, 4, 4), (2, 8, 4)),
    ("layout v = grid(5, 8, 8)\nmask m = block((2, 4, 4))", (2, 4, 4), (2, 4, 4)),
    ("layout g = grid(8, 16)\nmask m = neighborhood(window=(4, 8), stride=(2, 8))", (2, 8), (2, 8)),
    ("layout g = grid(8, 16)\nmask m = neighborhood(window=(6, 8), stride=(2, 8))", (2, 8), (2, 8)),
    ("layout g = grid(8, 16)\nmask m = neighborhood(window=(6, 8), stride=(2, 8))", (2, 8), (4, 8)),
    ("layout g = grid(8, 16)\nmask m = neighborhood(window=(6, 8), stride=(4, 8))", (4, 8), (2, 8)),
    ("layout g = grid(8, 16)\nmask m = neighborhood(window=(3, 8), stride=(3, 8))", (2, 8), (2, 8)),
    ("layout s = grid(64)\nmask m = full", (16,), (32,)),
    ("layout s = grid(60)\nmask m = full", (16,), (32,)),
    ("layout s = grid(64)\nmask m = sliding_window(16)", (16,), (16,)),
]


@pytest.mark.parametrize("text,q_tile,kv_tile", SHELL_CASES)
def test_shell_free_plans_are_exactly_those_without_partial_tiles(text, q_tile, kv_tile):
    from maskdsl.codegen.plan import build_plan

    spec = maskdsl.parse(text)
    plan = build_plan(spec.masks[0], KernelConfig(q_tile, kv_tile))
    visited, partial = _tile_classes(spec, plan)
    assert visited > 0
    assert plan.shell_free == (partial == 0), (visited, partial)


PATH_CASES = [
    # (id, spec, q_tile, kv_tile, batch, token_major, env MASKDSL_TMA, copy engine expected)
    ("contiguous", "layout v = grid(3, 5, 6)\nmask m = neighborhood(window=(2, 3, 4))", (1, 4, 4), (2, 2, 4),
     2, False, None, True),
    ("token-major-batch-1", "layout g = grid(9, 13)\nmask m = neighborhood(window=(5, 6))", (4, 4), (4, 8),
     1, True, None, True),
    ("token-major-batch-2", "layout g = grid(9, 13)\nmask m = neighborhood(window=(5, 6))", (4, 4), (4, 8),
     2, True, None, False),
    ("switched-off", "layout s = grid(45)\nmask m = sliding_window(10)", (16,), (16,), 1, False, "0", False),
    ("dilated", "layout s = grid(50)\nmask m = dilated(window=5, dilation=3)", (16,), (16,), 1, False, None, False),
]


@pytest.mark.parametrize("name,text,q_tile,kv_tile,batch,token_major,env,expect", PATH_CASES,
                         ids=[c[0] for c in PATH_CASES])
def test_copy_engine_and_pointer_paths(monkeypatch, name, text, q_tile, kv_tile, batch, token_major, env, expect):
    """The copy-engine (TMA) path is taken exactly where the layout allows it, and both paths are exact."""
    from maskdsl.codegen.compiled import tma_descriptors

    if env is not None:
        monkeypatch.setenv("MASKDSL_TMA", env)
    spec = maskdsl.parse(text)
    fn = maskdsl.compile(spec, "m", KernelConfig(q_tile, kv_tile))
    tokens = spec.masks[0].layout.tokens
    shape = (batch, tokens, 2, 16) if token_major else (batch, 2, tokens, 16)
    t = torch.randn(*shape)
    t = t.transpose(1, 2) if token_major else t
    assert tma_descriptors(fn.plan, t, t, t, torch.empty_like(t))["TMA"] is expect
    o, lse, ref, ref_lse = run_case(text, q_tile, kv_tile, batch=batch, token_major=token_major)
    assert rel_err(o, ref) < 2e-3
