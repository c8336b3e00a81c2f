"""Numerical edge cases and the NaN/inf contract (docs/LIMITS.md), kernel against the float64 reference.

Fixed seeds; outputs poisoned with NaN before each run where a finite result is expected.
"""

import pytest
import torch

import maskdsl
from maskdsl.codegen.config import KernelConfig
from maskdsl.harness.reference import reference_mask

KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(tokens, seed, dtype=torch.float32, dim=16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, tokens, dim, generator=gen).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_rows_the_mask_leaves_empty_give_zero_and_lse_minus_inf(dtype):
    spec = maskdsl.parse("layout s = grid(41)\nmask m = sink(3) & neighborhood(window=2)")
    fn = maskdsl.compile(spec, "m", KernelConfig((16,), (16,)))
    q, k, v = _inputs(41, seed=11, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"))
    fn.launch(q, k, v, 0.25, out, lse)
    empty = ~reference_mask(spec, "m").any(-1)
    assert empty.sum() >= 30
    assert (out[:, :, empty] == 0).all() and torch.isneginf(lse[:, :, empty]).all()
    ref, ref_lse = maskdsl.reference_attention(q, k, v, spec, "m", scale=0.25, return_lse=True)
    assert torch.isfinite(out[:, :, ~empty]).all()
    torch.testing.assert_close(out[:, :, ~empty].double(), ref[:, :, ~empty], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse[:, :, ~empty].double(), ref_lse[:, :, ~empty], atol=2e-2, rtol=2e-2)


def test_large_scores_stay_within_bf16_rounding():
    spec = maskdsl.parse("layout g = grid(7, 9)\nmask m = neighborhood(window=(3, 5)) | sink(2)")
    fn = maskdsl.compile(spec, "m", KernelConfig((2, 8), (4, 4)))
    q, k, v = _inputs(63, seed=12, dtype=torch.bfloat16)
    q = (q.float() * 1000).to(torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    fn(q, k, v, out=out)
    ref = maskdsl.reference_attention(q, k, v, spec, "m")
    assert torch.isfinite(out).all()
    # softmax is nearly one-hot at these scores: the output is a value row, rounded once to bf16
    assert (out.double() - ref).abs().max() <= 2 ** -7 * ref.abs().max()


def test_a_nan_query_row_gives_nan_in_that_row_only():
    spec = maskdsl.parse("layout s = grid(40)\nmask m = sliding_window(7) | sink(2)")
    fn = maskdsl.compile(spec, "m", KernelConfig((16,), (16,)))
    q, k, v = _inputs(40, seed=13)
    q[0, 1, 20, 3] = float("nan")
    out, lse = fn(q, k, v, return_lse=True)
    bad = out.isnan().any(-1)
    assert bad.nonzero().tolist() == [[0, 1, 20]] and lse[0, 1, 20].isnan()
    ref = maskdsl.reference_attention(q, k, v, spec, "m")
    assert ref[0, 1, 20].isnan().all()
    torch.testing.assert_close(out[~bad].double(), ref[~bad], atol=2e-5, rtol=2e-5)


def _all_minus_inf_row(q, k, row):
    """Scores of `row` are -inf for every key: q row = (-inf, 0, ...), every key's first entry > 0."""
    k[..., 0] = k[..., 0].abs() + 0.1
    q[:, :, row] = 0.0
    q[:, :, row, 0] = float("-inf")


@pytest.mark.parametrize("text, tiles", [
    ("layout s = grid(40)\nmask m = sliding_window(7)", "partial"),
    ("layout s = grid(40)\nmask m = full", "full"),
])
def test_a_row_whose_scores_are_all_minus_inf_gives_zero_as_sdpa(text, tiles):
    spec = maskdsl.parse(text)
    fn = maskdsl.compile(spec, "m", KernelConfig((16,), (16,)))
    q, k, v = _inputs(40, seed=14)
    _all_minus_inf_row(q, k, 5)
    out, lse = fn(q, k, v, return_lse=True)
    ref, ref_lse = maskdsl.reference_attention(q, k, v, spec, "m", return_lse=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # the contract's source, unmasked here
    assert (ref[:, :, 5] == 0).all() and torch.isneginf(ref_lse[:, :, 5]).all() and (sdpa[:, :, 5] == 0).all()
    assert (out[:, :, 5] == 0).all() and torch.isneginf(lse[:, :, 5]).all()


def test_a_nan_query_row_does_not_change_its_blocks_top_k_picks():
    """Top-k pools each block's finite rows: the picks are those of the block without the NaN row."""
    from maskdsl.harness.topk import normal_form, reference_picks

    spec = maskdsl.parse("layout s = grid(128)\nmask m = topk(k=2, block=16)")
    fn = maskdsl.compile(spec, "m")
    q, k, v = _inputs(128, seed=15)
    q[0, 0, 3, 5] = float("nan")
    k[0, 0, 70, 1] = float("inf")  # a non-finite key row must not make its block everyone's pick
    out = fn(q, k, v)
    picks = fn.last_picks.bool()
    # independent statement: block means over the finite rows only, scored and ranked by hand
    finite_q = torch.cat([q[0, 0, :3], q[0, 0, 4:16]])
    kbar = torch.stack([k[0, 0, j * 16:(j + 1) * 16] for j in range(8)])
    kbar = torch.stack([blk[torch.isfinite(blk).all(-1)].double().mean(0) for blk in kbar])
    scores = finite_q.double().mean(0) @ kbar.T
    assert picks[0, 0, 0].nonzero().flatten().tolist() == sorted(scores.topk(2).indices.tolist())
    assert torch.equal(picks, reference_picks(q, k, normal_form(spec.masks[0].expr), (128,)))
    ref = maskdsl.reference_attention(q, k, v, spec, "m")
    assert out[0, 0, 3].isnan().all()
    rows_ok = torch.isfinite(ref[0, 0]).all(-1)
    torch.testing.assert_close(out[0, 0, rows_ok].double(), ref[0, 0, rows_ok], atol=2e-5, rtol=2e-5)
