"""Per-GPU cost constants: shipped entries, placeholders, and fitted overrides.

The prediction formula and the fit are tested in test_simulator_waves.py and test_simulator_crossval.py.
"""

import pytest

from maskdsl.simulator import CostModel


def test_gpu_cost_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKDSL_CACHE_DIR", str(tmp_path))
    h200 = CostModel.for_gpu("NVIDIA H200")
    assert not h200.placeholder and "fitted" in h200.source and h200.tile_us > 0 and h200.sms == 132
    h100 = CostModel.for_gpu("NVIDIA H100 80GB HBM3")
    assert not h100.placeholder and "fitted" in h100.source and "H100" in h100.source and h100.sms == 132
    assert CostModel.for_gpu("h100").name == "NVIDIA H100 80GB HBM3"
    # constants fitted by `maskdsl bench --suite` on this machine override the shipped ones
    from maskdsl.simulator.calibrate import store
    from maskdsl.simulator.cost import fitted_path

    store({"c_full": 1.0, "c_partial": 2.0, "c_tile": 0.1, "sms": 100, "tile_us": 5.0, "source": "fitted here"},
          "NVIDIA H200", fitted_path())
    assert CostModel.for_gpu("NVIDIA H200").c_partial == 2.0
    with pytest.raises(KeyError, match="known"):
        CostModel.for_gpu("TPU v5")
