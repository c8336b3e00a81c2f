"""Context parallelism (maskdsl.distributed) with real processes: 2 and 4 gloo ranks on the CPU, each
running its share through the interpreter; outputs and gradients must equal the single-process
float64 reference, and the bytes each rank received must equal what its plan says."""

from __future__ import annotations

import math
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import maskdsl
from maskdsl.codegen.config import BackwardConfig, KernelConfig
from maskdsl.analysis.halo import needed_frames
from maskdsl.harness.reference import reference_attention
from maskdsl.harness.semantics import static_mask
from maskdsl.analysis.shard_plan import chunk_bounds, full_plan, shard_plan

# (layout, mask, forward q/kv tiles, zigzag[, overlap]): 1-3-D, strides, dilation off dimension 0, causal, a union
# with sinks (rank 0's sink queries need every frame: a ring of segments), GQA in every case, top-k.
CASES = {
    2: [
        ("grid(64)", "sliding_window(9, causal=true)", (16,), (16,), True),
        ("grid(9, 6)", "neighborhood(window=(3, 5), stride=(2, 1))", (2, 8), (2, 8), False, False),
        ("grid(6, 3, 7)", "neighborhood(window=(3, 3, 3), dilation=(1, 1, 2), stride=(1, 2, 1))",
         (2, 2, 4), (1, 4, 4), False),
    ],
    4: [
        ("grid(80)", "sliding_window(17) | sink(3)", (16,), (16,), False, False),
        ("grid(8, 6)", "neighborhood(window=(3, 3), causal=(true, false))", (2, 8), (2, 8), False),
        ("grid(64)", "topk(2, block=16) | sliding_window(5, causal=true)", (16,), (16,), False),
    ],
}
B, H, HKV, D = 1, 4, 2, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case in CASES[world]:
            _check(case, rank, world)
    except Exception:  # noqa: BLE001 - the parent reports the traceback
        errors.put(f"rank {rank}: {traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def _check(case, rank: int, world: int) -> None:
    from maskdsl.distributed import ContextParallelAttention

    layout, text, q_tile, kv_tile, zigzag, *rest = case
    overlap = rest[0] if rest else True
    spec = maskdsl.parse(f"layout g = {layout}\nmask m = {text}")
    cfg = KernelConfig(q_tile, kv_tile)
    attn = ContextParallelAttention(spec, "m", zigzag=zigzag, config=cfg, backward_config=BackwardConfig(cfg, cfg),
                                   head_dim=D, overlap=overlap)
    L = spec.masks[0].layout.tokens
    gen = torch.Generator().manual_seed(1234 + L)  # the same whole tensors on every rank
    q, k, v, dout = (torch.randn(B, h, L, D, generator=gen) for h in (H, HKV, HKV, H))
    ql, kl, vl = (attn.shard(t).clone().requires_grad_(True) for t in (q, k, v))
    out = attn(ql, kl, vl)
    out.backward(attn.shard(dout))
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, spec, "m")
    ref.backward(dout.double())
    what = f"{text} ({world} ranks{', zig-zag' if zigzag else ''}{'' if overlap else ', joined buffers'})"
    for name, got, want in (("out", out, ref), ("dq", ql.grad, q64.grad), ("dk", kl.grad, k64.grad),
                            ("dv", vl.grad, v64.grad)):
        want = attn.shard(want.detach()).float()
        assert not torch.isnan(got).any(), f"{what}: {name} has NaN"
        err = (got.float() - want).abs().max().item()
        assert err < 2e-3, f"{what}: {name} differs from the float64 reference by {err:.2e} on rank {rank}"
    if not spec.masks[0].dynamic:
        want = attn.plan.received_bytes(rank, D, HKV, B, 4)
        assert attn.received_bytes == want, f"{what}: received {attn.received_bytes} bytes, plan says {want}"
        got = attn.exchange(kl.detach(), vl.detach())  # the exchange alone, as the benchmark times it
        assert got == want, f"{what}: the exchange alone received {got} bytes, plan says {want}"


@pytest.mark.parametrize("world", sorted(CASES))
def test_context_parallel_equals_the_single_process_reference(world):
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), errors), nprocs=world, join=True, start_method="spawn")
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(found)


# ---- the plan, without processes ----

PLAN_CASES = [
    ("grid(40)", "sliding_window(9, causal=true) | sink(3)", 4, 4, 2, False),
    ("grid(48)", "sliding_window(7, causal=true)", 3, 4, 4, True),
    ("grid(12, 7)", "neighborhood(window=(5, 3), stride=(2, 1))", 3, 2, 1, False),
    ("grid(9, 5, 6)", "block((3, 5, 3))", 3, 3, 3, False),
    ("grid(10, 6)", "neighborhood(window=(4, 3)) & neighborhood(window=(6, 6), stride=(3, 3))", 2, 2, 2, True),
]


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("layout, text, ranks, unit, key_unit, zigzag", PLAN_CASES, ids=[c[1] for c in PLAN_CASES])
def test_plan_fetches_every_needed_frame_and_only_whole_key_tiles_around_them(layout, text, ranks, unit, key_unit,
                                                                              zigzag, overlap):
    spec = maskdsl.parse(f"layout g = {layout}\nmask m = {text}")
    mdef = spec.masks[0]
    shape = mdef.layout.shape
    inner = math.prod(shape[1:])
    m = static_mask(mdef.expr, shape)
    plan = shard_plan(mdef.expr, shape, ranks, unit, key_unit, zigzag, overlap=overlap)
    if not overlap:  # adjacent frames share a buffer, own frames included, unless the cap splits them
        cap = 3 * max(b - a for r in range(ranks) for a, b in plan.chunks[r])
        for r in range(ranks):
            for segs in plan.segments[r]:
                spans = sorted(seg.frames for seg in segs)
                assert all(x[1] != y[0] or y[1] - x[0] > cap for x, y in zip(spans, spans[1:])), spans
    owned = sorted(f for r in range(ranks) for a, b in plan.chunks[r] for f in range(a, b))
    assert owned == list(range(shape[0]))  # every frame owned exactly once
    for r in range(ranks):
        for c, (qa, qb) in enumerate(plan.chunks[r]):
            assert qa % unit == 0 and (qb % unit == 0 or qb == shape[0])
            # brute force: the frames holding a key some query of the chunk attends
            need = set(torch.nonzero(m[qa * inner:qb * inner].any(0)).flatten().div(inner, rounding_mode="floor")
                       .tolist())
            assert set(needed_frames(mdef.expr, shape, (qa, qb))) == need
            fetched = [f for seg in plan.segments[r][c] for f in range(*seg.frames)]
            assert len(fetched) == len(set(fetched)), "a frame fetched twice for one chunk"
            tiles = {f // key_unit for f in need}
            assert set(fetched) == {f for t in tiles for f in range(t * key_unit, min((t + 1) * key_unit, shape[0]))}
            for seg in plan.segments[r][c]:
                assert seg.frames[0] % key_unit == 0
                # the segment's query frames: those attending one of its keys, rounded out to whole units
                ks = slice(seg.frames[0] * inner, seg.frames[1] * inner)
                hit = torch.nonzero(m[qa * inner:qb * inner, ks].any(1)).flatten().div(inner, rounding_mode="floor")
                first, last = qa + int(hit[0]), qa + int(hit[-1])
                assert seg.queries == (qa + (first - qa) // unit * unit, min(qb, qa + ((last - qa) // unit + 1) * unit))
                assert [f for p in seg.pieces for f in range(*p.frames)] == list(range(*seg.frames))
                for p in seg.pieces:  # a piece lies inside the chunk of its owner it names
                    a, b = plan.chunks[p.source][p.chunk]
                    assert a <= p.frames[0] < p.frames[1] <= b


def test_zigzag_balances_a_causal_mask():
    spec = maskdsl.parse("layout g = grid(64)\nmask m = causal")
    mdef = spec.masks[0]
    m = static_mask(mdef.expr, (64,))

    def pairs(plan, r):
        return sum(int(m[a:b].sum()) for a, b in plan.chunks[r])

    plain = shard_plan(mdef.expr, (64,), 4)
    zig = shard_plan(mdef.expr, (64,), 4, zigzag=True)
    assert [len(c) for c in zig.chunks] == [2, 2, 2, 2]
    assert len({pairs(zig, r) for r in range(4)}) == 1  # equal work on every rank
    assert max(pairs(plain, r) for r in range(4)) > 3 * min(pairs(plain, r) for r in range(4))


def test_global_segments_are_capped_and_topk_fetches_everything():
    spec = maskdsl.parse("layout g = grid(64)\nmask m = sliding_window(5) | sink(1)")
    plan = shard_plan(spec.masks[0].expr, (64,), 8, max_segment_frames=16)
    # rank 0's sink query needs all 64 frames: 8 own, 56 remote in segments of at most 16
    remote = [s for s in plan.segments[0][0] if s.remote(0)]
    assert sum(s.frames[1] - s.frames[0] for s in remote) == 56
    assert max(s.frames[1] - s.frames[0] for s in remote) <= 16
    full = full_plan((64,), 4, 16)
    assert all(seg.frames == (0, 64) for r in range(4) for seg in full.segments[r][0])


def test_bad_shardings_are_refused_with_a_hint():
    with pytest.raises(ValueError, match="at most 3 chunks"):
        chunk_bounds(40, 4, 16)
    spec = maskdsl.parse("layout g = grid(40)\nmask m = topk(2, block=8)")
    with pytest.raises(ValueError, match="top-k"):
        shard_plan(spec.masks[0].expr, (40,), 2)


def test_merge_into_equals_attention_over_the_union_of_the_keys():
    """Two partial attentions over disjoint key sets, merged by the kernel, against one over all keys;
    rows that see nothing in one part, and in both, included (0 and -inf, never NaN)."""
    from maskdsl.codegen.merge import merge_into

    gen = torch.Generator().manual_seed(7)
    B_, H_, R, D_ = 2, 3, 70, 24  # odd rows and a padded head_dim
    q = torch.randn(B_, H_, R, D_, generator=gen, dtype=torch.float64)
    k = torch.randn(B_, H_, 50, D_, generator=gen, dtype=torch.float64)
    v = torch.randn(B_, H_, 50, D_, generator=gen, dtype=torch.float64)
    keep = torch.rand(R, 50, generator=gen) < 0.5
    keep[:5, :20] = False  # rows 0-4 see nothing in part one
    keep[:3] = False  # rows 0-2 see nothing at all

    def part(cols):
        s = (q @ k[:, :, cols].transpose(-1, -2)).masked_fill(~keep[:, cols], float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isneginf(lse), 0, lse)[..., None])
        return (p @ v[:, :, cols]), lse

    o1, l1 = part(slice(0, 20))
    o2, l2 = part(slice(20, 50))
    want, wl = part(slice(0, 50))
    o, lse = o1.float().clone(), l1.float().contiguous()
    merge_into(o, lse, o2.float(), l2.float().contiguous())
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert torch.allclose(o.double(), want, atol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(wl)) and torch.isneginf(lse[:, :, :3]).all()
    fin = ~torch.isneginf(wl)
    assert torch.allclose(lse.double()[fin], wl[fin], atol=1e-5)


def test_row_sums_copy_first_parts_and_add_later_ones():
    """The backward's gradient sums: any sequence of overlapping row ranges, against a float64 sum."""
    import random

    from maskdsl.distributed import _RowSum

    rnd = random.Random(7)
    for trial in range(200):
        n = rnd.randint(1, 30)
        want = torch.zeros(1, 2, n, 3, dtype=torch.float64)
        got = _RowSum(torch.full_like(want, float("nan")))  # untouched rows must come back 0, not garbage
        for _ in range(rnd.randint(0, 6)):
            a = rnd.randint(0, n - 1)
            b = rnd.randint(a + 1, n)
            part = torch.randn(1, 2, b - a, 3, dtype=torch.float64)
            want[:, :, a:b] += part
            got.add(a, part)
        torch.testing.assert_close(got.result(), want, msg=f"trial {trial}")


# ---- ranks agree or fail together (real processes: what one rank holds, the other must hear of) ----

AGREE_TIMEOUT = 3.0  # seconds: the layer's bound in these tests (the process group's own is 45 s below)


def _layer(layout: str, text: str, mask: str = "m", **kwargs):
    from maskdsl.distributed import ContextParallelAttention

    spec = maskdsl.parse(f"layout g = {layout}\nmask m = {text}")
    cfg = KernelConfig((16,), (16,))
    return ContextParallelAttention(spec, mask, config=cfg, backward_config=BackwardConfig(cfg, cfg), head_dim=D,
                                    timeout=AGREE_TIMEOUT, **kwargs)


def _refused(kind, fn, *texts) -> float:
    """Run fn, which must raise `kind` naming every text; the seconds it took."""
    import time

    start = time.monotonic()
    try:
        fn()
    except kind as exc:
        missing = [t for t in texts if t not in str(exc)]
        assert not missing, f"{type(exc).__name__} does not name {missing}: {exc}"
        return time.monotonic() - start
    raise AssertionError(f"expected {kind.__name__} naming {texts}, got no error")


def _agreement_worker(rank: int, world: int, port: int, errors) -> None:
    import datetime
    import time

    from maskdsl.rank_agreement import RanksDisagree, RankTimeout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=45))
    step = "start"
    try:
        step = "different windows"  # would run, each rank with its own plan, to a wrong result
        _refused(RanksDisagree, lambda: _layer("grid(64)", f"sliding_window({9 + 2 * rank})"),
                 "mask differs: rank 0 has m = neighborhood(window=9), rank 1 has m = neighborhood(window=11)")
        step = "different grids"  # would post sends and receives of different sizes: gloo aborts the process
        _refused(RanksDisagree, lambda: _layer(f"grid({64 + 16 * rank})", "sliding_window(9)"),
                 "grid differs: rank 0 has grid(64), rank 1 has grid(80)")
        step = "a rank that cannot build the layer"  # its peers hear its reason at once
        if rank == 1:
            _refused(KeyError, lambda: _layer("grid(64)", "sliding_window(9)", mask="nope"), "no mask named 'nope'")
        else:
            _refused(RanksDisagree, lambda: _layer("grid(64)", "sliding_window(9)"),
                     "rank 1 could not build it (KeyError")
        step = "different batch sizes on the first call"
        attn = _layer("grid(64)", "sliding_window(9)")
        gen = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(1 + rank, h, 64, D, generator=gen) for h in (H, HKV, HKV))
        _refused(RanksDisagree, lambda: attn(attn.shard(q), attn.shard(k), attn.shard(v)),
                 "q differs: rank 0 has [1, 4, local, 16] float32, rank 1 has [2, 4, local, 16] float32")
        step = "agreeing calls, then a rank raising on its next call"
        q, k, v = (t[:1] for t in (q, k, v))
        attn(attn.shard(q), attn.shard(k), attn.shard(v))
        if rank == 1:
            _refused(ValueError, lambda: attn(q, k, v), "local rows")  # whole tensors: refused here, alone
            time.sleep(AGREE_TIMEOUT + 1)  # and stays alive while its peer waits for its keys
        else:
            took = _refused(RankTimeout, lambda: attn(attn.shard(q), attn.shard(k), attn.shard(v)),
                            f"rank 0 waited {AGREE_TIMEOUT:g} s for exchange step 0's keys")
            assert took < AGREE_TIMEOUT + 10, f"the exchange's wait took {took:.1f} s"
        step = "a peer that raised before building the layer"
        fresh = dist.new_group(backend="gloo")  # the timed-out pair of the last step is closed
        if rank == 1:
            time.sleep(AGREE_TIMEOUT + 2)  # it raised somewhere of its own, stays alive, never builds the layer
        else:
            took = _refused(RankTimeout, lambda: _layer("grid(64)", "sliding_window(9)", group=fresh),
                            f"rank 0 of 2 waited {AGREE_TIMEOUT:g} s for every rank to join")
            assert took < AGREE_TIMEOUT + 10, f"the agreement's wait took {took:.1f} s"
    except Exception:  # noqa: BLE001 - the parent reports the traceback
        errors.put(f"rank {rank}, {step}: {traceback.format_exc()}")
    errors.put(f"done {rank}")
    os._exit(0)  # a timed-out collective stays posted: skip the process group's teardown


def test_ranks_holding_different_layers_fail_together_and_every_wait_is_bounded():
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_agreement_worker, args=(2, _free_port(), errors), nprocs=2, join=True, start_method="spawn")
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert sorted(m for m in found if m.startswith("done")) == ["done 0", "done 1"], found
    failures = [m for m in found if not m.startswith("done")]
    assert not failures, "\n".join(failures)
