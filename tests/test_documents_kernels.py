"""Document kernels under Triton's interpreter against the float64 oracle (maskdsl.harness.documents).

Random offsets (empty documents, one-token documents, documents shorter and longer than a tile), odd
lengths, GQA and a padded head_dim; every launch writes into NaN-poisoned buffers, so an element the
kernels forget fails. Gradients are held to autograd through the float64 reference.
"""

import random

import pytest
import torch

import maskdsl
from maskdsl.codegen.build import compile_attention
from maskdsl.codegen.documents.compiled import DocumentConfig, metadata
from maskdsl.harness.documents import reference_document_attention

SMALL = DocumentConfig((16, 16, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1))

MASKS = {
    "causal": "document & causal",
    "window": "document & sliding_window(9, causal=true)",
    "prefix": "document & (causal | prefix)",
    "sink": "document & (sliding_window(7, causal=true) | (sink(3) & causal))",
    "full": "document",
    "centred": "document & sliding_window(11)",
    "full-and": "document & full",
}


def draw(rng: random.Random, length: int, docs: int):
    cuts = sorted(rng.randint(0, length) for _ in range(docs - 1))
    offsets = [0, *cuts, length]
    prefix = [rng.randint(0, b - a) for a, b in zip(offsets, offsets[1:])]
    return torch.tensor(offsets, dtype=torch.int32), torch.tensor(prefix, dtype=torch.int32)


def inputs(length, batch=2, heads=4, kv_heads=2, dim=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, length, dim, generator=gen, dtype=torch.float64)
            for h in (heads, kv_heads, kv_heads, heads)]


def compiled(name, length):
    spec = maskdsl.parse(f"layout s = grid({length})\nmask m = {MASKS[name]}\n")
    return spec, compile_attention(spec, "m", SMALL)


# On a grid documents are runs of whole frames (dimension 0): block-causal video with clips of any length.
GRIDS = {
    "block-causal": "document & neighborhood(window=(9, 3, 5), causal=(true, false, false))",
    "frame-window": "document & (neighborhood(window=(2, 3, 5), causal=(true, false, false)) | prefix)",
    "centred-frames": "document & neighborhood(window=(3, 3, 5))",
    "tokens-causal-sink": "document & (causal | sink(7))",
}


@pytest.mark.parametrize("name", GRIDS)
@pytest.mark.parametrize("seed", range(2))
def test_grid_documents_forward_and_backward(name, seed):
    rng = random.Random(f"{name}{seed}")
    spec = maskdsl.parse(f"layout v = grid(9, 3, 5)\nmask m = {GRIDS[name]}\n")
    fn = compile_attention(spec, "m", SMALL)
    offsets, _ = draw(rng, 9, rng.randint(1, 5))
    prefix = torch.tensor([rng.randint(0, (b - a) * 15) for a, b in zip(offsets.tolist(), offsets.tolist()[1:])],
                          dtype=torch.int32) if fn.form.uses_prefix else None
    q, k, v, do = inputs(135, batch=1, heads=2, kv_heads=1, dim=16, seed=seed)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves, documents=offsets, prefix=prefix, return_lse=True)
    got = torch.autograd.grad(out, leaves, do.float())
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference_document_attention(*ref_leaves, spec, "m", offsets, prefix, return_lse=True)
    want = torch.autograd.grad(ref, ref_leaves, do)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-4)
    for g, w, what in zip(got, want, "qkv"):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=1e-4, msg=f"d{what}")


def test_grid_offsets_count_frames():
    spec = maskdsl.parse("layout v = grid(9, 3, 5)\nmask m = document & causal\n")
    fn = compile_attention(spec, "m", SMALL)
    q, k, v, _ = (t.float() for t in inputs(135, batch=1, heads=1, kv_heads=1, dim=16))
    with pytest.raises(ValueError, match=r"must end at the layout's length 9 \(frames of dimension 0\), got 135"):
        fn(q, k, v, documents=torch.tensor([0, 60, 135], dtype=torch.int32))


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("length, docs", [(45, 4), (77, 9), (33, 1)])
def test_forward_and_backward_match_the_oracle(name, length, docs):
    rng = random.Random(f"{name}{length}{docs}")
    spec, fn = compiled(name, length)
    offsets, prefix = draw(rng, length, docs)
    prefix = prefix if fn.form.uses_prefix else None
    q, k, v, do = inputs(length, seed=length + docs)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    out = torch.full_like(q32, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"))
    meta = metadata(offsets, prefix, length)
    fn.launch(q32, k32, v32, q.shape[-1] ** -0.5, out, lse, meta)
    ref, ref_lse = reference_document_attention(q, k, v, spec, "m", offsets, prefix, return_lse=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-4)

    grads = [torch.full_like(t, float("nan")) for t in (q32, k32, v32)]
    fn.launch_backward(q32, k32, v32, out, lse, do.float(), q.shape[-1] ** -0.5, *grads, meta)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(reference_document_attention(*leaves, spec, "m", offsets, prefix), leaves, do)
    for got, exp, what in zip(grads, want, "qkv"):
        torch.testing.assert_close(got.double(), exp, atol=5e-5, rtol=1e-4, msg=f"d{what}")


def test_autograd_carries_documents_and_new_offsets_each_call():
    length = 40
    spec, fn = compiled("prefix", length)
    q, k, v, do = inputs(length, batch=1, heads=2, kv_heads=1, dim=16, seed=3)
    rng = random.Random(5)
    for _ in range(3):
        offsets, prefix = draw(rng, length, rng.randint(1, 6))
        leaves = [t.float().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, documents=offsets, prefix=prefix)
        got = torch.autograd.grad(out, leaves, do.float())
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = reference_document_attention(*ref_leaves, spec, "m", offsets, prefix)
        want = torch.autograd.grad(ref, ref_leaves, do)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=1e-4)


def test_bf16_against_the_fp32_oracle():
    length = 50
    spec, fn = compiled("sink", length)
    offsets, _ = draw(random.Random(1), length, 4)
    q, k, v, _ = inputs(length, batch=1, heads=2, kv_heads=2, dim=32, seed=9)
    out = fn(*(t.bfloat16() for t in (q, k, v)), documents=offsets)
    ref = reference_document_attention(*(t.bfloat16().double() for t in (q, k, v)), spec, "m", offsets)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_rows_of_empty_documents_never_exist_and_nan_stays_in_its_document():
    """A NaN in one document's key reaches only that document's rows that attend it (tiles are shared)."""
    length = 48
    spec, fn = compiled("causal", length)
    offsets = torch.tensor([0, 16, 16, 32, 48], dtype=torch.int32)
    q, k, v, _ = inputs(length, batch=1, heads=1, kv_heads=1, dim=16, seed=2)
    k = k.clone()
    k[0, 0, 20] = float("nan")
    out = fn(*(t.float() for t in (q, k, v)), documents=offsets)
    assert out[0, 0, :20].isfinite().all() and out[0, 0, 32:].isfinite().all()
    assert out[0, 0, 20:32].isnan().all()


BAD = [
    ("missing", lambda o, p: dict(), "pass documents=offsets"),
    ("int64", lambda o, p: dict(documents=o.long()), "must be torch.int32"),
    ("list", lambda o, p: dict(documents=o.tolist()), "must be a torch.Tensor"),
    ("2-D", lambda o, p: dict(documents=o.view(1, -1)), "must be 1-D"),
    ("one offset", lambda o, p: dict(documents=o[:1]), "at least 2 offsets"),
    ("device", lambda o, p: dict(documents=o.to("meta")), "move the offsets"),
    ("start", lambda o, p: dict(documents=o + 1), "must start at 0"),
    ("end", lambda o, p: dict(documents=torch.tensor([0, 5, 30], dtype=torch.int32)), "must end at"),
    ("decreasing", lambda o, p: dict(documents=torch.tensor([0, 20, 10, 40], dtype=torch.int32)), "must not decrease"),
]


@pytest.mark.parametrize("name, make, words", BAD, ids=[b[0] for b in BAD])
def test_bad_offsets_are_clear_errors(name, make, words):
    _, fn = compiled("causal", 40)
    offsets = torch.tensor([0, 10, 40], dtype=torch.int32)
    q, k, v, _ = (t.float() for t in inputs(40, batch=1, heads=1, kv_heads=1, dim=16))
    with pytest.raises(ValueError, match=words):
        fn(q, k, v, **make(offsets, None))


def test_prefix_errors_and_static_masks_refuse_documents():
    _, fn = compiled("prefix", 40)
    offsets = torch.tensor([0, 10, 40], dtype=torch.int32)
    q, k, v, _ = (t.float() for t in inputs(40, batch=1, heads=1, kv_heads=1, dim=16))
    with pytest.raises(ValueError, match="pass prefix=lengths"):
        fn(q, k, v, documents=offsets)
    with pytest.raises(ValueError, match="one length per document"):
        fn(q, k, v, documents=offsets, prefix=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"prefix\[1\] = 31 is outside document 1"):
        fn(q, k, v, documents=offsets, prefix=torch.tensor([2, 31], dtype=torch.int32))
    _, causal = compiled("causal", 40)
    with pytest.raises(ValueError, match="has no `prefix` term"):
        causal(q, k, v, documents=offsets, prefix=torch.tensor([2, 3], dtype=torch.int32))
    static = compile_attention(maskdsl.parse("layout s = grid(40)\nmask m = causal\n"), "m")
    with pytest.raises(ValueError, match="has no `document` term"):
        static(q, k, v, documents=offsets)


@pytest.mark.parametrize("offsets", [[0, 50, 10, 40], [-7, 3, 99], [5, 5, 5], [40, 0], [0, 2**31 - 1]])
def test_unchecked_garbage_offsets_stay_in_bounds(offsets):
    """check_documents=False: whatever the offsets, every row is written and finite (the kernels clamp)."""
    spec, fn = compiled("prefix", 40)
    offsets = torch.tensor(offsets, dtype=torch.int32)
    prefix = torch.tensor([7, -3, 2**30][:len(offsets) - 1], dtype=torch.int32)
    q, k, v, _ = (t.float().requires_grad_() for t in inputs(40, batch=1, heads=2, kv_heads=1, dim=16))
    out = fn(q, k, v, documents=offsets, prefix=prefix, check_documents=False)
    assert out.isfinite().all()
    out.sum().backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))


def test_torch_compile_fullgraph_with_unchecked_offsets():
    """One opaque custom op, forward and backward, with the offsets as a tensor input: no graph break."""
    spec, fn = compiled("prefix", 40)

    def model(q, k, v, offsets, prefix):
        return fn(q * 2.0, k, v, documents=offsets, prefix=prefix, check_documents=False) + 1.0

    compiled_model = torch.compile(model, backend="aot_eager", fullgraph=True)
    q, k, v, do = (t.float() for t in inputs(40, batch=1, heads=2, kv_heads=1, dim=16, seed=4))
    for seed in range(2):
        offsets, prefix = draw(random.Random(seed), 40, 4)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = compiled_model(*leaves, offsets, prefix)
        torch.testing.assert_close(out, model(q, k, v, offsets, prefix))
        got = torch.autograd.grad(out, leaves, do)
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(model(*ref_leaves, offsets, prefix), ref_leaves, do)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", ["causal", "prefix", "sink", "centred"])
def test_kernels_visit_exactly_the_simulators_tiles(name):
    """The forward's and dK/dV's (full, partial) tile counts per program, written by the kernels themselves,
    equal the simulator's (simulator/documents.py), which a brute-force test holds to the oracle's blocks."""
    from maskdsl.simulator.documents import document_tiles

    length = 77
    spec, fn = compiled(name, length)
    offsets, prefix = draw(random.Random(name), length, 5)
    prefix = prefix if fn.form.uses_prefix else None
    q, k, v, do = (t.float() for t in inputs(length, batch=1, heads=2, kv_heads=1, dim=16))
    meta = metadata(offsets, prefix, length)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
    expr = spec.mask("m").expr
    for kind, (bm, bn), transposed, programs in (("forward", SMALL.forward[:2], False, (2, -(-length // 16))),
                                                 ("dkdv", SMALL.dkdv[:2], True, (1, -(-length // 32)))):
        counts = torch.full((*programs, 2), -1, dtype=torch.int32)
        kernel, grid, args, kwargs = fn.kernel_args(kind, q, k, v, 0.25, meta, out=out, lse=lse, dout=do,
                                                    delta=torch.zeros(q.shape[:3]), dq=torch.empty_like(q),
                                                    dk=torch.empty_like(k), dv=torch.empty_like(v), counts=counts)
        kernel[grid](*args, **kwargs)
        want = document_tiles(expr, length, offsets.tolist(), None if prefix is None else prefix.tolist(), bm, bn,
                              transposed=transposed)
        for row in counts:
            assert row[:, 0].tolist() == want.full.tolist(), kind
            assert row[:, 1].tolist() == want.partial.tolist(), kind


def test_nn_module_passes_documents_and_tune_refuses_a_document_mask():
    import pytest
    import torch

    import maskdsl
    from maskdsl.autotune.tuner import tune
    from maskdsl.nn import MaskedAttention

    spec = maskdsl.parse("layout s = grid(40)\nmask m = document & causal")
    layer = MaskedAttention(spec, "m")
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))
    offsets = torch.tensor([0, 13, 40], dtype=torch.int32)
    got = layer(q, k, v, documents=offsets)
    want = maskdsl.compile(spec, "m")(q, k, v, documents=offsets)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="document mask"):
        tune(spec, "m", trials=1)
