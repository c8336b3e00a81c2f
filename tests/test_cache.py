"""The kernel cache runs only what the compiler renders: tampered, truncated, empty files and races.

Each test compiles into its own cache directory and forgets the modules loaded so far, so that the
file on disk is what a fresh process would find.
"""

import threading
import warnings

import pytest
import torch

import maskdsl
from maskdsl.spec import ir
from maskdsl.codegen import cache
from maskdsl.codegen.cache import CacheWarning
from maskdsl.codegen.config import KernelConfig

TEXT = "layout s = grid(37)\nmask m = sliding_window(7)"
CFG = KernelConfig((16,), (16,))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "_LOADED", {})
    return tmp_path


def _check_numbers(fn, spec, seed=7):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=gen) for _ in range(3))
    out = torch.full_like(q, float("nan"))
    fn(q, k, v, out=out)
    ref = maskdsl.reference_attention(q, k, v, spec, "m")
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def _recompile(spec):
    cache._LOADED.clear()  # a new process: nothing loaded yet, only the file on disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = maskdsl.compile(spec, "m", CFG)
    return fn, [w for w in caught if issubclass(w.category, CacheWarning)]


def test_replaced_file_is_never_executed_and_is_rewritten(fresh_cache):
    spec = maskdsl.parse(TEXT)
    fn = maskdsl.compile(spec, "m", CFG)
    original = fn.source_path.read_text()
    marker = fresh_cache / "pwned"
    fn.source_path.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + original.replace("1.4426950408889634", "0"))
    again, caught = _recompile(spec)
    assert not marker.exists()
    assert len(caught) == 1 and "did not match" in str(caught[0].message)
    assert again.source_path.read_text() == original
    _check_numbers(again, spec)


def test_truncated_file_gives_a_warning_not_nan(fresh_cache):
    spec = maskdsl.parse(TEXT)
    fn = maskdsl.compile(spec, "m", CFG)
    text = fn.source_path.read_text()
    fn.source_path.write_text(text[: len(text) // 2])
    again, caught = _recompile(spec)
    assert len(caught) == 1
    _check_numbers(again, spec)


def test_empty_file_is_rewritten_and_compile_o_writes_the_module(fresh_cache, tmp_path):
    from maskdsl.cli import main

    spec_file = tmp_path / "s.mask"
    spec_file.write_text(TEXT)
    fn = maskdsl.compile(maskdsl.load(spec_file), "m", CFG)
    fn.source_path.write_text("")
    cache._LOADED.clear()
    out = tmp_path / "kernel.py"
    with pytest.warns(CacheWarning, match="empty"):
        assert main(["compile", str(spec_file), "--mask", "m", "-o", str(out), "--q-tile", "16", "--kv-tile", "16",
                     "--num-warps", "4", "--num-stages", "2"]) == 0
    written = out.read_text()
    assert "def attention_fwd" in written and written == fn.source_path.read_text()


def test_threads_compiling_one_kernel_into_an_empty_cache(fresh_cache, tmp_path, monkeypatch):
    spec = maskdsl.parse("layout s = grid(29)\nmask m = sliding_window(5) | sink(2)")
    for round_ in range(3):
        monkeypatch.setenv("MASKDSL_CACHE_DIR", str(tmp_path / f"round{round_}"))
        cache._LOADED.clear()
        errors, start = [], threading.Barrier(8)

        def work():
            try:
                start.wait()
                maskdsl.compile(spec, "m", CFG)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        files = list((tmp_path / f"round{round_}" / "kernels").iterdir())
        assert len(files) == 1 and files[0].suffix == ".py"  # no temporary file left behind


def test_mask_name_does_not_reach_the_kernel_file(fresh_cache):
    a = maskdsl.compile(maskdsl.parse(TEXT), "m", CFG)
    b = maskdsl.compile(maskdsl.parse(TEXT.replace("mask m", "mask other_name")), "other_name", CFG)
    assert a.source_path == b.source_path and a.source == b.source
    assert "other_name" not in b.source


def _python_spec(name: str, window=(7,)) -> ir.Spec:
    layout = ir.Layout("s", (37,))
    expr = ir.Neighborhood(window=window, dilation=(1,), stride=(1,), causal=(False,))
    return ir.Spec((layout,), (ir.MaskDef(name, expr, layout),))


@pytest.mark.parametrize("entry", ["api", "codegen"])
def test_python_built_spec_with_code_in_its_name_is_refused(fresh_cache, entry):
    from maskdsl.codegen.build import compile_attention

    name = "m\nimport os; os.system('touch pwned')  # "
    spec = _python_spec(name)
    compile_fn = maskdsl.compile if entry == "api" else compile_attention
    with pytest.raises(maskdsl.SpecError, match="is not a name"):
        compile_fn(spec, name, CFG)
    assert not list(fresh_cache.glob("kernels/*.py"))


@pytest.mark.parametrize("window, match", [(("7",), "tuple of 1 ints"), ((True,), "tuple of 1 ints"),
                                           ((99,), "larger than the extent"), ((7, 7), "tuple of 1 ints")])
def test_python_built_spec_numbers_are_validated(fresh_cache, window, match):
    with pytest.raises(maskdsl.SpecError, match=match):
        maskdsl.compile(_python_spec("m", window), "m", CFG)


def test_comment_text_is_escaped_to_one_line():
    from maskdsl.codegen.render import comment_safe

    assert comment_safe("a\nb\rc\x0cd\u2028e") == "a\\nb\\rc\\x0cd\\u2028e"
