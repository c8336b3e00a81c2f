"""One test per class of rejected spec: the message, the line and the column must point at the mistake."""

import pytest

import maskdsl
from maskdsl import SpecError

HEADER = "layout video = grid(30, 48, 80)\n"


def error_of(text, filename="bad.mask") -> SpecError:
    with pytest.raises(SpecError) as info:
        maskdsl.parse(text, filename)
    err = info.value
    assert isinstance(err, ValueError)
    assert str(err).startswith(f"{filename}:{err.line}:{err.column}: ")
    return err


def column_of(text, line, needle):
    return text.splitlines()[line - 1].index(needle) + 1


CASES = [
    # (spec, line, text the caret must sit on, words the message must contain)
    ("syntax", HEADER + "mask a = neighborhood(window=3 stride=2)\n", 2, "stride", ["unexpected 'stride'", "expected"]),
    ("bad character", HEADER + "mask a = neighborhood(window=3) ^ full\n", 2, "^", ["unexpected character '^'"]),
    ("unknown primitive", HEADER + "mask a = neighbourhood(window=3)\n", 2, "neighbourhood",
     ["unknown primitive 'neighbourhood'", "did you mean 'neighborhood'"]),
    ("unknown keyword", HEADER + "mask a = neighborhood(window=3, strides=2)\n", 2, "strides",
     ["unknown keyword 'strides'", "did you mean 'stride'"]),
    ("wrong arity", HEADER + "mask a = neighborhood(window=(3, 5))\n", 2, "(3, 5)",
     ["window has 2 entries", "3 dimensions"]),
    ("window > extent", HEADER + "mask a = neighborhood(window=(15, 50, 40))\n", 2, "50, 40",
     ["window 50 is larger than the extent 48 of dimension 1"]),
    ("window*dilation > extent", HEADER + "mask a = dilated(window=(3, 5, 7), dilation=(11, 1, 1))\n", 2,
     "11", ["window 3 x dilation 11 = 33 is larger than the extent 30 of dimension 0"]),
    ("stride > window", HEADER + "mask a = strided(window=(3, 5, 7), stride=(1, 6, 1))\n", 2, "6, 1)",
     ["stride 6 must be between 1 and the window 5"]),
    ("stride < 1", HEADER + "mask a = strided(window=3, stride=0)\n", 2, "0)", ["stride 0 must be between 1"]),
    ("non-positive grid", "layout video = grid(30, 0, 80)\n", 1, "0, 80", ["grid extent 0 must be positive"]),
    ("non-positive window", HEADER + "mask a = neighborhood(window=-2)\n", 2, "-2", ["window -2 must be at least 1"]),
    ("unknown mask name", HEADER + "mask local = full\nmask a = locl | sink(4)\n", 3, "locl",
     ["unknown mask 'locl'", "did you mean 'local'"]),
    ("unknown layout", HEADER + "mask a = full on vidoe\n", 2, "vidoe", ["unknown layout 'vidoe'", "did you mean 'video'"]),
    ("duplicate name", HEADER + "mask a = full\nmask a = causal\n", 3, "a = causal", ["duplicate mask name 'a'"]),
    ("different layouts", "layout a = grid(8)\nlayout b = grid(9)\nmask x = full on a\nmask y = full on b\n"
     "mask z = x | y\n", 5, "y\n".strip(), ["mask 'y' is on 'b' (9,)", "same size"]),
    ("topk k < 1", "layout s = grid(64)\nmask t = topk(k=0, block=8)\n", 2, "0,", ["topk k=0 must be at least 1"]),
    ("topk block < 1", "layout s = grid(64)\nmask t = topk(k=2, block=0)\n", 2, "0)", ["topk block=0 must be at least 1"]),
    ("missing argument", HEADER + "mask a = neighborhood(stride=2)\n", 2, "neighborhood", ["needs the argument 'window'"]),
    ("sliding_window on 3-D", HEADER + "mask a = sliding_window(5)\n", 2, "sliding_window", ["works on a 1-D layout"]),
    ("attention kv_heads", HEADER + "mask a = full\nattention m(mask=a, heads=24, kv_heads=5)\n", 3, "5)",
     ["kv_heads=5 must divide heads=24"]),
    ("attention unknown mask", HEADER + "mask a = full\nattention m(mask=b, heads=2)\n", 3, "b, heads",
     ["unknown mask 'b'"]),
    ("layout not a grid", "layout v = grd(3)\n", 1, "grd", ["a layout is a grid, not 'grd'"]),
    ("unexpected end", HEADER + "mask a = neighborhood(window=3,\n", 2, None, ["unexpected end of file"]),
]


@pytest.mark.parametrize("name,text,line,at,words", CASES, ids=[c[0] for c in CASES])
def test_error_points_at_the_mistake(name, text, line, at, words):
    err = error_of(text)
    assert err.line == line, str(err)
    if at is not None:
        assert err.column == column_of(text, line, at), str(err)
    for w in words:
        assert w in str(err), str(err)
    # the offending line is echoed with a caret under the column
    rendered = str(err).splitlines()
    assert rendered[1].strip() == text.splitlines()[line - 1].strip()
    assert rendered[2].index("^") - 4 == err.column - 1


def test_hint_is_given():
    err = error_of(HEADER + "mask a = neighborhood(window=(15, 50, 40))\n")
    assert "hint: use a window of at most 48" in str(err)


def test_load_names_the_file(tmp_path):
    path = tmp_path / "my.mask"
    path.write_text("layout s = grid(8)\n\nmask a = sink(9)\n")
    with pytest.raises(SpecError) as info:
        maskdsl.load(path)
    assert str(info.value).startswith(f"{path}:3:")
    assert info.value.filename == str(path)


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="cannot read the spec"):
        maskdsl.load(tmp_path / "nope.mask")


def test_no_lark_traceback_leaks():
    err = error_of("mask = = =")
    assert err.__cause__ is None and err.__suppress_context__
