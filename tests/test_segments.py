"""Segments of a grid sharded along dimension 0 (codegen.segment, issue 16) under the interpreter.

A segment is the attention of a query chunk (frames [qa, qb)) over one key buffer (frames [ka, kb))
with the grid's mask. Each one is checked against the float64 reference restricted to its rows and
keys; merging a chunk's segments by log-sum-exp must give the whole forward, and the segments'
gradients summed (dQ over buffers, dK/dV over chunks) torch.autograd's through the reference.
Outputs are NaN-poisoned first: an element a kernel forgets to write fails.
"""

import math

import pytest
import torch
from conftest import case_seed

import maskdsl
from maskdsl.codegen.build import compile_attention
from maskdsl.codegen.config import BackwardConfig, KernelConfig
from maskdsl.harness.reference import reference_attention_block

CASES = [
    # (id, spec, forward (q_tile, kv_tile), backward ((dkdv q, kv), (dq q, kv)))
    ("1d-window-causal", "layout s = grid(70)\nmask m = sliding_window(10, causal=true)",
     ((16,), (16,)), (((16,), (32,)), ((16,), (16,)))),
    ("1d-strided-union", "layout s = grid(37)\nmask m = neighborhood(window=5, dilation=3) | sliding_window(3)",
     ((16,), (16,)), (((16,), (16,)), ((16,), (16,)))),
    ("1d-three-terms", "layout s = grid(40)\nmask m = sliding_window(5, causal=true) | sink(3) | block(8)",
     ((16,), (16,)), (((16,), (16,)), ((16,), (16,)))),
    ("2d-stride", "layout g = grid(9, 10)\nmask m = neighborhood(window=(3, 4), stride=(2, 2))",
     ((2, 8), (4, 4)), (((4, 4), (2, 8)), ((2, 8), (4, 4)))),
    ("2d-union-sink", "layout g = grid(7, 9)\nmask m = neighborhood(window=(3, 5), stride=(1, 2)) | sink(2)",
     ((2, 8), (2, 8)), (((2, 8), (2, 8)), ((2, 8), (2, 8)))),
    # a wide window: fully-seen tile pairs run across chunk and buffer boundaries (the clamp must cut them)
    ("2d-wide", "layout g = grid(8, 8)\nmask m = neighborhood(window=(7, 8))", ((2, 8), (2, 8)),
     (((2, 8), (2, 8)), ((2, 8), (2, 8)))),
    ("2d-blocked", "layout g = grid(8, 6)\nmask m = block((2, 3))", ((2, 8), (2, 8)), (((2, 8), (2, 8)), ((2, 8), (2, 8)))),
    ("3d-stride", "layout v = grid(5, 4, 6)\nmask m = neighborhood(window=(3, 3, 4), stride=(2, 1, 2))",
     ((1, 4, 4), (2, 2, 4)), (((1, 4, 4), (2, 2, 4)), ((1, 4, 4), (2, 2, 4)))),
]
CASE = {c[0]: c for c in CASES}
SCALE = 0.3


def _compile(case):
    _, text, (qt, kt), ((bq, bk), (dq_q, dq_k)) = case
    spec = maskdsl.parse(text)
    bwd = BackwardConfig(KernelConfig(bq, bk), KernelConfig(dq_q, dq_k))
    return spec, compile_attention(spec, "m", KernelConfig(qt, kt), bwd)


def _cuts(n0: int, align: int, pieces: int) -> list[tuple[int, int]]:
    """[0, n0) cut into up to `pieces` runs of frames at multiples of `align` (the last one ragged)."""
    points = sorted({align * (n0 * i // pieces // align) for i in range(1, pieces)} - {0} | {0, n0})
    return list(zip(points, points[1:]))


def _inputs(shape, dtype, seed, batch=1, heads=4, kv_heads=2, dim=16):
    gen = torch.Generator().manual_seed(seed)
    tokens = math.prod(shape)
    q, do = (torch.randn(batch, heads, tokens, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(batch, kv_heads, tokens, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype), do.to(dtype)


def _rows(frames, inner):
    return slice(frames[0] * inner, frames[1] * inner)


def _guarded(t, frames, inner):
    """The rows of `frames`, as a view into a copy with NaN rows on both sides: a kernel that reads
    a row outside its chunk or buffer gets NaN, not the neighbouring frames' real data."""
    rows = _rows(frames, inner)
    pad = 2 * inner
    out = torch.full((*t.shape[:2], rows.stop - rows.start + 2 * pad, t.shape[3]), float("nan"), dtype=t.dtype)
    out[:, :, pad:-pad] = t[:, :, rows]
    return out[:, :, pad:-pad]


def _segment(fn, q, k, v, qf, kf, inner):
    """One forward segment into NaN-poisoned buffers; every element must be written."""
    qs, ks, vs = _guarded(q, qf, inner), _guarded(k, kf, inner), _guarded(v, kf, inner)
    out = torch.full_like(qs, float("nan"))
    lse = torch.full(qs.shape[:3], float("nan"))
    fn.launch_segment(qs, ks, vs, SCALE, out, lse, q_frames=qf, k_frames=kf)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"unwritten elements in segment {qf} x {kf}"
    return out, lse


def _check_segment(spec, fn, q, k, v, qf, kf, inner, tol):
    out, lse = _segment(fn, q, k, v, qf, kf, inner)
    rows, keys = _rows(qf, inner), _rows(kf, inner)
    want, want_lse = reference_attention_block(q[:, :, rows].double(), k[:, :, keys].double(),
                                               v[:, :, keys].double(), spec, "m",
                                               torch.arange(rows.start, rows.stop), torch.arange(keys.start, keys.stop),
                                               SCALE, return_lse=True)
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse), empty), f"{qf} x {kf}: rows with no key differ"
    assert torch.all(out[empty] == 0), f"{qf} x {kf}: a row with no key in the buffer is not 0"
    assert (out.double() - want).abs().max() < tol, (qf, kf, (out.double() - want).abs().max().item())
    assert torch.where(empty, 0.0, lse.double() - want_lse).abs().max() < tol
    return out, lse


def _merge(parts):
    """Segments of one chunk merged by log-sum-exp (float64): the chunk's output and LSE."""
    lses = torch.stack([lse.double() for _, lse in parts])
    lse = torch.logsumexp(lses, 0)
    weight = torch.exp(lses - lse.clamp(min=torch.finfo(torch.float64).min)).nan_to_num(0.0)
    out = sum(w.unsqueeze(-1) * o.double() for w, (o, _) in zip(weight, parts))
    return out, lse


# the pointer loads on every case, the copy-engine (TMA) descriptors on three (interpreter time)
FORWARD = [(c, "0") for c in CASES] + [(c, "1") for c in CASES if c[0] in ("1d-window-causal", "2d-union-sink",
                                                                          "3d-stride")]


@pytest.mark.parametrize("case,tma", FORWARD, ids=[f"{c[0]}-tma{t}" for c, t in FORWARD])
def test_segments_match_reference_and_merge_to_the_whole_forward(case, tma, monkeypatch):
    monkeypatch.setenv("MASKDSL_TMA", tma)
    spec, fn = _compile(case)
    shape = spec.masks[0].layout.shape
    inner = math.prod(shape[1:])
    qt0, kt0 = fn.frame_tiles
    q, k, v, _ = _inputs(shape, torch.float32, case_seed(case[0]))
    want, want_lse = maskdsl.reference_attention(q.double(), k.double(), v.double(), spec, "m", SCALE, True)
    for qf in _cuts(shape[0], qt0, 2):
        parts = [_check_segment(spec, fn, q, k, v, qf, kf, inner, 2e-5) for kf in _cuts(shape[0], kt0, 3)]
        out, lse = _merge(parts)
        rows = _rows(qf, inner)
        assert (out - want[:, :, rows]).abs().max() < 2e-5
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse[:, :, rows]))


def test_the_whole_grid_segment_is_the_ordinary_launch_bit_for_bit():
    spec, fn = _compile(CASE["2d-union-sink"])
    q, k, v, _ = _inputs(spec.masks[0].layout.shape, torch.float32, 7)
    out, lse = torch.full_like(q, float("nan")), torch.full(q.shape[:3], float("nan"))
    fn.launch(q, k, v, SCALE, out, lse)
    seg_out, seg_lse = _segment(fn, q, k, v, (0, 7), (0, 7), 9)
    assert torch.equal(out, seg_out) and torch.equal(lse, seg_lse)


def test_sink_outside_the_buffer_and_a_buffer_the_chunk_never_reaches():
    spec, fn = _compile(CASE["2d-union-sink"])  # neighborhood | sink(2): the sink is in frame 0
    q, k, v, _ = _inputs((7, 9), torch.float32, 8)
    # frames 4..5 see frame 0 only through the sink: without frame 0 in the buffer, the neighborhood alone
    _check_segment(spec, fn, q, k, v, (4, 6), (2, 7), 9, 2e-5)
    # causal window: the first chunk never reaches the last frames' keys; every row gets 0 and -inf
    spec, fn = _compile(CASE["1d-window-causal"])
    q, k, v, _ = _inputs((70,), torch.float32, 9)
    out, lse = _check_segment(spec, fn, q, k, v, (0, 16), (48, 70), 1, 2e-5)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_bf16_segments():
    spec, fn = _compile(CASE["2d-stride"])
    q, k, v, _ = _inputs((9, 10), torch.bfloat16, 10)
    _check_segment(spec, fn, q, k, v, (2, 6), (0, 4), 10, 3e-2)
    _check_segment(spec, fn, q, k, v, (6, 9), (4, 9), 10, 3e-2)


BACKWARD = [c for c in CASES if c[0] in ("1d-window-causal", "1d-strided-union", "2d-union-sink", "2d-wide",
                                         "3d-stride")]


@pytest.mark.parametrize("case", BACKWARD, ids=[c[0] for c in BACKWARD])
def test_backward_segments_sum_to_the_whole_backward(case):
    spec, fn = _compile(case)
    shape = spec.masks[0].layout.shape
    inner = math.prod(shape[1:])
    q, k, v, do = _inputs(shape, torch.float64, case_seed(case[0], "backward"), heads=2, kv_heads=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(maskdsl.reference_attention(*leaves, spec, "m", SCALE), leaves, do)
    qf32, kf32, vf32, dof32 = (t.float() for t in (q, k, v, do))
    out, lse = torch.empty_like(qf32), torch.empty(qf32.shape[:3])
    fn.launch(qf32, kf32, vf32, SCALE, out, lse)  # the chunks' final output and LSE
    fq, fk = fn.backward_frame_tiles(16)
    align_q, align_k = math.lcm(fq, fn.frame_tiles[0]), math.lcm(fk, fn.frame_tiles[1])
    dq, dk, dv = (torch.zeros_like(t) for t in (qf32, kf32, vf32))
    for qf in _cuts(shape[0], align_q, 2):
        rq = _rows(qf, inner)
        for kf in _cuts(shape[0], align_k, 2):
            rk = _rows(kf, inner)
            args = [_guarded(t, f, inner) for t, f in ((qf32, qf), (kf32, kf), (vf32, kf), (out, qf))]
            grads = [torch.full_like(t, float("nan")) for t in args[:3]]
            fn.launch_backward_segment(*args, lse[:, :, rq], _guarded(dof32, qf, inner), SCALE, *grads,
                                       q_frames=qf, k_frames=kf)
            assert not any(torch.isnan(g).any() for g in grads), f"unwritten gradient in segment {qf} x {kf}"
            dq[:, :, rq] += grads[0]
            dk[:, :, rk] += grads[1]
            dv[:, :, rk] += grads[2]
    for name, got, ref in zip("qkv", (dq, dk, dv), want):
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (name, err)


def test_misaligned_or_bad_frames_are_refused_with_the_nearest_boundaries():
    spec, fn = _compile(CASE["2d-stride"])  # grid (9, 10), frame tiles (2, 4)
    q, k, v, _ = _inputs((9, 10), torch.float32, 11)

    def run(qf, kf, qn=None, kn=None):
        qn = qn or (qf[1] - qf[0]) * 10
        kn = kn or (kf[1] - kf[0]) * 10
        qs, ks = q[:, :, :qn], k[:, :, :kn]
        fn.launch_segment(qs, ks, ks, SCALE, torch.empty_like(qs), torch.empty(qs.shape[:3]), qf, kf)

    with pytest.raises(ValueError, match=r"q_frames=\(3, 6\).*first frame 3.*use 2 or 4"):
        run((3, 6), (0, 4))
    with pytest.raises(ValueError, match=r"q_frames=\(2, 7\).*stop frame 7.*use 6 or 8"):
        run((2, 7), (0, 4))
    with pytest.raises(ValueError, match=r"k_frames=\(2, 9\).*first frame 2.*key tile spans 4.*use 0 or 4"):
        run((2, 6), (2, 9))
    with pytest.raises(ValueError, match=r"k_frames=\(4, 6\).*stop frame 6.*use 4 or 8"):
        run((2, 6), (4, 6))
    with pytest.raises(ValueError, match=r"q_frames=\(4, 4\).*0 <= first < stop <= 9"):
        run((4, 4), (0, 4), qn=10)
    with pytest.raises(ValueError, match=r"k_frames=\(8, 10\).*0 <= first < stop <= 9"):
        run((2, 6), (8, 10))
    with pytest.raises(ValueError, match=r"k has 30 tokens.*frames \[0, 4\) of layout 'g' hold 40"):
        run((2, 6), (0, 4), kn=30)
    with pytest.raises(ValueError, match="lse must be"):
        fn.launch_segment(q[:, :, :40], k[:, :, :40], v[:, :, :40], SCALE, torch.empty(1, 4, 40, 16),
                          torch.empty(1, 4, 40, dtype=torch.float64), (2, 6), (0, 4))
    # the backward's tiles: dK/dV walks query tiles of 4 frames here
    with pytest.raises(ValueError, match=r"q_frames=\(2, 6\).*query tile spans 4.*use 0 or 4"):
        args = [q[:, :, 20:60], k[:, :, :40], v[:, :, :40]]
        fn.launch_backward_segment(*args, args[0], torch.zeros(1, 4, 40), args[0], SCALE,
                                   *(torch.empty_like(t) for t in args), (2, 6), (0, 4))


def test_a_dilated_outermost_dimension_cannot_be_sharded():
    spec = maskdsl.parse("layout g = grid(8, 8)\nmask m = neighborhood(window=(3, 3), dilation=(2, 1))")
    fn = compile_attention(spec, "m", KernelConfig((2, 8), (2, 8)))
    q = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match="shard an undilated outermost dimension"):
        fn.launch_segment(q, q, q, SCALE, torch.empty_like(q), torch.empty(1, 1, 16), (0, 2), (0, 2))
