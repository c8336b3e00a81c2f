"""Bounded analysis and parser limits: every refusal is a SpecError with file:line:col, and what is
accepted is analysed exactly (Python integers, brute-force checked)."""

import numpy as np
import pytest
import torch

import maskdsl
from maskdsl.analysis.counts import attended_pairs
from maskdsl.describe import density_line
from maskdsl.spec.limits import MAX_EXTENT, MAX_PRODUCTS
from maskdsl.harness.reference import reference_mask


def refused(text, line, column, match):
    """`column` None: any column of that line (where a depth bound trips depends on the tree's shape)."""
    with pytest.raises(maskdsl.SpecError, match=match) as info:
        maskdsl.parse(text, filename="t.mask")
    err = info.value
    assert (err.filename, err.line) == ("t.mask", line) and err.column in ((column,) if column else range(1, len(text))), str(err)
    shown = str(err).splitlines()
    assert len(shown[1]) < 120 and shown[2].index("^") < 120  # long lines are cut around the caret
    return err


@pytest.mark.parametrize("extent, match", [
    ("1" + "0" * 12, "larger than 4,194,304"), ("1" + "0" * 9, "larger than 4,194,304"),
    ("9223372036854775807", "larger than 4,194,304"), ("9223372036854775808", "too large"),
    ("1" + "0" * 5000, "too large"),
], ids=["1e12", "1e9", "int64-max", "int64-max+1", "5000-digits"])
def test_huge_extents_are_refused_at_the_number(extent, match):
    refused(f"layout a = grid({extent})\nmask m = sliding_window(3)", 1, 17, match)


@pytest.mark.parametrize("shape", ["65536, 65536", "100000, 100000, 100000"])
def test_grids_past_the_kernels_token_index_are_refused(shape):
    refused(f"layout a = grid({shape})\nmask m = full", 1, 12, "more than 2,147,483,647")


def test_counts_are_exact_python_integers_beyond_int64():
    """65536 x 65536 of `full` is 2**64 pairs: the analysis used to wrap to 0 ("empty mask")."""
    expr = maskdsl.parse("layout a = grid(16, 16)\nmask m = full").masks[0].expr
    assert attended_pairs(expr, (65536, 65536)) == 2**64


def test_tiny_densities_keep_significant_digits():
    spec = maskdsl.parse(f"layout a = grid({MAX_EXTENT})\nmask m = sliding_window(1)")
    line = density_line(spec.masks[0])
    assert line.startswith("density 2.38e-05%"), line


def test_largest_1d_extent_is_analysed():
    spec = maskdsl.parse(f"layout a = grid({MAX_EXTENT})\nmask m = sliding_window(4097, causal=true) | sink(4)")
    n, w = MAX_EXTENT, 4097
    i = np.arange(4, n, dtype=np.int64)
    # the first 4 queries see all n keys; query i >= 4 sees its causal window of min(i + 1, w) keys plus
    # the sink keys left of that window (those below i - w + 1)
    expected = 4 * n + int((np.minimum(i + 1, w) + np.clip(i - w + 1, 0, 4)).sum())
    assert attended_pairs(spec.masks[0].expr, (n,)) == expected


def _windows(k):
    return " | ".join(f"neighborhood(window=({2 + i}, {25 - i}))" for i in range(k))


def test_union_of_twelve_overlapping_neighborhoods_is_exact():
    spec = maskdsl.parse(f"layout a = grid(32, 32)\nmask m = {_windows(MAX_PRODUCTS)}")
    assert attended_pairs(spec.masks[0].expr, (32, 32)) == int(reference_mask(spec, "m").sum())


def test_union_past_the_bound_is_refused_at_parse_time():
    refused(f"layout a = grid(32, 32)\nmask m = {_windows(MAX_PRODUCTS + 1)}", 2, 6, "13 product terms")


def test_mixed_dilations_in_a_union_are_counted_exactly():
    spec = maskdsl.parse("layout a = grid(40)\nmask m = dilated(window=3, dilation=2) | dilated(window=4, dilation=3) "
                         "| dilated(window=2, dilation=7)")
    assert attended_pairs(spec.masks[0].expr, (40,)) == int(reference_mask(spec, "m").sum())


def test_intersection_of_two_dilations_is_analysed_and_compile_says_why_not():
    """It used to parse and then fail `check` with an internal NotAnalyzable."""
    from maskdsl.codegen.config import KernelConfig

    spec = maskdsl.parse("layout a = grid(16)\nmask m = dilated(window=2, dilation=2) & dilated(window=2, dilation=3)")
    assert attended_pairs(spec.masks[0].expr, (16,)) == int(reference_mask(spec, "m").sum())
    assert density_line(spec.masks[0]).startswith("density ")
    with pytest.raises(ValueError, match="dilations 2 and 3"):
        maskdsl.compile(spec, "m", KernelConfig((16,), (16,)))


def test_two_topk_terms_are_refused_at_parse_time():
    refused("layout a = grid(64)\nmask m = topk(k=1, block=16) | topk(k=2, block=16)", 2, 6, "one top-k term")


@pytest.mark.parametrize("text, line, column", [
    ("layout a = grid(16)\nmask m = " + "(full | " * 400 + "full" + ")" * 400, 2, None),
    ("layout a = grid(16)\nmask m = " + " | ".join(["full"] * 1000), 2, None),
    ("layout a = grid(16)\nmask m = " + " & ".join(["full"] * 1000), 2, None),
], ids=["400-nested-parentheses", "1000-unions", "1000-intersections"])
def test_deep_expressions_are_a_spec_error_not_a_recursion_error(text, line, column):
    refused(text, line, column, "nests more than")


def test_non_utf8_file_names_the_byte(tmp_path):
    path = tmp_path / "bad.mask"
    path.write_bytes(b"layout a = grid(16)\nmask m = full # caf\xe9\n")
    with pytest.raises(maskdsl.SpecError, match="not UTF-8") as info:
        maskdsl.load(path)
    assert (info.value.line, info.value.column) == (2, 20)


def test_utf8_bom_is_not_an_error(tmp_path):
    path = tmp_path / "bom.mask"
    path.write_bytes("\ufefflayout a = grid(16)\nmask m = full\n".encode())
    assert maskdsl.load(path).masks[0].name == "m"


@pytest.mark.parametrize("sep", ["\x0c", "\x0b", "\x1c", "\u2028", "\x85"])
def test_caret_shows_the_line_the_parser_counted(sep):
    text = f"layout a = grid(16) # one{sep}two\nmask m = fulll"
    err = maskdsl.SpecError
    with pytest.raises(err) as info:
        maskdsl.parse(text)
    shown = str(info.value).splitlines()
    assert (info.value.line, info.value.column) == (2, 10)
    assert shown[1].strip() == "mask m = fulll" and shown[2].index("^") == shown[1].index("fulll")


def test_show_builds_only_the_rows_it_draws(tmp_path, monkeypatch):
    """`show` on a 32k-token spec used to build [n, n] per dimension (4.5 GB); now only the drawn rows."""
    from maskdsl.harness import semantics

    seen = []
    real = semantics.neighborhood_1d

    def spy(n, *args, **kwargs):
        out = real(n, *args, **kwargs)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(semantics, "neighborhood_1d", spy)
    spec = maskdsl.parse("layout s = grid(32768)\nmask m = sliding_window(4097)")
    rows = semantics.static_mask(spec.masks[0].expr, (32768,), torch.tensor([0, 16384, 32767]))
    assert seen == [(3, 32768)] and rows.sum(1).tolist() == [4097] * 3
