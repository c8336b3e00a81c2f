"""Dynamic top-k: the selection rule, its composition with static masks, the kernel, and recall."""

import math

import pytest
import torch

import maskdsl
from maskdsl.harness.measure import relative_error
from maskdsl.harness.metrics import recall
from maskdsl.harness.topk import normal_form, reference_picks


def brute_picks(q, k, block, kk, allowed):
    """The rule, one query block at a time, with plain Python loops: means, dots, sort with index tie-break."""
    b_, h_, tokens, _ = q.shape
    group = h_ // k.shape[1]
    nb = math.ceil(tokens / block)
    out = torch.zeros(b_, h_, nb, nb, dtype=torch.bool)
    for b in range(b_):
        for h in range(h_):
            for i in range(nb):
                qbar = q[b, h, i * block:(i + 1) * block].double().mean(0)
                scored = []
                for j in range(nb):
                    if allowed[i][j]:
                        kbar = k[b, h // group, j * block:(j + 1) * block].double().mean(0)
                        scored.append((-(qbar @ kbar).item(), j))
                for _, j in sorted(scored)[:kk]:
                    out[b, h, i, j] = True
    return out


@pytest.mark.parametrize("tokens,block,kk", [(70, 16, 2), (64, 16, 1), (40, 8, 9)])
def test_selection_rule_matches_brute_force(tokens, block, kk, gen):
    spec = maskdsl.parse(f"layout s = grid({tokens})\nmask m = topk(k={kk}, block={block}) & causal")
    q, k = torch.randn(2, 2, tokens, 8, generator=gen), torch.randn(2, 1, tokens, 8, generator=gen)
    form = normal_form(spec.masks[0].expr)
    nb = math.ceil(tokens / block)
    allowed = [[j <= i for j in range(nb)] for i in range(nb)]  # causal allows key blocks at or before the diagonal
    assert torch.equal(reference_picks(q, k, form, (tokens,)), brute_picks(q, k, block, kk, allowed))


def test_ties_go_to_the_lower_block_index(gen):
    spec = maskdsl.parse("layout s = grid(64)\nmask m = topk(k=2, block=16)")
    fn = maskdsl.compile(spec, "m")
    q = torch.randn(1, 1, 64, 16, generator=gen)
    k = torch.randn(1, 1, 16, 16, generator=gen).repeat(1, 1, 4, 1)  # four identical key blocks: every score ties
    v = torch.randn(1, 1, 64, 16, generator=gen)
    fn(q, k, v)
    picks = fn.last_picks.bool()[0, 0]
    assert torch.equal(picks, torch.tensor([[True, True, False, False]] * 4))
    assert torch.equal(reference_picks(q, k, normal_form(spec.masks[0].expr), (64,))[0, 0], picks)


def test_dynamic_reference_mask_composes_as_specified(gen):
    spec = maskdsl.parse("layout s = grid(48)\nmask m = (topk(k=1, block=16) | sink(2)) & neighborhood(window=20)")
    q, k = torch.randn(1, 1, 48, 8, generator=gen), torch.randn(1, 1, 48, 8, generator=gen)
    got = maskdsl.reference_mask(spec, "m", q, k)[0, 0]
    window = maskdsl.reference_mask(maskdsl.parse("layout s = grid(48)\nmask w = neighborhood(window=20)"), "w")
    sink = maskdsl.reference_mask(maskdsl.parse("layout s = grid(48)\nmask w = sink(2)"), "w")
    # candidates: key blocks the window reaches from the query block; inside picked blocks the window still applies
    allowed = [[bool(window[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].any()) for j in range(3)] for i in range(3)]
    picks = brute_picks(q, k, 16, 1, allowed)[0, 0]
    expand = picks[torch.arange(48) // 16][:, torch.arange(48) // 16]
    assert torch.equal(got, (expand & window) | (sink & window))
    with pytest.raises(ValueError, match="pass q and k"):
        maskdsl.reference_mask(spec, "m")


CASES = [
    ("alone", "layout s = grid(70)\nmask m = topk(k=2, block=16)"),
    ("nsa-recipe", "layout s = grid(70)\nmask m = (topk(k=2, block=16) | sliding_window(5, causal=true) | sink(3)) & causal"),
    ("intersection", "layout s = grid(64)\nmask m = topk(k=1, block=16) & sliding_window(20)"),
    ("k-above-blocks", "layout s = grid(64)\nmask m = topk(k=9, block=16) | sink(2)"),
    ("ragged-union", "layout s = grid(57)\nmask m = topk(k=2, block=32) | neighborhood(window=9, stride=3)"),
]


@pytest.mark.parametrize("name,text", CASES, ids=[c[0] for c in CASES])
def test_topk_kernel_matches_reference(name, text, gen):
    spec = maskdsl.parse(text)
    fn = maskdsl.compile(spec, "m")
    tokens = spec.masks[0].layout.tokens
    q = torch.randn(2, 4, tokens, 16, generator=gen)
    k = torch.randn(2, 2, tokens, 16, generator=gen)
    v = torch.randn(2, 2, tokens, 16, generator=gen)
    out = torch.full_like(q, float("nan"))
    o, lse = fn(q, k, v, out=out, return_lse=True)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert torch.equal(fn.last_picks.bool(), reference_picks(q, k, normal_form(spec.masks[0].expr), (tokens,)))
    ref = maskdsl.reference_attention(q, k, v, spec, "m")
    assert relative_error(o, ref) < 2e-3


def test_recall_is_the_kept_probability_mass(gen):
    spec = maskdsl.parse("layout s = grid(48)\nmask a = full\nmask w = sliding_window(1)\n"
                         "mask t1 = topk(k=1, block=16)\nmask t2 = topk(k=2, block=16)\nmask t3 = topk(k=3, block=16)")
    q, k = torch.randn(1, 2, 48, 8, generator=gen), torch.randn(1, 2, 48, 8, generator=gen)
    assert recall(q, k, spec, "a") == pytest.approx(1.0)
    assert recall(q, k, spec, "t3") == pytest.approx(1.0)
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(8), -1)
    assert recall(q, k, spec, "w") == pytest.approx(probs.diagonal(dim1=-2, dim2=-1).mean().item())
    assert recall(q, k, spec, "t1", rows_per_chunk=7) <= recall(q, k, spec, "t2") <= 1.0 + 1e-12


def test_unsupported_topk_shapes_are_explained():
    spec = maskdsl.parse("layout g = grid(8, 8)\nmask m = topk(k=2, block=(2, 4))\n"
                         "layout s = grid(64)\nmask odd = topk(k=2, block=10) on s")
    with pytest.raises(ValueError, match=r"block=\(2, 4\).*16\.\.256 tokens"):
        maskdsl.compile(spec, "m")  # 8 tokens per block: no tile of 16 fits
    with pytest.raises(ValueError, match="block=10"):
        maskdsl.compile(spec, "odd")
