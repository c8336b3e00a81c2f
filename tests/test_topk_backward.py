"""Top-k backward: gradients for a fixed selection against torch.autograd through float64 attention."""

import math

import numpy as np
import pytest
import torch

import maskdsl
from maskdsl.analysis.counts import products
from maskdsl.codegen.config import KernelConfig
from maskdsl.codegen.topk.backward import static_query_tiles, transpose_picks
from maskdsl.analysis.intervals import evaluate
from maskdsl.harness.topk import normal_form, reference_picks, rows_mask

SEED = 20261126


def tile(n):
    return KernelConfig((n,), (n,), 4, 2)


def attend64(q, k, v, mask, scale):
    """Masked softmax attention in float64 that autograd can run through; rows that see no key give 0.

    Mirrors maskdsl.harness.reference's convention (which detaches: it is a forward oracle).
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1, keepdim=True)
    return torch.exp(scores - lse.clamp(min=torch.finfo(torch.float64).min)) @ v


def run(text, batch=1, heads=2, kv_heads=1, dim=16, config=None, seed=SEED):
    """Forward and backward through the kernels (poisoned outputs) and through autograd on the same picks."""
    spec = maskdsl.parse(text)
    mdef = spec.masks[0]
    fn = maskdsl.compile(spec, mdef.name, config)
    tokens = mdef.layout.tokens
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, dim, generator=gen)
    k = torch.randn(batch, kv_heads, tokens, dim, generator=gen)
    v = torch.randn(batch, kv_heads, tokens, dim, generator=gen)
    dout = torch.randn(batch, heads, tokens, dim, generator=gen)
    scale = 1.0 / math.sqrt(dim)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"))
    fn.launch(q, k, v, scale, out, lse)
    grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    fn.launch_backward(q, k, v, out, lse, dout, scale, *grads)

    picks = fn.select(q, k)[0].bool()
    assert torch.equal(picks, reference_picks(q, k, normal_form(mdef.expr), mdef.layout.shape))  # a well-separated draw
    mask = rows_mask(mdef, q, k, torch.arange(tokens), picks=picks)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = attend64(*leaves, mask, scale)
    ref.backward(dout.double())
    return dict(fn=fn, q=q, k=k, v=v, dout=dout, out=out, lse=lse, grads=grads, ref_out=ref.detach(),
                ref_grads=[x.grad for x in leaves], mask=mask, scale=scale)


def assert_close(r):
    assert not torch.isnan(r["out"]).any() and not torch.isnan(r["lse"]).any()
    assert ((r["out"].double() - r["ref_out"]).norm() / r["ref_out"].norm()).item() < 1e-5
    for name, got, want in zip("qkv", r["grads"], r["ref_grads"]):
        assert not torch.isnan(got).any(), f"d{name} has unwritten (NaN) elements"
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-5, f"d{name}: relative error {err:.2e}"


CASES = [  # GQA (2 query heads per kv head) throughout; the first also has batch 2
    ("alone-ragged", "layout s = grid(100)\nmask m = topk(k=2, block=16)", dict(batch=2, heads=4, kv_heads=2)),
    ("alone-two-tiles-per-block", "layout s = grid(150)\nmask m = topk(k=2, block=32)", dict(config=tile(16))),
    ("union-window", "layout s = grid(130)\nmask m = topk(k=2, block=32) | sliding_window(9)", dict(config=tile(16))),
    ("nsa-recipe", "layout s = grid(117)\nmask m = (topk(k=2, block=16) | sliding_window(5, causal=true) | sink(3)) "
                   "& causal", {}),
    ("k-above-blocks", "layout s = grid(70)\nmask m = topk(k=9, block=16) | sink(2)", {}),
    ("forward-tile-128", "layout s = grid(200)\nmask m = topk(k=1, block=128) | sliding_window(5)", {}),  # bwd: 64
]


@pytest.mark.parametrize("name,text,kwargs", CASES, ids=[c[0] for c in CASES])
def test_topk_gradients_match_autograd(name, text, kwargs):
    assert_close(run(text, **kwargs))


def test_restricted_topk_gives_zero_gradients_on_rows_that_see_nothing():
    # a query block that picks the block before it sees it only through the 8-key causal window:
    # its later rows see no key at all
    r = run("layout s = grid(160)\nmask m = topk(k=1, block=32) & sliding_window(8, causal=true)",
            config=tile(16), seed=3)
    empty = ~r["mask"].any(-1)  # [B, H, L]
    assert empty.any() and not empty.all()
    assert torch.isinf(r["lse"][empty]).all()
    assert_close(r)
    assert (r["grads"][0][empty] == 0).all()


def test_mqa_head_dim_32():
    assert_close(run("layout s = grid(90)\nmask m = topk(k=1, block=16) | sliding_window(4)", batch=1, heads=3,
                     kv_heads=1, dim=32))


def test_backward_is_deterministic_and_takes_the_selection_it_is_given():
    r = run("layout s = grid(72)\nmask m = topk(k=2, block=16) | sink(2)", heads=3, kv_heads=1)
    fn, q, k, v = r["fn"], r["q"], r["k"], r["v"]
    again = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    fn.launch_backward(q, k, v, r["out"], r["lse"], r["dout"], r["scale"], *again)
    assert all(torch.equal(a, b) for a, b in zip(again, r["grads"]))  # bitwise, GQA sums included
    given = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    fn.launch_backward(q, k, v, r["out"], r["lse"], r["dout"], r["scale"], *given, selection=fn.select(q, k))
    assert all(torch.equal(a, b) for a, b in zip(given, r["grads"]))


def test_transposed_pick_list_lists_each_picker_once_in_order():
    gen = torch.Generator().manual_seed(SEED)
    nb, kk = 7, 3
    picked = torch.rand(2, 3, nb, nb, generator=gen) < 0.4
    # idx as the selection writes it: picked key blocks ascending, `nb` in unused slots
    idx = torch.full((2, 3, nb, kk), nb, dtype=torch.int32)
    for b, h, i in np.ndindex(2, 3, nb):
        js = picked[b, h, i].nonzero().flatten()[:kk]
        idx[b, h, i, :len(js)] = js.to(torch.int32)
    offsets, qblocks = transpose_picks(idx, nb)
    for b, h, j in np.ndindex(2, 3, nb):
        want = [i for i in range(nb) if j in idx[b, h, i].tolist()]
        assert qblocks[b, h, offsets[b, h, j]:offsets[b, h, j + 1]].tolist() == want


@pytest.mark.parametrize("text", ["sliding_window(9)", "neighborhood(window=9, stride=3)",
                                  "causal & sliding_window(12, causal=true)", "sink(3)"])
def test_static_query_tile_table_covers_every_tile_pair_of_a_term(text):
    tokens, size = 77, 16
    expr = maskdsl.parse(f"layout s = grid({tokens})\nmask m = {text}").masks[0].expr
    rels = [t.sym[0] for t in products(expr, (tokens,))]
    table = static_query_tiles(rels, tokens, size)
    tiles = math.ceil(tokens / size)
    for s, rel in enumerate(rels):
        lo, hi = evaluate(rel, tokens)
        j = torch.arange(tokens)
        dense = (j[None, :] >= torch.from_numpy(lo)[:, None]) & (j[None, :] <= torch.from_numpy(hi)[:, None])
        for kt in range(tiles):
            need = [qt for qt in range(tiles) if dense[qt * size:(qt + 1) * size, kt * size:(kt + 1) * size].any()]
            q_lo, q_hi = table[s, :, kt]
            assert all(q_lo <= qt <= q_hi for qt in need), (text, s, kt, need, q_lo, q_hi)
            if need:  # tight: lo and hi are monotone, so the interval is exactly the tiles that need kt
                assert (q_lo, q_hi) == (need[0], need[-1])


def test_bfloat16_gradients_within_bf16_error():
    spec = maskdsl.parse("layout s = grid(80)\nmask m = topk(k=2, block=16) | sliding_window(3)")
    fn = maskdsl.compile(spec, "m")
    gen = torch.Generator().manual_seed(SEED)
    q, k, v, dout = (torch.randn(1, 2, 80, 16, generator=gen) for _ in range(4))
    k, v = k[:, :1], v[:, :1]
    bq, bk, bv, bdo = (x.bfloat16() for x in (q, k, v, dout))
    out, lse = torch.empty_like(bq), torch.empty(1, 2, 80)
    fn.launch(bq, bk, bv, 0.25, out, lse)
    grads = [torch.full_like(x, float("nan")) for x in (bq, bk, bv)]
    fn.launch_backward(bq, bk, bv, out, lse, bdo, 0.25, *grads)
    mask = rows_mask(spec.masks[0], bq, bk, torch.arange(80), picks=fn.select(bq, bk)[0].bool())
    leaves = [x.double().requires_grad_() for x in (bq, bk, bv)]
    attend64(*leaves, mask, 0.25).backward(bdo.double())
    for got, want in zip(grads, (x.grad for x in leaves)):
        assert got.dtype == torch.bfloat16 and not torch.isnan(got).any()
        assert ((got.double() - want).norm() / want.norm()).item() < 2e-2


def test_gradient_buffers_are_checked():
    spec = maskdsl.parse("layout s = grid(32)\nmask m = topk(k=1, block=16)")
    fn = maskdsl.compile(spec, "m")
    q = k = v = torch.randn(1, 1, 32, 16)
    out, lse = torch.empty_like(q), torch.empty(1, 1, 32)
    with pytest.raises(ValueError, match=r"dk must be \(1, 1, 32, 16\) torch.float32"):
        fn.launch_backward(q, k, v, out, lse, q, 0.25, torch.empty_like(q), torch.empty(1, 1, 32, 8), torch.empty_like(v))


def test_bench_training_checks_a_topk_masks_gradients():
    """`maskdsl bench --train` covers top-k masks: their gradients checked on sampled rows like static ones."""
    from maskdsl.bench.training import bench_training
    from maskdsl.codegen.config import KernelConfig

    spec = maskdsl.parse("layout s = grid(96)\nmask m = topk(2, 16) | sliding_window(9)\n"
                         "attention a(mask=m, heads=2, head_dim=16, dtype=bf16)")
    result = bench_training(spec, "m", configs=[KernelConfig((16,), (16,))], rows=9, device="cpu")
    (entry,) = result["ours"]
    assert "failed" not in entry, entry
    assert entry["backward_config"] == "topk"
    assert not entry["grad_nan"] and max(entry["dq_error"], entry["dk_error"], entry["dv_error"]) < 1e-5
