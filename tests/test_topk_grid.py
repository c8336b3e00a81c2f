"""Top-k on 2-D and 3-D grids: blocks are boxes of the grid (cubes), pooled over their valid tokens.

The kernels (forward and backward, copy-engine loads included under the interpreter) run against
the float64 reference built from maskdsl.harness.topk's definition; the definition itself is checked
against a brute force that cuts the grid into boxes with plain Python loops.
"""

import itertools
import math

import pytest
import torch

import maskdsl
from maskdsl.codegen.config import KernelConfig
from maskdsl.harness.measure import relative_error
from maskdsl.harness.topk import normal_form, reference_picks, token_blocks

from test_topk_backward import assert_close, run


def brute_box_picks(q, k, shape, block, kk):
    """The rule with boxes, by loops: each block's tokens listed coordinate by coordinate."""
    counts = [math.ceil(n / b) for n, b in zip(shape, block)]
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    members = []
    for bj in itertools.product(*[range(c) for c in counts]):  # row-major over the block grid
        ranges = [range(j * b, min((j + 1) * b, n)) for j, b, n in zip(bj, block, shape)]
        members.append([sum(c * s for c, s in zip(coord, strides)) for coord in itertools.product(*ranges)])
    group = q.shape[1] // k.shape[1]
    nb = len(members)
    out = torch.zeros(q.shape[0], q.shape[1], nb, nb, dtype=torch.bool)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(nb):
                qbar = q[b, h, members[i]].double().mean(0)
                scored = sorted((-(qbar @ k[b, h // group, members[j]].double().mean(0)).item(), j) for j in range(nb))
                for _, j in scored[:kk]:
                    out[b, h, i, j] = True
    return out


@pytest.mark.parametrize("shape,block", [((5, 7), (2, 4)), ((3, 5, 6), (2, 2, 4)), ((9,), (4,))])
def test_blocks_are_boxes_of_the_grid(shape, block, gen):
    tokens = math.prod(shape)
    text = f"layout g = grid({', '.join(map(str, shape))})\nmask m = topk(k=2, block={block if len(block) > 1 else block[0]})"
    mdef = maskdsl.parse(text).masks[0]
    assert mdef.expr.block == block
    q, k = torch.randn(2, 2, tokens, 4, generator=gen), torch.randn(2, 1, tokens, 4, generator=gen)
    assert torch.equal(reference_picks(q, k, normal_form(mdef.expr), shape), brute_box_picks(q, k, shape, block, 2))


def test_one_d_blocks_stay_consecutive_tokens_and_scalars_broadcast():
    assert torch.equal(token_blocks((10,), (4,)), torch.arange(10) // 4)
    # a scalar block on a 2-D layout is a square box, like every per-dimension argument
    mdef = maskdsl.parse("layout g = grid(6, 6)\nmask m = topk(k=1, block=4)").masks[0]
    assert mdef.expr.block == (4, 4) and mdef.expr.fmt() == "topk(k=1, block=4)"
    want = torch.tensor([[(r // 4) * 2 + c // 4 for c in range(6)] for r in range(6)])
    assert torch.equal(token_blocks((6, 6), (4, 4)).view(6, 6), want)


FWD = [  # (name, spec text, config) on ragged grids: extents not divisible by the block
    ("2d-alone", "layout g = grid(12, 21)\nmask m = topk(k=2, block=(4, 8))", None),
    ("2d-union-nbhd", "layout g = grid(18, 23)\nmask m = (topk(k=2, block=(8, 8)) | neighborhood(window=5)) & causal",
     None),
    ("3d-alone", "layout g = grid(5, 9, 12)\nmask m = topk(k=3, block=(2, 4, 8))", None),
    ("3d-restricted", "layout g = grid(5, 9, 12)\nmask m = topk(k=3, block=(2, 4, 8)) & neighborhood(window=(3, 5, 7))",
     None),
    ("3d-union-strided-sink", "layout g = grid(5, 6, 7)\n"
                              "mask m = topk(k=2, block=(4, 4, 4)) | neighborhood(window=3, stride=(1, 2, 2)) | sink(5)",
     None),
    ("3d-four-tiles-per-block", "layout g = grid(3, 5, 10)\n"
                                "mask m = (topk(k=2, block=(2, 4, 8)) | neighborhood(window=3)) & neighborhood(window=(3, 5, 9))",
     KernelConfig((1, 4, 4), (1, 4, 4), 4, 2)),
]


# copy-engine loads for every case; the pointer loads (MASKDSL_TMA=0) for the two with partial key tiles
FWD_CASES = [(*c, "1") for c in FWD] + [(*c, "0") for c in FWD if c[0] in ("3d-restricted", "3d-four-tiles-per-block")]


@pytest.mark.parametrize("name,text,config,tma", FWD_CASES,
                         ids=[f"{c[0]}-{'tma' if c[3] == '1' else 'pointers'}" for c in FWD_CASES])
def test_grid_topk_forward_matches_reference(name, text, config, tma, gen, monkeypatch):
    monkeypatch.setenv("MASKDSL_TMA", tma)
    spec = maskdsl.parse(text)
    mdef = spec.masks[0]
    fn = maskdsl.compile(spec, "m", config)
    tokens, batch = mdef.layout.tokens, 2 if name == "2d-alone" else 1
    q = torch.randn(batch, 4, tokens, 16, generator=gen)
    k, v = (torch.randn(batch, 2, tokens, 16, generator=gen) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    o, lse = fn(q, k, v, out=out, return_lse=True)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert torch.equal(fn.last_picks.bool(), reference_picks(q, k, normal_form(mdef.expr), mdef.layout.shape))
    assert relative_error(o, maskdsl.reference_attention(q, k, v, spec, "m")) < 2e-3


BWD = [  # GQA throughout (2 query heads per kv head); the first has batch 2
    ("2d-alone-ragged", "layout g = grid(10, 13)\nmask m = topk(k=2, block=(4, 8))", dict(batch=2, heads=4, kv_heads=2)),
    ("2d-union", "layout g = grid(12, 18)\nmask m = topk(k=2, block=(4, 8)) | neighborhood(window=(3, 5))",
     dict(config=KernelConfig((2, 8), (2, 8), 4, 2))),
    ("3d-restricted-cut-blocks", "layout g = grid(5, 6, 10)\n"
                                 "mask m = topk(k=2, block=(2, 4, 8)) & neighborhood(window=(3, 3, 7))",
     dict(config=KernelConfig((1, 4, 4), (1, 4, 4), 4, 2))),  # four tiles per block, some past the grid
    ("3d-union-causal", "layout g = grid(3, 5, 6)\nmask m = (topk(k=2, block=(2, 2, 4)) | neighborhood(window=3)) & causal",
     {}),
]


@pytest.mark.parametrize("name,text,kwargs", BWD, ids=[c[0] for c in BWD])
def test_grid_topk_gradients_match_autograd(name, text, kwargs):
    assert_close(run(text, **kwargs))


PADDED_HEAD_DIM_CASES = [  # head_dim run padded to the next power of two inside the kernels (no copy of the inputs)
    (72, "layout s = grid(90)\nmask m = topk(k=2, block=16) | sliding_window(5)"),
    (96, "layout g = grid(10, 13)\nmask m = topk(k=2, block=(4, 8)) & neighborhood(window=(5, 9))"),
    (192, "layout g = grid(3, 4, 9)\nmask m = topk(k=2, block=(2, 2, 4)) | neighborhood(window=3)"),
]


@pytest.mark.parametrize("dim,text", PADDED_HEAD_DIM_CASES, ids=[str(c[0]) for c in PADDED_HEAD_DIM_CASES])
def test_padded_head_dims_are_exact_forward_and_backward(dim, text):
    r = run(text, dim=dim)
    assert r["q"].shape[-1] == dim and r["out"].shape[-1] == dim
    assert_close(r)


def test_tiles_that_do_not_divide_the_block_are_explained():
    spec = maskdsl.parse("layout g = grid(8, 16)\nmask m = topk(k=2, block=(2, 8))")
    with pytest.raises(ValueError, match=r"block=\(2, 8\) with config q4x4_k4x4.*divide the block"):
        maskdsl.compile(spec, "m", KernelConfig((4, 4), (4, 4), 4, 2))
