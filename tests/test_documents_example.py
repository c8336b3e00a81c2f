"""examples/train_packed_documents.py trains on the CPU at a toy size (Triton's interpreter)."""

import importlib.util
import math

import pytest
from conftest import EXAMPLES


@pytest.mark.parametrize("extra", [[], ["--prefix-lm"]])
def test_packed_documents_example_trains(extra, tmp_path):
    spec = importlib.util.spec_from_file_location("train_packed_documents", EXAMPLES / "train_packed_documents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--cpu-smoke", "--steps", "2", "--json", str(tmp_path / "losses.json"), *extra])
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    assert math.isfinite(result["held_out"])
    assert (tmp_path / "losses.json").exists()
