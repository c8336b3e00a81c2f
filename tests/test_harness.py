"""The shared measurement harness: one default problem, seeded inputs, and a row check that catches
unwritten, stray and wrong rows (maskdsl/harness/measure.py)."""

import math

import pytest
import torch

import maskdsl
from maskdsl.spec import ir
from maskdsl.harness.measure import (Problem, make_inputs, reference_rows, relative_error, sample_rows, tolerance,
                             torch_dtype)

SPEC = """\
layout s = grid(40)
mask m = sliding_window(7)
mask n = sliding_window(5)
attention a(mask=m, batch=2, heads=6, kv_heads=2, head_dim=16, dtype=fp32)
"""


def test_problem_comes_from_the_attention_statement_else_one_default():
    spec = maskdsl.parse(SPEC)
    assert Problem.of(spec, "m") == Problem(2, 6, 2, 16, "fp32")
    assert Problem.of(spec, "n") == Problem(1, 8, 8, 128, "bf16")  # no statement: the one default
    assert Problem.of(spec, "m").label() == "B2H6K2D16-fp32"
    assert Problem.of(spec, "m").interpreter_slice() == Problem(1, 1, 1, 16, "fp32")


def test_every_spec_dtype_has_a_torch_dtype():
    assert {name: torch_dtype(name) for name in ir.SPEC_DTYPES} == {
        "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*bf16, fp16, fp32"):
        torch_dtype("fp8")


def test_inputs_are_seeded_and_shaped_by_the_problem():
    p = Problem(2, 6, 2, 16, "fp32")
    q, k, v = make_inputs(p, 40, "cpu", seed=3)
    assert q.shape == (2, 6, 40, 16) and k.shape == v.shape == (2, 2, 40, 16) and q.dtype == torch.float32
    again = make_inputs(p, 40, "cpu", seed=3)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), again))
    assert not torch.equal(q, make_inputs(p, 40, "cpu", seed=4)[0])
    rows = sample_rows(40, 12, seed=3)
    assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == 12 and torch.equal(rows, sample_rows(40, 12, 3))


def test_relative_error_is_nan_when_anything_is_nan():
    ref = torch.ones(3, dtype=torch.float64)
    assert relative_error(torch.tensor([1.0, 1.0, 1.0 + 3e-3]), ref) == pytest.approx(3e-3 / math.sqrt(3), rel=1e-4)
    assert math.isnan(relative_error(torch.tensor([1.0, float("nan"), 1.0]), ref))
    assert tolerance("cpu") == 2e-3 and tolerance("cuda") == 2e-2


@pytest.fixture
def case():
    spec = maskdsl.parse(SPEC)
    q, k, v = make_inputs(Problem.of(spec, "m"), 40, "cpu", seed=0)
    rows = sample_rows(40, 10, seed=0)
    return spec, q, k, v, rows, reference_rows(q, k, v, spec, "m", rows, heads=4)


def exact(spec, q, k, v):
    return maskdsl.reference_attention(q, k, v, spec, "m").to(torch.float32)


def test_reference_rows_pair_query_and_kv_heads_as_the_kernel_does(case):
    spec, q, k, v, rows, ref = case
    assert ref.heads == 3  # 4 asked, whole groups of 3 query heads per kv head: 3
    assert torch.allclose(ref.values, maskdsl.reference_attention(q, k, v, spec, "m")[:1, :3, rows])


def test_check_passes_the_exact_output_and_catches_each_fault(case):
    spec, q, k, v, rows, ref = case
    good = exact(spec, q, k, v)
    check = ref.check(good)
    assert check.ok(2e-3) and check.rows == 10 and check.unwritten == check.stray == 0

    unwritten = good.clone()
    unwritten[1, 5, rows[-1]] = float("nan")  # a batch and head the reference does not cover: still counted
    assert ref.check(unwritten).unwritten == 1 and not ref.check(unwritten).ok(2e-3)

    wrong = good.clone()
    wrong[0, 0, rows[0]] += 1.0
    assert ref.check(wrong).error > 2e-3 and not ref.check(wrong).ok(2e-3)

    sliced = torch.full_like(good, float("nan"))  # a slice run: only the reference rows were to be written
    sliced[:, :, rows] = good[:, :, rows]
    assert ref.check(sliced, slice_only=True).ok(2e-3)
    outside = next(r for r in range(40) if r not in rows.tolist())
    sliced[0, 0, outside] = 0.0
    assert ref.check(sliced, slice_only=True).stray == 1


def test_host_us_times_each_call_and_syncs_between_groups():
    """host_us is the median per-call wall time; the sync runs between groups of calls, never inside one."""
    import time

    from maskdsl.harness.measure import host_us

    syncs = []
    slow = host_us(lambda: time.sleep(0.002), calls=30, sync=lambda: syncs.append(1), every=10)
    fast = host_us(lambda: None, calls=30)
    assert 1500 < slow < 20000 and fast < slow / 10
    assert len(syncs) == 4  # before each group of 10 and once at the end
