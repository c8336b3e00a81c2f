"""FlexAttention's mask_mods (bench/flex.py) against the reference mask, on the CPU.

`create_mask` evaluates a mask_mod over every (query, key) pair of tile-major positions; mapped back
through the permutation it must be exactly `maskdsl.reference_mask`, for every mask_mod form, on
small grids whose tiles do not divide the extents (padding positions must attend nothing).
"""

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

import maskdsl
from maskdsl.bench.flex import FORMS, FlexRunner, block_mask_from_analysis, make_mask_mod, tile_permutation
from maskdsl.harness.measure import relative_error

CASES = [
    # (id, spec text, FlexAttention tile); all but 1d-streaming have ragged tiles (padding)
    ("1d-window-ragged", "layout s = grid(45)\nmask m = sliding_window(10)", (16,)),
    ("1d-streaming", "layout s = grid(40)\nmask m = (sliding_window(5, causal=true) | sink(3)) & causal", (8,)),
    ("2d-gna-sink", "layout g = grid(7, 9)\nmask m = neighborhood(window=(3, 4), stride=(2, 2)) | sink(5)", (2, 4)),
    ("2d-dilated", "layout g = grid(11, 10)\nmask m = neighborhood(window=(3, 3), dilation=(2, 3))", (4, 4)),
    ("2d-causal-flat", "layout g = grid(5, 7)\nmask m = causal & neighborhood(window=(3, 5))", (2, 4)),
    ("3d-blocked", "layout v = grid(4, 6, 6)\nmask m = block((2, 3, 3))", (2, 2, 4)),
    ("3d-causal-frames", "layout v = grid(4, 4, 5)\nmask m = neighborhood(window=(2, 4, 3), causal=(true, false, false))",
     (2, 2, 2)),
    ("dense", "layout s = grid(21)\nmask m = full", (8,)),
]


def expected_tile_major(spec, shape, tile):
    """The reference mask in tile-major positions; padding rows and columns attend nothing."""
    perm = tile_permutation(shape, tile)
    valid = perm >= 0
    index = perm.clamp(min=0)
    return maskdsl.reference_mask(spec, "m")[index][:, index] & valid.view(-1, 1) & valid.view(1, -1)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name, text, tile", CASES, ids=[c[0] for c in CASES])
def test_mask_mod_is_the_reference_mask(name, text, tile, form):
    spec = maskdsl.parse(text)
    mask = spec.masks[0]
    shape = mask.layout.shape
    length = len(tile_permutation(shape, tile))
    got = create_mask(make_mask_mod(mask.expr, shape, tile, form), 1, 1, length, length, device="cpu")[0, 0]
    assert torch.equal(got, expected_tile_major(spec, shape, tile))


@pytest.mark.parametrize("name, text, tile", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_block_mask_from_analysis_classifies_blocks_like_the_mask(name, text, tile):
    """Partial and full blocks of the closed-form BlockMask are those of the dense tile-major mask."""
    spec = maskdsl.parse(text)
    mask = spec.masks[0]
    shape, block = mask.layout.shape, math.prod(tile)
    dense = expected_tile_major(spec, shape, tile)
    nb = dense.shape[0] // block
    perm = tile_permutation(shape, tile)
    blocks = dense.view(nb, block, nb, block).transpose(1, 2)  # [q block, k block, block, block]
    valid = (perm >= 0).view(nb, block)
    pairs = valid.view(nb, 1, block, 1) & valid.view(1, nb, 1, block)
    any_pair = blocks.any(-1).any(-1)
    all_pairs = (blocks | ~pairs).all(-1).all(-1)
    bm = block_mask_from_analysis(mask.expr, shape, tile, "cpu", None)
    full = torch.zeros(nb, nb, dtype=torch.bool)
    part = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        full[i, bm.full_kv_indices[0, 0, i, :bm.full_kv_num_blocks[0, 0, i]].long()] = True
        part[i, bm.kv_indices[0, 0, i, :bm.kv_num_blocks[0, 0, i]].long()] = True
    assert torch.equal(full | part, any_pair)
    assert torch.equal(full, any_pair & all_pairs)


def test_arithmetic_mask_mod_reads_no_table():
    """The strongest FlexAttention decodes positions with integer arithmetic: nothing in its closure is a tensor."""
    spec = maskdsl.parse("layout v = grid(3, 5, 6)\nmask m = neighborhood(window=(2, 3, 4), stride=(1, 2, 1))")
    mod = make_mask_mod(spec.masks[0].expr, (3, 5, 6), (1, 4, 4), "arithmetic")
    seen, stack = set(), [mod]
    while stack:
        fn = stack.pop()
        for cell in fn.__closure__ or ():
            value = cell.cell_contents
            assert not isinstance(value, torch.Tensor), fn
            if callable(value) and getattr(value, "__closure__", None) and id(value) not in seen:
                seen.add(id(value))
                stack.append(value)


@pytest.mark.parametrize("form", FORMS)
def test_flex_attention_on_tile_major_tokens_matches_the_reference(form):
    """End to end on the CPU (flex_attention eager): permute, attend with the BlockMask, un-permute."""
    spec = maskdsl.parse("layout g = grid(5, 7)\nmask m = neighborhood(window=(3, 4), stride=(1, 2)) | sink(3)")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 35, 16, generator=gen) for _ in range(3))
    out = FlexRunner(spec.masks[0], (2, 4), "cpu", compile=False, form=form)(q, k, v)
    ref = maskdsl.reference_attention(q, k, v, spec, "m")
    assert relative_error(out, ref) < 1e-5


def test_unknown_form_is_named():
    spec = maskdsl.parse("layout s = grid(8)\nmask m = sliding_window(3)")
    with pytest.raises(ValueError, match="unknown FlexAttention mask_mod form 'table'.*arithmetic, gather"):
        make_mask_mod(spec.masks[0].expr, (8,), (4,), "table")
