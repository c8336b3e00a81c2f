"""Backward kernels under Triton's interpreter against torch.autograd through the float64 reference.

The kernels run in float32 (float64 is not a kernel dtype), so `torch.autograd.gradcheck` cannot run
on them; instead the float32 gradients are held to ~1e-5 of the float64 reference's autograd
gradients. Every direct launch starts from NaN-poisoned gradients: an element the kernels forget to
write fails. Seeds are fixed per case.
"""

import pytest
import torch
from conftest import EXAMPLES

import maskdsl
from maskdsl.codegen.build import compile_attention
from maskdsl.codegen.config import BackwardConfig, KernelConfig

CASES = [
    # (id, spec text, forward/backward q_tile, kv_tile)
    ("1d-window-odd", "layout s = grid(45)\nmask m = sliding_window(10)", (16,), (16,)),
    ("1d-causal", "layout s = grid(33)\nmask m = causal", (16,), (16,)),
    ("1d-full", "layout s = grid(21)\nmask m = full", (16,), (16,)),
    ("1d-blocked", "layout s = grid(40)\nmask m = block(8)", (16,), (32,)),
    ("2d-stride-dilation", "layout g = grid(9, 10)\nmask m = neighborhood(window=(3, 4), stride=(1, 2), dilation=(2, 1))",
     (4, 4), (4, 4)),
    ("2d-causal-stride", "layout g = grid(6, 9)\nmask m = neighborhood(window=(4, 5), stride=(2, 2), causal=(true, false))",
     (2, 8), (4, 4)),
    ("3d-gna", "layout v = grid(3, 4, 6)\nmask m = neighborhood(window=(2, 3, 4), stride=(1, 2, 2))", (1, 4, 4), (2, 2, 4)),
    ("2d-blocked-shell-free", "layout g = grid(4, 16)\nmask m = block((2, 8))", (2, 8), (2, 8)),
    ("union-sink", "layout g = grid(5, 9)\nmask m = neighborhood(window=(3, 4)) | sink(5)", (2, 8), (4, 4)),
    ("streaming-llm", "layout s = grid(40)\nmask m = (sliding_window(5, causal=true) | sink(3)) & causal", (16,), (16,)),
    ("intersection-empty-rows", "layout s = grid(40)\nmask m = sink(3) & neighborhood(window=2)", (16,), (16,)),
]


def _compile(text, q_tile, kv_tile, atomic=False):
    spec = maskdsl.parse(text)
    bwd = BackwardConfig(KernelConfig(q_tile, kv_tile), KernelConfig(q_tile, kv_tile), atomic)
    return spec, compile_attention(spec, "m", KernelConfig(q_tile, kv_tile), bwd)


def _inputs(tokens, batch, heads, kv_heads, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, tokens, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, tokens, dim, generator=gen, dtype=torch.float64)
    do = torch.randn(batch, heads, tokens, dim, generator=gen, dtype=torch.float64)
    return q, k, v, do


def reference_grads(spec, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = maskdsl.reference_attention(*leaves, spec, "m")
    return torch.autograd.grad(out, leaves, do)


def kernel_grads(fn, q, k, v, do, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, do.to(dtype))


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("atomic", [False, True], ids=["split", "atomic"])
@pytest.mark.parametrize("name,text,q_tile,kv_tile", CASES, ids=[c[0] for c in CASES])
def test_gradients_match_reference_autograd_fp32(name, text, q_tile, kv_tile, atomic):
    spec, fn = _compile(text, q_tile, kv_tile, atomic)
    tokens = spec.masks[0].layout.tokens
    # GQA (2 query heads per kv head) and a batch of 2 on the 1-D cases; one head pair elsewhere (interpreter time)
    batch, heads = (2, 4) if len(q_tile) == 1 else (1, 2)
    q, k, v, do = _inputs(tokens, batch, heads, heads // 2, 16, seed=sum(map(ord, name)))
    got = kernel_grads(fn, q, k, v, do, torch.float32)
    want = reference_grads(spec, q, k, v, do)
    for n, a, b in zip("qkv", got, want):
        assert not torch.isnan(a).any(), f"d{n} has NaN"
        assert rel_err(a, b) < 1e-5, (n, rel_err(a, b))


def test_rows_that_see_no_key_get_zero_gradient():
    spec, fn = _compile("layout s = grid(40)\nmask m = sink(3) & neighborhood(window=2)", (16,), (16,))
    q, k, v, do = _inputs(40, 1, 2, 2, 16, seed=3)
    mask = maskdsl.reference_mask(spec, "m")
    empty = ~mask.any(1)
    assert empty.sum() > 30  # the case really has empty rows
    dq, dk, dv = kernel_grads(fn, q, k, v, do, torch.float32)
    assert torch.all(dq[:, :, empty] == 0)
    unseen = ~mask.any(0)  # keys no query sees
    assert torch.all(dk[:, :, unseen] == 0) and torch.all(dv[:, :, unseen] == 0)


def test_launch_backward_writes_every_element_and_is_deterministic():
    spec, fn = _compile("layout g = grid(7, 9)\nmask m = neighborhood(window=(3, 5), stride=(1, 2)) | sink(4)",
                        (4, 4), (2, 8))
    q, k, v, do = (t.float() for t in _inputs(63, 1, 2, 1, 32, seed=11))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3])
    fn.launch(q, k, v, 0.3, out, lse)
    runs = []
    for _ in range(2):
        grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
        fn.launch_backward(q, k, v, out, lse, do, 0.3, *grads)
        assert not any(torch.isnan(g).any() for g in grads), "a gradient element was not written"
        runs.append(grads)
    for a, b in zip(*runs):
        assert torch.equal(a, b), "two backward runs differ"
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = maskdsl.reference_attention(*leaves, spec, "m", scale=0.3)
    for a, b in zip(runs[0], torch.autograd.grad(ref, leaves, do.double())):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("heads,kv_heads", [(2, 1), (3, 3)], ids=["gqa", "mha"])
def test_atomic_backward_writes_every_element_and_matches_reference(heads, kv_heads):
    """The atomic-dQ path: float32 accumulators cast into the caller's (NaN-poisoned) tensors; with a GQA
    group its heads run on programs of their own, adding into float32 dK, dV."""
    spec, fn = _compile("layout g = grid(7, 9)\nmask m = neighborhood(window=(3, 5), stride=(1, 2)) | sink(4)",
                        (4, 4), (2, 8), atomic=True)
    q, k, v, do = (t.float() for t in _inputs(63, 2, heads, kv_heads, 24, seed=13))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3])
    fn.launch(q, k, v, 0.3, out, lse)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    fn.launch_backward(q, k, v, out, lse, do, 0.3, *grads)
    assert not any(torch.isnan(g).any() for g in grads), "a gradient element was not written"
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = maskdsl.reference_attention(*leaves, spec, "m", scale=0.3)
    for n, a, b in zip("qkv", grads, torch.autograd.grad(ref, leaves, do.double())):
        assert rel_err(a, b) < 1e-5, (n, rel_err(a, b))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_gradients(dtype, tol):
    spec, fn = _compile("layout s = grid(45)\nmask m = sliding_window(11) | sink(2)", (16,), (16,))
    q, k, v, do = _inputs(45, 1, 2, 1, 32, seed=5)
    got = kernel_grads(fn, q, k, v, do, dtype)
    want = reference_grads(spec, q, k, v, do)
    for n, a, b in zip("qkv", got, want):
        assert a.dtype == dtype
        assert rel_err(a, b) < tol, (n, rel_err(a, b))


def test_nn_module_trains_under_torch_compile_fullgraph():
    from maskdsl.nn import MaskedAttention

    spec = maskdsl.parse("layout g = grid(5, 6)\nmask m = neighborhood(window=(3, 3), stride=(1, 2))")
    attn = MaskedAttention(spec, "m", KernelConfig((4, 4), (2, 8)))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)
            self.attn = attn

        def forward(self, x):  # x: [B, L, 16], one head
            q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
            return self.attn(q, k, v).squeeze(1).sum()

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 30, 16)
    loss = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    loss.backward()
    got = model.qkv.weight.grad.clone()
    model.zero_grad()
    # the same block through the float64 reference
    q, k, v = model.qkv(x).unsqueeze(1).chunk(3, dim=-1)
    maskdsl.reference_attention(q, k, v, spec, "m").sum().backward()
    assert rel_err(got, model.qkv.weight.grad.double()) < 1e-4


def test_backward_op_passes_opcheck():
    spec, fn = _compile("layout s = grid(20)\nmask m = sliding_window(5)", (16,), (16,))
    q, k, v, do = (t.float() for t in _inputs(20, 1, 2, 1, 16, seed=2))
    out, lse = torch.ops.maskdsl.attention(q, k, v, fn.key, 0.25)
    torch.library.opcheck(torch.ops.maskdsl.attention_backward.default, (q, k, v, out, lse, do, fn.key, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.maskdsl.attention.default, (*leaves, fn.key, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_returned_lse_is_a_constant_for_autograd():
    spec, fn = _compile("layout s = grid(20)\nmask m = sliding_window(5)", (16,), (16,))
    q, k, v = (torch.randn(1, 1, 20, 16, requires_grad=True) for _ in range(3))
    out, lse = fn(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


def test_backward_config_keys_round_trip_and_bad_keys_are_explained():
    cfg = BackwardConfig(KernelConfig((2, 8), (4, 4), 4, 2), KernelConfig((4, 8), (2, 8), 8, 3))
    assert BackwardConfig.from_key(cfg.key()) == cfg
    with pytest.raises(ValueError, match="not a backward config key"):
        BackwardConfig.from_key("q64_k64_w4_s2")
    spec = maskdsl.parse("layout s = grid(20)\nmask m = sliding_window(5)")
    with pytest.raises(ValueError, match="has 2 entries but the layout has 1"):
        compile_attention(spec, "m", KernelConfig((16,), (16,)), cfg)


def test_bench_training_checks_gradients_on_sampled_rows():
    from maskdsl.bench.training import bench_training

    spec = maskdsl.parse("layout g = grid(6, 9)\nmask m = neighborhood(window=(3, 5), stride=(1, 2)) | sink(3)\n"
                         "attention a(mask=m, heads=4, kv_heads=2, head_dim=16, dtype=bf16)")
    cfg = KernelConfig((2, 8), (4, 4))
    configs = [(cfg, BackwardConfig(cfg, cfg)), (cfg, BackwardConfig(cfg, cfg, atomic=True))]
    result = bench_training(spec, "m", configs=configs, rows=7, device="cpu")
    for entry in result["ours"]:
        assert "failed" not in entry, entry
        assert not entry["grad_nan"] and max(entry["dq_error"], entry["dk_error"], entry["dv_error"]) < 1e-5
    assert [e["backward_config"].endswith("-atomic") for e in result["ours"]] == [False, True]


def test_training_candidates_cover_both_dq_modes():
    from maskdsl.bench.training import ATOMIC_OPTIONS, backward_candidates

    mask = maskdsl.parse("layout s = grid(4096)\nmask m = sliding_window(257)").mask("m")
    both = backward_candidates(mask, 128)
    atomic = [c for c in both if c.atomic]
    assert len(atomic) >= len(ATOMIC_OPTIONS) - 1 and len(both) > len(atomic) > 0
    assert all(c.dq == atomic[0].dq for c in atomic)  # the atomic backward's dQ kernel never runs: one dQ config
    assert all(c.atomic for c in backward_candidates(mask, 128, ("atomic",)))


def test_training_example_runs_and_both_runs_agree(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("train_video_block", EXAMPLES / "train_video_block.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--steps", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "losses.json").read_text())
    ours, dense = result["losses"]["maskdsl"], result["losses"]["sdpa_masked"]
    assert len(ours) == 2 and (tmp_path / "losses.png").stat().st_size > 0
    # same weights, same batches, the same mask: the second step sees the first step's gradients
    assert ours == pytest.approx(dense, rel=1e-4)


def test_transposed_schedule_covers_every_pair_and_full_means_full():
    """maskdsl.analysis.transpose against brute force over tile pairs of random 1-D relations (neighborhoods with
    window/stride/dilation/causal, query ranges of sinks, causal): every attended pair lies in both
    directions' visited ranges, and a pair either direction calls full has every (row, key) attended."""
    import random

    import numpy as np

    from maskdsl.analysis.intervals import evaluate, rel_before, rel_neighborhood, rel_queries_in
    from maskdsl.analysis.transpose import key_tile_ranges, query_tile_ranges

    rng = random.Random(7)
    for _ in range(150):
        n = rng.randint(1, 30)
        kind = rng.choice(["neighborhood", "queries", "before"])
        d = 1
        if kind == "neighborhood":
            d = rng.randint(1, max(1, min(3, n)))
            w = rng.randint(1, max(1, n // d))
            rel = rel_neighborhood(w, d, rng.randint(1, w), rng.random() < 0.5)
        elif kind == "queries":
            a = rng.randint(0, n)
            rel = rel_queries_in(a, rng.randint(a, n))
        else:
            rel = rel_before(rng.random() < 0.5)
        qt, kt = rng.choice([1, 2, 4, 8]), rng.choice([1, 2, 4, 8])
        lo, hi = evaluate(rel, n)
        by_q = query_tile_ranges(lo, hi, d, qt, kt)
        glen_max = -(-n // d)
        qpg, kpg = -(-glen_max // qt), -(-glen_max // kt)
        by_k = key_tile_ranges(by_q, d, kpg)
        for g in range(d):
            glo, ghi = lo[g::d], hi[g::d]
            glen = len(glo)
            for u in range(qpg):
                rows = np.arange(u * qt, min(u * qt + qt, glen))
                for t in range(kpg):
                    keys = np.arange(t * kt, t * kt + kt)
                    seen = (keys[None, :] >= glo[rows, None]) & (keys[None, :] <= ghi[rows, None]) & (keys < glen)
                    a, b, fa, fb = by_q[g * qpg + u]
                    qa, qb, kfa, kfb = by_k[g * kpg + t]
                    case = (kind, n, d, qt, kt, g, u, t)
                    if seen.any():
                        assert a <= t <= b and qa <= u <= qb, case
                    if fa <= t <= fb or kfa <= u <= kfb:
                        assert len(rows) and seen.all(), case


def test_eager_calls_equal_the_custom_op_bit_for_bit():
    """An eager call skips the custom-op dispatcher (an autograd.Function); torch.compile goes through the op.
    Same kernels, same saved tensors: outputs, LSE and gradients are bitwise equal."""
    spec, fn = _compile("layout g = grid(5, 9)\nmask m = neighborhood(window=(3, 4)) | sink(5)", (2, 8), (4, 4))
    q, k, v, do = (t.float() for t in _inputs(45, 1, 2, 1, 16, seed=21))
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    out_a, lse_a = fn(*a, scale=0.3, return_lse=True)
    grads_a = torch.autograd.grad(out_a, a, do)
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    out_b, lse_b = torch.ops.maskdsl.attention(*b, fn.key, 0.3)
    grads_b = torch.autograd.grad(out_b, b, do)
    assert torch.equal(out_a, out_b) and torch.equal(lse_a, lse_b)
    assert not lse_a.requires_grad  # the log-sum-exp is a constant for autograd on both paths
    for x, y in zip(grads_a, grads_b):
        assert torch.equal(x, y)
