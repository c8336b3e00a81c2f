"""The cost model's schedule: occupancy, launch-order list scheduling, per-CTA cost, ragged and union tiles."""

import heapq
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import maskdsl
from maskdsl.simulator import CostModel, simulate
from maskdsl.simulator.counting import key_tile_visits
from maskdsl.simulator.schedule import ctas_per_sm, list_schedule, shared_schedule


def launch_order_greedy(jobs, slots):
    """One CTA at a time, in order, onto the slot that frees first (the GPU's block scheduler)."""
    heap = [0.0] * slots
    for job in jobs:
        heapq.heappush(heap, heapq.heappop(heap) + job)
    return max(heap)


def sharing_events(jobs, alone, sms, k):
    """Event by event: CTAs in order to the SM whose slot frees first (round robin at the start); each of
    the n CTAs on an SM runs at min(k / n, job / alone) times its all-slots-busy speed."""
    queue, t = list(zip(jobs, alone)), 0.0
    running = [[] for _ in range(sms)]  # [remaining time at k-sharing, speed cap]
    free = [m for _ in range(k) for m in range(sms)]
    end = 0.0
    while queue or any(running):
        while queue and free:
            job, lone = queue.pop(0)
            running[free.pop(0)].append([job, job / lone])
        rate = {(m, i): min(k / len(r), r[i][1]) for m, r in enumerate(running) for i in range(len(r))}
        step = min(running[m][i][0] / v for (m, i), v in rate.items())
        t += step
        for (m, i), v in rate.items():
            running[m][i][0] -= v * step
        for m, r in enumerate(running):
            done = [c for c in r if c[0] <= 1e-9 * max(1.0, t)]
            for c in done:
                r.remove(c)
                free.append(m)
        end = t
    return end


def test_shared_schedule_by_hand():
    # 5 CTAs of 4 (k = 4 sharing), alone 1: four run together to 4, the fifth alone at 4x speed: 1 more
    assert shared_schedule(np.full(5, 4.0), np.full(5, 1.0), 1, 4) == pytest.approx(5.0)
    # its own loop caps a lone CTA (alone 2: at most 2x): 4 + 2; slot list scheduling said 8
    assert shared_schedule(np.full(5, 4.0), np.full(5, 2.0), 1, 4) == pytest.approx(6.0)
    assert list_schedule(np.full(5, 4.0), 4) == 8.0
    # 3 CTAs on one SM of 4 slots share it three ways: 4 x 3 / 4
    assert shared_schedule(np.full(3, 4.0), np.full(3, 1.0), 1, 4) == pytest.approx(3.0)
    # 2 SMs x 2 slots, CTAs 4, 4, 4, 4, 8: the 8 goes to SM 0 at 4 and runs alone at 2x: 8
    assert shared_schedule(np.array([4.0, 4, 4, 4, 8]), np.array([2.0, 2, 2, 2, 4]), 2, 2) == pytest.approx(8.0)
    # one slot per SM is plain list scheduling
    assert shared_schedule(np.array([1.0, 1, 1, 1, 10]), np.array([1.0, 1, 1, 1, 10]), 2, 1) == 12.0


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 60), st.integers(1, 4), st.integers(1, 4))
def test_shared_schedule_equals_the_event_by_event_simulation(seed, n, sms, k):
    # continuous random times: no two slots free at once, where which SM gets the next CTA is a tie-break
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.1, 10.0, n) * np.where(rng.random(n) < 0.1, 8.0, 1.0)  # a few heavy tiles
    alone = d / rng.uniform(1.0, k, n)  # alone between k times and as fast as with k beside it
    feats = np.stack([d * 0.25, d * 0.75], axis=1)
    span, vec = shared_schedule(d, alone, sms, k, feats=feats)
    assert math.isclose(span, sharing_events(list(d), list(alone), sms, k), rel_tol=1e-9)
    assert math.isclose(float(vec.sum()), span, rel_tol=1e-9)  # the fit's features add up to the makespan


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=120), st.integers(1, 12), st.integers(0, 119))
def test_list_schedule_equals_one_at_a_time_greedy(jobs, slots, heavy):
    jobs = [j / 3 for j in jobs]
    jobs[heavy % len(jobs)] *= 25  # an outlier (a sink's query tile) somewhere in the launch order
    assert math.isclose(list_schedule(np.array(jobs), slots), launch_order_greedy(jobs, slots), rel_tol=1e-12)


def test_a_heavy_tile_launched_first_hides_behind_the_others():
    # two slots: launched first, the 10 runs beside the four 1s; launched last, it starts at time 2
    assert list_schedule(np.array([10.0, 1, 1, 1, 1]), 2) == 10.0
    assert list_schedule(np.array([1.0, 1, 1, 1, 10]), 2) == 12.0


def test_ctas_per_sm_from_shared_memory_and_registers():
    assert ctas_per_sm(128, 128, 128, num_warps=8, num_stages=3) == 1  # 3 x 64 KB of K/V + 32 KB of Q
    assert ctas_per_sm(64, 64, 128, num_warps=4, num_stages=3) == 2  # 3 x 32 KB + 16 KB = 112 KB
    assert ctas_per_sm(64, 64, 128, num_warps=4, num_stages=6) == 1  # 6 x 32 KB + 16 KB = 208 KB
    # tiny tiles: 54 registers x 128 threads -> 9 CTAs before shared memory (13 KB each) binds
    assert ctas_per_sm(8, 16, 64, num_warps=4, num_stages=3) == 9


SMALL = """layout g = grid(9, 10)
mask m = neighborhood(window=(3, 5))
mask u = neighborhood(window=(3, 5)) | sink(3)
attention a(mask=m, heads=3, head_dim=64, dtype=bf16)
attention b(mask=u, heads=3, head_dim=64, dtype=bf16)
"""
ENTRY = {"c_full": 1.0, "c_partial": 2.5, "c_tile": 0.75, "c_union": 4.0, "sms": 4, "tile_us": 10.0,
         "launch_us": 20.0, "dense_tile_us": 5.0, "dense_cta": 2.0, "source": "test fit"}


def brute_tile_counts(spec, name, q_tile, kv_tile):
    """[NQ, NK] attended pairs and [NK] key tile sizes, tile-major, from the reference mask."""
    shape = spec.mask(name).layout.shape
    dense = maskdsl.reference_mask(spec, name).numpy().astype(np.int64)
    coords = np.array(np.unravel_index(np.arange(math.prod(shape)), shape)).T
    idx = lambda t: np.ravel_multi_index((coords // np.array(t)).T, [-(-n // e) for n, e in zip(shape, t)])  # noqa: E731
    qi, ki = idx(q_tile), idx(kv_tile)
    counts = np.zeros((qi.max() + 1, ki.max() + 1), dtype=np.int64)
    np.add.at(counts, (qi[:, None], ki[None, :]), dense)
    return counts, np.bincount(qi), np.bincount(ki)


@pytest.fixture
def costs(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"gpus": {"Test GPU": ENTRY}}))
    return path


def test_predicted_time_follows_the_documented_formula(costs):
    spec = maskdsl.parse(SMALL)
    q_tile, kv_tile = (2, 4), (4, 4)
    r = simulate(spec, "m", q_tile, kv_tile, gpu="Test GPU", costs=costs, num_warps=4, num_stages=3)
    counts, qs, ks = brute_tile_counts(spec, "m", q_tile, kv_tile)
    whole = np.array([a == 4 and b == 4 for a in (4, 4, 1) for b in (4, 4, 2)])  # ragged key tiles: partial
    full = ((counts == np.multiply.outer(qs, ks)) & whole).sum(1)
    partial = (counts > 0).sum(1) - full
    pair, per_q, h = 8 * 16 / 128**2, 8 / 128, 64 / 128
    k = 9  # ctas_per_sm(8, 16, 64, 4, 3), see above
    cta = h * (full * 1.0 * pair + partial * 2.5 * pair + 0.75 * per_q)
    assert r.ctas_per_sm == k and r.waves == pytest.approx(15 * 3 / (4 * k))
    # no load latency in this entry: alone, a CTA runs at its SM time (k x faster than with k beside it)
    assert r.predicted_time == pytest.approx(sharing_events(list(cta * k) * 3, list(cta) * 3, 4, k) + 20.0 / 10.0)
    # dense SDPA baseline: 90 tokens = one 128-row CTA per head, 1 + 2 tiles of 5 us at head_dim 64, one wave
    assert r.predicted_dense_time == pytest.approx(h * 3 * 5.0 / 10.0 + 2.0)
    assert r.predicted_ms == pytest.approx(r.predicted_time * 10.0 / 1000)
    assert r.predicted_speedup == pytest.approx(r.predicted_dense_time / r.predicted_time)


def test_static_unions_run_full_tiles_unmasked_and_topk_runs_the_union_loop(costs):
    """A static union runs its dominant term like a single term (codegen.plan): fully seen tiles unmasked,
    the rest with the predicate; only top-k runs every visited tile through its predicate loop."""
    spec = maskdsl.parse(SMALL)
    r = simulate(spec, "u", (2, 4), (4, 4), gpu="Test GPU", costs=costs, num_warps=4, num_stages=3)
    counts, qs, ks = brute_tile_counts(spec, "u", (2, 4), (4, 4))
    assert not r.union_kernel and not r.work.union.any()
    np.testing.assert_array_equal(r.work.full + r.work.partial, (counts > 0).sum(1))
    assert r.work.full.sum() > 0
    topk = maskdsl.parse("layout s = grid(256)\nmask t = topk(k=2, block=64)")
    t = simulate(topk, "t", (64,), (64,), gpu="Test GPU", costs=costs)
    assert t.union_kernel and t.work.union.sum() > 0 and not t.work.full.any() and not t.work.partial.any()


def test_a_ragged_key_tile_is_partial_for_the_kernel_even_when_fully_attended():
    spec = maskdsl.parse("layout s = grid(100)\nmask m = full\n")
    r = simulate(spec, "m", (32,), (32,))
    np.testing.assert_array_equal(r.full_per_query_tile, [4, 4, 4, 4])  # the mask: every pair attended
    np.testing.assert_array_equal(r.work.full, [3, 3, 3, 3])  # the kernel: the 4-token tile takes the predicate
    np.testing.assert_array_equal(r.work.partial, [1, 1, 1, 1])


def test_entries_without_the_new_constants_still_load():
    old = {"c_full": 1.0, "c_partial": 1.3, "c_tile": 0.5, "sms": 132, "source": "an old fit"}
    model = CostModel.from_entry("Old GPU", old)
    assert model.c_union is None and model.dense_tile_us is None and not model.backward_calibrated
    spec = maskdsl.parse("layout s = grid(4096)\nmask m = full\nattention a(mask=m, heads=8, head_dim=128)\n")
    # no SDPA constants: the baseline is this kernel with every tile full, so `full` predicts exactly 1x
    assert simulate(spec, "m", (128,), costs=model).predicted_speedup == pytest.approx(1.0)


def test_key_tile_visits_are_the_transposed_schedule():
    spec = maskdsl.parse(SMALL)
    for name in ("m", "u"):
        counts, _, _ = brute_tile_counts(spec, name, (2, 4), (4, 2))
        expr, shape = spec.mask(name).expr, spec.mask(name).layout.shape
        np.testing.assert_array_equal(key_tile_visits(expr, shape, (2, 4), (4, 2)), (counts > 0).sum(0))


def test_backward_is_none_until_measured_then_scheduled_per_key_and_query_tile():
    spec = maskdsl.parse("layout s = grid(256)\nmask m = full\nattention a(mask=m, heads=1, head_dim=128)\n")
    entry = {"c_full": 1.0, "c_partial": 1.0, "c_tile": 0.0, "sms": 4}
    assert simulate(spec, "m", (128,), backward=True, costs=CostModel.from_entry("G", entry)).backward is None
    model = CostModel.from_entry("G", {**entry, "bwd_dkdv_us": 1.0, "bwd_dq_us": 3.0, "bwd_program_us": 0.5})
    r = simulate(spec, "m", (128,), backward=True, costs=model)
    # 128-token tiles on 8 warps: one CTA per SM. dK/dV: 2 key-tile CTAs visited by 2 query tiles each,
    # dQ the same transposed; one wave each, in us: (2 x 1 + 0.5) + (2 x 3 + 0.5)
    assert (r.backward.dkdv.ctas_per_sm, r.backward.dq.ctas_per_sm) == (1, 1)
    assert r.backward.ms == pytest.approx((2.5 + 6.5) / 1000)