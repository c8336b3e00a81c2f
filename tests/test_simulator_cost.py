"""The cost model: load-balanced makespan, the documented prediction formula, per-GPU constants, calibration.

The makespan is checked against greedy scheduling with a heap, one job at a time.
"""

import heapq
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskdsl import ir
from maskdsl.simulator import CostModel, simulate
from maskdsl.simulator.cost import lpt_makespan

from sim_brute import brute_counts, make_spec, video_spec


def greedy(jobs, bins):
    """Longest-first, one job at a time onto the least-loaded bin."""
    heap = [0.0] * bins
    for job in sorted(jobs, reverse=True):
        heapq.heappush(heap, heapq.heappop(heap) + job)
    return max(heap)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(1, 40)), min_size=1, max_size=6), st.integers(1, 9))
def test_lpt_makespan_equals_one_at_a_time_greedy(groups, bins):
    values = np.array([v / 7 for v, _ in groups])
    counts = np.array([c for _, c in groups])
    jobs = [v for v, c in zip(values, counts) for _ in range(c)]
    assert math.isclose(lpt_makespan(values, counts, bins), greedy(jobs, bins), rel_tol=1e-9)


def test_predicted_speedup_follows_the_documented_formula(tmp_path):
    spec = make_spec((9, 10), ir.union(ir.Neighborhood((3, 5), (1, 1), (1, 1), (False, False)), ir.Sink(3)),
                     heads=3)
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"gpus": {"Test GPU": {"c_full": 1.0, "c_partial": 2.5, "c_tile": 0.75, "sms": 4,
                                                      "tile_us": 10.0, "source": "test fit"}}}))
    r = simulate(spec, "m", (2, 4), (4, 4), gpu="Test GPU", costs=path)
    counts, qs, ks = brute_counts(spec, (2, 4), (4, 4), True)
    full = (counts == np.multiply.outer(qs, ks)).sum(1)
    partial = (counts > 0).sum(1) - full
    pair, per_q = 8 * 16 / 128**2, 8 / 128
    jobs = list(full * 1.0 * pair + partial * 2.5 * pair + 0.75 * per_q) * 3
    dense_jobs = [counts.shape[1] * pair + 0.75 * per_q] * (counts.shape[0] * 3)
    assert math.isclose(r.predicted_time, greedy(jobs, 4))
    assert math.isclose(r.predicted_speedup, greedy(dense_jobs, 4) / greedy(jobs, 4))
    assert math.isclose(r.predicted_ms, r.predicted_time * 10.0 / 1000)
    assert r.gpu == "Test GPU" and r.cost_source == "test fit"


def test_gpu_cost_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKDSL_CACHE_DIR", str(tmp_path))
    h200 = CostModel.for_gpu("NVIDIA H200")
    assert not h200.placeholder and "fitted" in h200.source and h200.tile_us > 0 and h200.sms == 132
    h100 = CostModel.for_gpu("NVIDIA H100 80GB HBM3")
    assert h100.placeholder and "PLACEHOLDER" in h100.source
    assert CostModel.for_gpu("h100").name == "NVIDIA H100 80GB HBM3"
    # constants fitted by `maskdsl bench --suite` on this machine override the shipped ones
    from maskdsl.simulator.calibrate import store
    from maskdsl.simulator.cost import fitted_path

    store({"c_full": 1.0, "c_partial": 2.0, "c_tile": 0.1, "sms": 100, "tile_us": 5.0, "source": "fitted here"},
          "NVIDIA H200", fitted_path())
    assert CostModel.for_gpu("NVIDIA H200").c_partial == 2.0
    with pytest.raises(KeyError, match="known"):
        CostModel.for_gpu("TPU v5")


def test_calibration_recovers_known_constants():
    """Times made from chosen constants (linear, evenly loaded SMs) must fit back to those constants."""
    from maskdsl.simulator.calibrate import Measurement, _features, fit

    cases = [("neighborhood(window=(15, 24, 40))", (2, 8, 8), (2, 8, 8)),
             ("neighborhood(window=(15, 24, 40), stride=(2, 8, 8))", (2, 8, 8), (2, 8, 8)),
             ("neighborhood(window=(9, 9, 9))", (4, 4, 8), (2, 4, 8)),
             ("block((2, 16, 16))", (2, 8, 8), (1, 8, 8))]
    truth = np.array([3.0, 4.5, 7.0])  # microseconds: full tile, partial tile, per query tile
    meas = []
    for text, q, k in cases:
        spec = video_spec(text)
        m = Measurement(spec, "m", q, k, 24, 1.0)
        ms = float(_features(m, 132, 1.0) @ truth) / 1000.0
        meas.append(Measurement(spec, "m", q, k, 24, ms))
    entry = fit(meas, "test GPU")
    assert entry["pair_exponent"] == pytest.approx(1.0)
    assert entry["tile_us"] == pytest.approx(3.0, rel=1e-6)
    assert entry["c_partial"] == pytest.approx(1.5, rel=1e-6) and entry["c_tile"] == pytest.approx(7.0 / 3.0, rel=1e-6)
