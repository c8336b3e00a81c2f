"""`maskdsl bench --documents` without a GPU: its arguments, its cases, and its checks on the interpreter."""

import random
import warnings

import pytest
import torch

from maskdsl.bench.documents import CASES, attended_pairs, cpu_check, pick_cases
from maskdsl.cli import build_parser, main
from maskdsl.harness.documents import document_mask


def test_arguments_parse():
    args = build_parser().parse_args(["bench", "--documents", "--only", "causal,prefix", "--calls", "7",
                                      "--json", "x.json", "--no-flex"])
    assert args.documents and args.calls == 7 and args.only == "causal,prefix" and args.no_flex
    assert [c.name for c in pick_cases(args.only)] == ["causal_32k", "prefix_lm_128k"]
    with pytest.raises(ValueError, match="no document case matches"):
        pick_cases("nope")


def test_without_a_gpu_it_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["bench", "--documents"]) == 2
    assert "GPU" in capsys.readouterr().out


@pytest.mark.parametrize("name", CASES)
def test_cases_parse_and_draw_valid_layouts(name):
    case = CASES[name]
    spec = case.spec()
    assert spec.mask("m").documents and spec.mask("m").layout.shape == (case.length,)
    rng = random.Random(3)
    for _ in range(5):
        offsets, prefix = case.draw(rng)
        sizes = [b - a for a, b in zip(offsets, offsets[1:])]
        assert offsets[0] == 0 and offsets[-1] == case.length
        assert all(case.low <= s <= case.high for s in sizes[:-1]) and 1 <= sizes[-1] <= case.high
        assert (prefix is None) == (case.prefix_share == 0)
        if prefix is not None:
            assert all(0 <= p <= s for p, s in zip(prefix, sizes))


@pytest.mark.parametrize("name", CASES)
def test_attended_pairs_count_the_oracle(name):
    case = CASES[name].scaled(120)
    offsets, prefix = case.draw(random.Random(1))
    mask = document_mask(case.spec().mask("m").expr, case.length, offsets, prefix)
    assert attended_pairs(case, offsets, prefix) == int(mask.sum())


def test_cpu_check_runs_the_kernels_against_the_oracle():
    for row in cpu_check("causal,window_sink", length=64):
        errors = [row[k] for k in ("out_err", "dq_err", "dk_err", "dv_err")]
        errors += [row["rows"][k] for k in ("out_err", "lse_err", "dq_err")]
        assert max(errors) < 1e-5, row


@pytest.mark.parametrize("name", CASES)
def test_flex_baseline_computes_the_same_mask(name):
    """The baseline's BlockMask and mask_mod (FlexAttention's eager path on the CPU) against the oracle."""
    from torch.nn.attention.flex_attention import flex_attention

    from maskdsl.bench.document_baselines import FlexDocuments
    from maskdsl.harness.documents import reference_document_attention

    case = CASES[name].scaled(128, heads=2, head_dim=16)
    offsets, prefix = case.draw(random.Random(2))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 16, generator=gen) for _ in range(3))
    flex = FlexDocuments(case, "cpu", compile_mask=False)
    flex.block_mask(torch.tensor([0, 128], dtype=torch.int32), torch.tensor([64], dtype=torch.int32))  # refilled below
    block = flex.block_mask(torch.tensor(offsets, dtype=torch.int32),
                            None if prefix is None else torch.tensor(prefix, dtype=torch.int32))
    with warnings.catch_warnings():  # eager flex_attention says (once) it is meant for debugging
        warnings.simplefilter("ignore")
        got = flex_attention(q, k, v, block_mask=block)
    want = reference_document_attention(q.double(), k.double(), v.double(), case.spec(), "m", offsets, prefix)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_sweep_candidates_are_valid_configs():
    from maskdsl.bench.documents import SWEEP_DKDV, SWEEP_DQ, SWEEP_FORWARD
    from maskdsl.codegen.documents.compiled import DocumentConfig

    for kind, candidates in (("forward", SWEEP_FORWARD), ("dkdv", SWEEP_DKDV), ("dq", SWEEP_DQ)):
        assert candidates[0] == getattr(DocumentConfig(), kind)  # the default is timed first
        for c in candidates:
            DocumentConfig(**{kind: c}).validate()
    args = build_parser().parse_args(["bench", "--documents", "--sweep"])
    assert args.sweep


def test_padding_to_a_fixed_count_keeps_the_mask():
    from maskdsl.bench.documents import pad_documents

    case = CASES["prefix_lm_128k"].scaled(64)
    offsets, prefix = case.draw(random.Random(0))
    padded, padded_prefix = pad_documents(offsets, prefix, len(offsets) - 1 + 3)  # three empty documents more
    assert len(padded) == len(offsets) + 3 and len(padded_prefix) == len(prefix) + 3
    expr = case.spec().mask("m").expr
    assert torch.equal(document_mask(expr, 64, offsets, prefix), document_mask(expr, 64, padded, padded_prefix))


def test_a_whole_case_runs_on_the_interpreter():
    """run_case end to end at a toy size (what the GPU run does, minus the CUDA-only baselines)."""
    from maskdsl.bench.documents import format_row, run_case

    case = CASES["window_sink_32k"].scaled(64, heads=2, head_dim=16)
    result = run_case(case, calls=2, with_flex=False, device="cpu", dtype=torch.float32, check_length=48)
    assert result["check"]["out_err"] < 1e-5 and result["check"]["dq_err"] < 1e-5
    assert max(result["check_small_gradients"].values()) < 1e-5
    assert result["ours"]["forward_ms"] > 0 and result["simulator"]["forward_bound_us"] > 0
    assert case.name in format_row(result)


def test_format_row_survives_failed_parts():
    from maskdsl.bench.documents import format_row

    row = {"case": "c", "ours": {"forward_ms": 1.0, "forward_tflops": 2.0, "backward_ms": 3.0, "backward_tflops": 4.0},
           "flex": {"error": "RuntimeError: boom"}, "check": {"out_err": 0.0, "dq_err": 0.0}}
    text = format_row(row)
    assert "boom" in text and "of bound" not in text
