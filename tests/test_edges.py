"""Issue 28's reproducers: everything that parses is analysed, simulated and compiled (or refused at parse
time with file:line:col), limits bound the work, and misuse is an error that names itself, not a traceback."""

import math
import resource
import sqlite3
import time
import warnings

import numpy as np
import pytest
import torch

import maskdsl
from maskdsl.spec import ir
from maskdsl.describe import density_line
from maskdsl.spec.limits import MAX_DEPTH


def refused_at(text, line, column, match):
    with pytest.raises(maskdsl.SpecError, match=match) as info:
        maskdsl.parse(text, filename="e.mask")
    err = info.value
    assert (err.filename, err.line, err.column) == ("e.mask", line, column), str(err)
    assert err.hint
    return err


# -- everything that parses works, or is refused at parse time ------------------------------------------

def test_topk_with_a_dilated_neighborhood_is_refused_at_parse():
    text = "layout g = grid(16, 16)\nmask m = topk(k=4, block=(4, 4)) | neighborhood(window=(3, 3), dilation=(2, 2))"
    err = refused_at(text, 2, 6, "top-k cannot be combined with a dilated neighborhood")
    assert "without topk" in err.hint


def test_topk_with_an_undilated_neighborhood_still_parses():
    maskdsl.parse("layout g = grid(16, 16)\nmask m = topk(k=4, block=(4, 4)) | neighborhood(window=(3, 3))")


def _deep(levels):
    e = "full"
    for i in range(levels):
        e = f"({e} {'|' if i % 2 else '&'} causal)"
    return e


def test_depth_is_checked_on_the_inlined_mask():
    """`b` is 1 level on the text, but `fmt` writes `a` out in it: 65 levels, which no longer parses."""
    text = f"layout g = grid(16)\nmask a = {_deep(MAX_DEPTH)}\nmask b = a & sink(1)"
    refused_at(text, 3, 6, "65 levels")


def test_what_parses_formats_to_text_that_parses_again():
    text = f"layout g = grid(16)\nmask a = {_deep(MAX_DEPTH - 1)}\nmask b = a & sink(1)"
    spec = maskdsl.parse(text)
    assert maskdsl.parse(spec.fmt()) == spec


def test_names_reused_exponentially_are_refused_by_size():
    """Alternating `&` and `|` keeps the depth at one level a line while the primitives double."""
    lines = ["layout g = grid(8)", "mask m0 = causal | sink(1)"] + [
        f"mask m{i} = m{i - 1} {'&' if i % 2 else '|'} m{i - 1}" for i in range(1, 40)]
    start = time.perf_counter()
    refused_at("\n".join(lines), 12, 6, "2,048 primitives, more than 1024")  # m10, 11 levels deep
    assert time.perf_counter() - start < 5


def test_topk_static_part_is_held_to_the_term_bound():
    """S | full is one term, so the envelope alone let an 18-term S through to `check`'s NotAnalyzable."""
    windows = " | ".join(f"neighborhood(window=({2 + i}, {25 - i}))" for i in range(18))
    refused_at(f"layout a = grid(32, 32)\nmask m = topk(k=1, block=(4, 4)) | {windows}", 2, 6, "18 product terms")


def test_topk_that_parses_can_be_checked():
    windows = " | ".join(f"neighborhood(window=({2 + i}, {25 - i}))" for i in range(4))
    spec = maskdsl.parse(f"layout a = grid(32, 32)\nmask m = topk(k=1, block=(4, 4)) | {windows}")
    assert density_line(spec.masks[0]).startswith("top-k keeps 1 of 64 key blocks")


@pytest.mark.parametrize("depth", [65, 3000, 100_000])
def test_deeply_parenthesised_values_are_a_spec_error(depth):
    text = "layout g = grid(" + "(" * depth + "4" + ")" * depth + ")\nmask m = full"
    refused_at(text, 1, 16 + MAX_DEPTH + 1, "nests more than 64 levels of parentheses")


# -- limits bound the work ------------------------------------------------------------------------------

def test_union_of_sliding_windows_on_the_largest_extent_is_refused_quickly():
    windows = " | ".join(f"sliding_window({1000 + 7 * i})" for i in range(12))
    start = time.perf_counter()
    refused_at(f"layout g = grid(4194304)\nmask m = {windows}", 2, 6, "coordinates to evaluate")
    assert time.perf_counter() - start < 3


def test_many_terms_on_a_long_grid_are_refused_by_their_intersections():
    """Six overlapping terms (sink(4) is two): 2**6 x 2**20 coordinates; five terms are just within the bound."""
    five = ("sliding_window(101, causal=true) | sink(4) | neighborhood(window=9, stride=8) | "
            "neighborhood(window=17, stride=16) | block(64)")
    maskdsl.parse(f"layout g = grid(1048576)\nmask m = {five}")
    refused_at(f"layout g = grid(1048576)\nmask m = {five} | block(48)", 2, 6,
               "6 product terms .* intersections")


def test_simulating_full_on_a_million_tokens_is_refused_before_allocating():
    from maskdsl.simulator.band import TooManyTiles
    from maskdsl.simulator.simulation import simulate

    spec = maskdsl.parse("layout g = grid(1048576)\nmask m = full")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TooManyTiles, match="larger tiles"):
        simulate(spec, "m", (128,))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 400 * 1024  # KiB: no 8k x 8k table


@pytest.mark.parametrize("attention", ["heads=1, head_dim=64, batch=2000000000", "heads=4194305, kv_heads=1, head_dim=64"])
def test_huge_batch_or_heads_simulate_in_bounded_memory(attention):
    from maskdsl.simulator.simulation import simulate

    spec = maskdsl.parse(f"layout g = grid(64, 64)\nmask m = full\nattention a(mask=m, {attention})")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = simulate(spec, "m", (8, 16))
    assert math.isfinite(result.predicted_time) and result.predicted_time > 0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1024 * 1024  # KiB


def test_copies_past_the_schedule_bound_extend_the_exact_schedule(monkeypatch):
    """Scheduled one CTA at a time vs. extended linearly from two copy counts: the same time within 1%."""
    from maskdsl.simulator import cost
    from maskdsl.simulator.cost import CostModel, KernelWork

    model = CostModel.for_gpu(None)
    visits = np.array([3, 9, 4, 1, 7, 7, 2, 5] * 8, dtype=np.float64)
    work = KernelWork(visits, np.ones_like(visits), np.zeros_like(visits), 64, 64, copies=5000)
    exact = model.schedule(work).time
    monkeypatch.setattr(cost, "MAX_SCHEDULED", 64 * 100)
    extended = model.schedule(work)
    assert extended.ctas == 64 * 5000
    assert extended.time == pytest.approx(exact, rel=0.01)


# -- errors, not tracebacks -----------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["file", "impossible"])
def test_unusable_cache_dir_is_a_clear_error(tmp_path, monkeypatch, where):
    from maskdsl.codegen.cache import CacheDirError, cache_dir

    target = tmp_path / "a-file"
    target.write_text("not a directory")
    monkeypatch.setenv("MASKDSL_CACHE_DIR", str(target if where == "file" else target / "below" / "it"))
    with pytest.raises(CacheDirError, match="MASKDSL_CACHE_DIR"):
        cache_dir()


SMALL = "layout s = grid(32)\nmask m = sliding_window(5)\nattention a(mask=m, heads=1, head_dim=16, dtype=fp32)"


@pytest.fixture
def compiled(tmp_path, monkeypatch):
    from maskdsl.codegen.config import KernelConfig

    monkeypatch.setenv("MASKDSL_CACHE_DIR", str(tmp_path))
    return maskdsl.compile(maskdsl.parse(SMALL), "m", KernelConfig((16,), (16,)))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["forward", "backward"])
def test_empty_batch_is_a_clear_error(compiled, requires_grad):
    q = torch.zeros((0, 1, 32, 16), requires_grad=requires_grad)
    with pytest.raises(ValueError, match="at least one batch entry and head"):
        compiled(q, q, q)


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, "2", True])
def test_non_finite_scale_is_refused(compiled, scale):
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        compiled(q, q, q, scale=scale)


def test_compile_without_a_mask_name_compiles_the_default(tmp_path, monkeypatch):
    from maskdsl.codegen.config import KernelConfig

    monkeypatch.setenv("MASKDSL_CACHE_DIR", str(tmp_path))
    fn = maskdsl.compile(maskdsl.parse(SMALL), None, KernelConfig((16,), (16,)))
    assert fn.mask.name == "m"
    with pytest.raises(ValueError, match="a mask's name"):
        maskdsl.compile(maskdsl.parse(SMALL), 3)


@pytest.mark.parametrize("args, field", [
    (((16.0,), (16,)), "q_tile"), ((("16",), (16,)), "q_tile"), (({}, (16,)), "q_tile"), (((16,), [16]), "kv_tile"),
    (((16,), (16,), True), "num_warps"), (((16,), (16,), 4, 2.0), "num_stages"),
])
def test_kernel_config_fields_are_checked(args, field):
    from maskdsl.codegen.config import KernelConfig

    with pytest.raises(ValueError, match=f"config.{field} must be"):
        KernelConfig(*args)
    assert KernelConfig((np.int64(16),), (16,)).block_m == 16  # numpy integers are integers


def test_forged_layout_name_is_refused():
    from maskdsl.lang.validate import validate_spec

    spec = maskdsl.parse(SMALL)
    forged = ir.Spec(spec.layouts, (ir.MaskDef("m", spec.masks[0].expr, ir.Layout("elsewhere", (32,))),),
                     spec.attentions)
    with pytest.raises(maskdsl.SpecError, match="'elsewhere'.*not one of spec.layouts"):
        validate_spec(forged)


def _compile_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        maskdsl.compile(maskdsl.parse(SMALL), "m")
        elapsed = time.perf_counter() - start
    return [str(w.message) for w in caught if "tun" in str(w.message)], elapsed


def test_damaged_database_warns_once_for_forward_and_backward(tuning_env):
    (tuning_env / "tuning.db").write_bytes(b"\x00garbage" * 100)
    found, _ = _compile_warnings()
    assert len(found) == 1, found


def test_database_locked_by_another_writer_waits_briefly(tuning_env):
    from maskdsl.autotune.database import LOOKUP_WAIT_S

    holder = sqlite3.connect(tuning_env / "tuning.db")
    holder.execute("CREATE TABLE x (y)")
    holder.commit()
    holder.execute("BEGIN EXCLUSIVE")
    try:
        found, elapsed = _compile_warnings()
    finally:
        holder.rollback()
        holder.close()
    assert len(found) == 1, found
    assert elapsed < LOOKUP_WAIT_S + 4, elapsed  # sqlite3's 5 s busy wait, twice, was 10 s
