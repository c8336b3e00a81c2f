"""head_dim other than a power of two (72, 80, 96, 192 occur in real models): the static kernels pad
their tiles to the next power of two and mask the extra columns, without copying the inputs.

Forward and backward under the interpreter against the float64 reference from NaN-poisoned outputs;
inputs are views into wider buffers whose extra columns are NaN, so a kernel that read past head_dim
would poison its output.
"""

import pytest
import torch

import maskdsl
from maskdsl.codegen.checks import head_dim_error
from maskdsl.spec.limits import padded_head_dim
from maskdsl.codegen.build import compile_attention
from maskdsl.codegen.config import BackwardConfig, KernelConfig
from maskdsl.harness.measure import relative_error as rel_err

from conftest import case_seed

CASES = [
    # (head_dim, spec text, q_tile, kv_tile): tiny grids, ragged tiles, a partial and a full path each
    (72, "layout s = grid(37)\nmask m = sliding_window(20) | sink(2)", (16,), (16,)),
    (96, "layout g = grid(5, 7)\nmask m = neighborhood(window=(3, 5))", (2, 8), (2, 8)),
    (192, "layout s = grid(19)\nmask m = sliding_window(9, causal=true)", (16,), (16,)),
]


def _nan_padded(gen, heads, tokens, dim):
    """[1, heads, tokens, dim] float32, a view into rows of dim + 8 whose last 8 columns are NaN."""
    wide = torch.full((1, heads, tokens, dim + 8), float("nan"))
    wide[..., :dim] = torch.randn(1, heads, tokens, dim, generator=gen)
    return wide[..., :dim]


@pytest.mark.parametrize("dim,text,q_tile,kv_tile", CASES, ids=[f"d{c[0]}" for c in CASES])
def test_padded_head_dim_forward_and_backward_match_reference(dim, text, q_tile, kv_tile):
    spec = maskdsl.parse(text)
    cfg = KernelConfig(q_tile, kv_tile)
    fn = compile_attention(spec, "m", cfg, BackwardConfig(cfg, cfg))
    tokens = spec.masks[0].layout.tokens
    gen = torch.Generator().manual_seed(case_seed(dim, text))
    q, do = _nan_padded(gen, 2, tokens, dim), _nan_padded(gen, 2, tokens, dim)
    k, v = _nan_padded(gen, 1, tokens, dim), _nan_padded(gen, 1, tokens, dim)

    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"))
    fn.launch(q, k, v, dim ** -0.5, out, lse)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = maskdsl.reference_attention(*leaves, spec, "m", return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "an output element was not written"
    assert rel_err(out.double(), ref.detach()) < 2e-5
    torch.testing.assert_close(lse.double(), ref_lse.detach(), rtol=1e-5, atol=1e-5)

    wide_grads = [torch.full(t.shape[:3] + (dim + 8,), float("nan")) for t in (q, k, v)]
    grads = [g[..., :dim] for g in wide_grads]  # strided outputs: a store past head_dim would show in the pad
    fn.launch_backward(q, k, v, out, lse, do, dim ** -0.5, *grads)
    want = torch.autograd.grad(ref, leaves, do.double())
    for n, g, w, b in zip("qkv", grads, wide_grads, want):
        assert not torch.isnan(g).any(), f"d{n}: an element was not written"
        assert torch.isnan(w[..., dim:]).all(), f"d{n}: a store ran past head_dim"
        assert rel_err(g.double(), b) < 1e-5, (n, rel_err(g.double(), b))


def test_padded_head_dim_through_autograd_and_out_buffer_untouched():
    spec = maskdsl.parse("layout s = grid(21)\nmask m = sliding_window(7)")
    fn = maskdsl.compile(spec, "m", KernelConfig((16,), (16,)))
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 1, 21, 80, generator=gen, requires_grad=True) for _ in range(3))
    o = fn(q, k, v)
    o.square().sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = maskdsl.reference_attention(*leaves, spec, "m")
    ref.square().sum().backward()
    assert rel_err(o.double(), ref.detach()) < 2e-5
    for t, r in zip((q, k, v), leaves):
        assert rel_err(t.grad.double(), r.grad) < 1e-4


def test_head_dim_rule():
    assert [padded_head_dim(d) for d in (16, 24, 72, 80, 96, 128, 192, 256)] == [16, 32, 128, 128, 128, 128, 256, 256]
    assert all(head_dim_error(d) is None for d in (16, 40, 72, 80, 96, 192, 256))
    assert "multiple of 8 from 16 to 256 (e.g. 96, 104)" in head_dim_error(100)
    assert head_dim_error(8) is not None and head_dim_error(264) is not None
    assert "use one of (16, 32, 64, 128, 256)" in head_dim_error(96, padded=False)


def test_unsupported_head_dim_names_the_value_and_the_fix():
    fn = maskdsl.compile(maskdsl.parse("layout s = grid(20)\nmask m = sliding_window(5)"), "m",
                         KernelConfig((16,), (16,)))
    q = torch.randn(1, 1, 20, 100)
    with pytest.raises(ValueError, match=r"head_dim 100 is not supported; use a multiple of 8 .*\(e\.g\. 96, 104\)"):
        fn(q, q, q)


def test_attention_statements_take_padded_head_dims():
    """The spec's attention statement follows the kernels' rule (multiples of 8), with a hint otherwise."""
    base = "layout a = grid(64)\nmask m = sliding_window(5) on a\nattention x(mask=m, heads=2, head_dim={}, dtype=bf16)"
    assert maskdsl.parse(base.format(96)).attentions[0].head_dim == 96
    with pytest.raises(maskdsl.SpecError, match="head_dim=100 is not supported") as info:
        maskdsl.parse(base.format(100))
    assert (info.value.line, info.value.column) == (3, 39) and "multiple of 8" in str(info.value)
