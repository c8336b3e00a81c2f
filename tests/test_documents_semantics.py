"""Document masks: the language, the oracle by brute force, and the intervals the kernels evaluate.

The oracle (maskdsl.harness.documents) is checked against the static semantics run on each document
alone (a grid of the document's length, windows and sinks clamped to it: what "local coordinates" means),
and the prefix by a plain double loop. The normal form's row and column intervals
(maskdsl.spec.documents) are then held to the oracle row by row and column by column.
"""

import random

import pytest
import torch

import maskdsl
from maskdsl.harness.documents import document_mask
from maskdsl.harness.semantics import static_mask
from maskdsl.spec import ir
from maskdsl.spec.documents import column_interval, document_form, row_interval

INNER = [
    "causal",
    "sliding_window(5, causal=true)",
    "sliding_window(6)",
    "sliding_window(7)",
    "full",
    "sliding_window(4, causal=true) | (sink(3) & causal)",
    "sink(2)",
    "causal & sliding_window(5)",
    "sliding_window(3, causal=true) | sliding_window(8)",
]


def random_offsets(rng: random.Random, length: int, docs: int) -> list[int]:
    cuts = sorted(rng.randint(0, length) for _ in range(docs - 1))  # repeats: empty documents
    return [0, *cuts, length]


def clamp_local(expr, n: int):
    """`expr` as a static mask on grid(n): windows wider than the document and sinks past it clamped."""
    if isinstance(expr, ir.Neighborhood):
        return ir.Neighborhood((min(expr.window[0], n),), expr.dilation, expr.stride, expr.causal)
    if isinstance(expr, ir.Sink):
        return ir.Sink(min(expr.n, n))
    if isinstance(expr, ir.Union_):
        return ir.union(*(clamp_local(t, n) for t in expr.terms))
    if isinstance(expr, ir.Intersection):
        return ir.intersection(*(clamp_local(t, n) for t in expr.terms))
    return expr


def block_diagonal(inner, offsets, length):
    out = torch.zeros(length, length, dtype=torch.bool)
    for a, b in zip(offsets, offsets[1:]):
        if b > a:
            out[a:b, a:b] = static_mask(clamp_local(inner, b - a), (b - a,))
    return out


@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("seed", range(4))
def test_oracle_is_the_static_mask_of_each_document(inner, seed):
    rng = random.Random(seed * 101 + len(inner))
    length = rng.randint(1, 60)
    offsets = random_offsets(rng, length, rng.randint(1, 7))
    spec = maskdsl.parse(f"layout s = grid({max(length, 8)})\nmask m = {inner}\n")
    expr = spec.mask("m").expr
    doc_spec = maskdsl.parse(f"layout s = grid({max(length, 8)})\nmask m = document & ({inner})\n")
    got = document_mask(doc_spec.mask("m").expr, length, offsets)
    assert torch.equal(got, block_diagonal(expr, offsets, length)), offsets


def test_document_alone_is_full_inside_each_document():
    offsets = [0, 3, 3, 10, 11]
    got = document_mask(ir.Document(), 11, offsets)
    doc = [0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 3]  # document 1 is empty
    want = torch.tensor([[doc[i] == doc[j] for j in range(11)] for i in range(11)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", range(5))
def test_prefix_lm_by_double_loop(seed):
    rng = random.Random(seed)
    length = rng.randint(1, 50)
    offsets = random_offsets(rng, length, rng.randint(1, 6))
    prefix = [rng.randint(0, b - a) for a, b in zip(offsets, offsets[1:])]
    spec = maskdsl.parse(f"layout s = grid({length})\nmask m = document & (causal | prefix)\n")
    got = document_mask(spec.mask("m").expr, length, offsets, prefix)
    want = torch.zeros(length, length, dtype=torch.bool)
    for d, (a, b) in enumerate(zip(offsets, offsets[1:])):
        for i in range(a, b):
            for j in range(a, b):
                want[i, j] = j <= i or j - a < prefix[d]
    assert torch.equal(got, want)


ALL = INNER + ["causal | prefix", "sliding_window(5) | prefix", "prefix", "sliding_window(3, causal=true) | prefix"]


@pytest.mark.parametrize("inner", ALL)
@pytest.mark.parametrize("seed", range(3))
def test_intervals_are_the_oracle_row_by_row_and_column_by_column(inner, seed):
    rng = random.Random(seed + 7 * len(inner))
    length = rng.randint(1, 70)
    offsets = random_offsets(rng, length, rng.randint(1, 8))
    prefix = [rng.randint(0, b - a) for a, b in zip(offsets, offsets[1:])]
    spec = maskdsl.parse(f"layout s = grid({max(length, 8)})\nmask m = document & ({inner})\n")
    expr = spec.mask("m").expr
    mask = document_mask(expr, length, offsets, prefix)
    terms = document_form(expr).terms
    doc_of = [d for d, (a, b) in enumerate(zip(offsets, offsets[1:])) for _ in range(a, b)]
    for i in range(length):
        d = doc_of[i]
        a, b = offsets[d], offsets[d + 1]
        rows = torch.zeros(length, dtype=torch.bool)
        cols = torch.zeros(length, dtype=torch.bool)
        for t in terms:
            lo, hi = row_interval(t, i, a, b, prefix[d])
            assert a <= lo and hi <= b or hi <= lo
            assert mask[i, lo:hi].all(), (t, i)  # each term inside the mask: its full tiles need no predicate
            rows[lo:hi] = True
            lo, hi = column_interval(t, i, a, b, prefix[d])
            assert mask[lo:hi, i].all(), (t, i)
            cols[lo:hi] = True
        assert torch.equal(rows, mask[i]), (i, offsets)
        assert torch.equal(cols, mask[:, i]), (i, offsets)


def test_normal_form_of_the_issue_masks():
    spec = maskdsl.parse("layout s = grid(100)\n"
                         "mask a = document & causal\n"
                         "mask b = document & (sliding_window(9, causal=true) | (sink(4) & causal))\n"
                         "mask c = document & (causal | prefix)\n"
                         "mask d = document\n")
    forms = {m.name: document_form(m.expr) for m in spec.masks}
    assert [t.as_tuple() for t in forms["a"].terms] == [(1, 0, 0, 0, 0, 0)]
    assert [t.as_tuple() for t in forms["b"].terms] == [(0, 9, 0, 0, 0, 0), (1, 0, 0, 0, 4, 0), (1, 0, 0, 0, 0, 4)]
    assert forms["c"].uses_prefix and not forms["a"].uses_prefix
    assert [t.as_tuple() for t in forms["d"].terms] == [(0,) * 6]


@pytest.mark.parametrize("text", ["document & causal", "document & (causal | prefix)", "document",
                                  "document & (sliding_window(9, causal=true) | sink(4) & causal)",
                                  "causal & document & sliding_window(5)"])
def test_fmt_round_trips(text):
    spec = maskdsl.parse(f"layout s = grid(64)\nmask m = {text}\n")
    assert maskdsl.parse(spec.fmt()) == spec
    assert spec.mask("m").documents


@pytest.mark.parametrize("text, column, words", [
    ("causal | prefix", 19, "only meaningful inside documents"),
    ("(document & causal) | sink(3)", 11, "top-level intersection"),
    ("document & dilated(3, 2)", 21, "dilated neighborhood"),
    ("document & strided(4, 2)", 21, "strided neighborhood"),
    ("document & topk(2, 16)", 21, "top-k"),
    ("document & (sliding_window(3) & sliding_window(5))", 22, "two different non-causal windows"),
    ("document & (causal | sink(2)) & (sliding_window(3, causal=true) | prefix | sink(4))", 10, "more than 4"),
])
def test_unsupported_document_masks_name_line_and_column(text, column, words):
    with pytest.raises(maskdsl.SpecError) as info:
        maskdsl.parse(f"layout s = grid(100)\nmask m = {text}\n", filename="x.mask")
    err = info.value
    assert (err.filename, err.line, err.column) == ("x.mask", 2, column)
    assert words in str(err) and "hint:" in str(err)


GRID_INNER = [
    "causal",
    "neighborhood(window=(2, 3, 4), causal=(true, false, false))",
    "neighborhood(window=(3, 3, 4))",
    "neighborhood(window=(1, 3, 4)) | sink(5) & causal",
    "full",
    "neighborhood(window=(9, 3, 4), causal=(true, false, false)) | sink(3)",
]


@pytest.mark.parametrize("inner", GRID_INNER)
@pytest.mark.parametrize("seed", range(3))
def test_grid_oracle_is_the_static_mask_of_each_run_of_frames(inner, seed):
    """On a grid documents are runs of whole frames: each one is the static mask on its own frames."""
    rng = random.Random(seed + len(inner))
    frames, rest = rng.randint(1, 9), (3, 4)
    offsets = random_offsets(rng, frames, rng.randint(1, 4))
    spec = maskdsl.parse(f"layout v = grid(9, 3, 4)\nmask m = document & ({inner})\n")
    expr = spec.mask("m").expr
    got = document_mask(expr, (frames, *rest), offsets)
    want = torch.zeros(frames * 12, frames * 12, dtype=torch.bool)
    inner_expr = ir.intersection(*[t for t in expr.terms if not isinstance(t, ir.Document)])
    for d, (a, b) in enumerate(zip(offsets, offsets[1:])):
        if b > a:
            block = static_mask(clamp_grid(inner_expr, b - a), (b - a, *rest))
            want[a * 12:b * 12, a * 12:b * 12] = block
    assert torch.equal(got, want), offsets


def clamp_grid(expr, frames: int):
    """`expr` on a document of `frames` frames of 3 x 4: dimension 0's window and sinks clamped to it."""
    if isinstance(expr, ir.Neighborhood):
        return ir.Neighborhood((min(expr.window[0], frames), *expr.window[1:]), expr.dilation, expr.stride, expr.causal)
    if isinstance(expr, ir.Sink):
        return ir.Sink(min(expr.n, frames * 12))
    if isinstance(expr, ir.Union_):
        return ir.union(*(clamp_grid(t, frames) for t in expr.terms))
    if isinstance(expr, ir.Intersection):
        return ir.intersection(*(clamp_grid(t, frames) for t in expr.terms))
    return expr


def test_grid_prefix_by_double_loop():
    """Block-causal frames with a per-document prefix of tokens: a key is seen when its frame is not after
    the query's, or when it is among the document's first prefix tokens."""
    rng = random.Random(3)
    offsets, inner = [0, 2, 2, 5, 6], 6
    prefix = [rng.randint(0, (b - a) * inner) for a, b in zip(offsets, offsets[1:])]
    spec = maskdsl.parse("layout v = grid(6, 2, 3)\n"
                         "mask m = document & (neighborhood(window=(6, 2, 3), causal=(true, false, false)) | prefix)\n")
    got = document_mask(spec.mask("m").expr, (6, 2, 3), offsets, prefix)
    want = torch.zeros(36, 36, dtype=torch.bool)
    for d, (a, b) in enumerate(zip(offsets, offsets[1:])):
        for i in range(a * inner, b * inner):
            for j in range(a * inner, b * inner):
                want[i, j] = j // inner <= i // inner or j - a * inner < prefix[d]
    assert torch.equal(got, want)


@pytest.mark.parametrize("inner, column, words", [
    ("neighborhood(window=(2, 2, 4))", 21, "must span dimension 1 whole"),
    ("neighborhood(window=(2, 3, 4), causal=(true, true, false))", 21, "must span dimension 1 whole"),
])
def test_spatial_windows_inside_documents_are_refused(inner, column, words):
    with pytest.raises(maskdsl.SpecError, match=words) as info:
        maskdsl.parse(f"layout v = grid(9, 3, 4)\nmask m = document & {inner}\n")
    assert info.value.column == column and "frames" in str(info.value)


def test_spec_built_in_python_goes_through_the_same_rules():
    from maskdsl.lang.validate import validate_spec

    lay = ir.Layout("s", (32,))
    good = ir.Spec((lay,), (ir.MaskDef("m", ir.intersection(ir.Document(), ir.Causal()), lay),))
    assert validate_spec(good) is good
    bad = ir.Spec((lay,), (ir.MaskDef("m", ir.union(ir.Document(), ir.Causal()), lay),))
    with pytest.raises(maskdsl.SpecError, match="top-level intersection"):
        validate_spec(bad)


GRID_ALL = GRID_INNER + ["neighborhood(window=(2, 3, 4), causal=(true, false, false)) | prefix", "prefix",
                         "neighborhood(window=(4, 3, 4)) | sink(2)"]


@pytest.mark.parametrize("inner", GRID_ALL)
@pytest.mark.parametrize("seed", range(3))
def test_grid_intervals_are_the_oracle(inner, seed):
    rng = random.Random(seed * 31 + len(inner))
    frames, per = rng.randint(1, 9), 12
    offsets = random_offsets(rng, frames, rng.randint(1, 5))
    prefix = [rng.randint(0, (b - a) * per) for a, b in zip(offsets, offsets[1:])]
    expr = maskdsl.parse(f"layout v = grid(9, 3, 4)\nmask m = document & ({inner})\n").mask("m").expr
    mask = document_mask(expr, (frames, 3, 4), offsets, prefix)
    terms = document_form(expr, (9, 3, 4)).terms
    for i in range(frames * per):
        d = max(k for k in range(len(offsets) - 1) if offsets[k] <= i // per)
        a, b = offsets[d] * per, offsets[d + 1] * per
        rows = torch.zeros(frames * per, dtype=torch.bool)
        cols = torch.zeros(frames * per, dtype=torch.bool)
        for t in terms:
            lo, hi = row_interval(t, i, a, b, prefix[d], per)
            assert mask[i, lo:hi].all(), (t, i)
            rows[lo:hi] = True
            lo, hi = column_interval(t, i, a, b, prefix[d], per)
            assert mask[lo:hi, i].all(), (t, i)
            cols[lo:hi] = True
        assert torch.equal(rows, mask[i]), (i, offsets)
        assert torch.equal(cols, mask[:, i]), (i, offsets)
