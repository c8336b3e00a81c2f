"""Test set-up: kernels run through Triton's interpreter on the CPU (the same source as on the GPU).

Random inputs come from fixed seeds: `case_seed` derives one from what a case is, the `gen` fixture one
from the test's id, so a failing test draws the same inputs when it is run again.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def case_seed(*parts) -> int:
    """A fixed seed from a case's description: reruns see the same inputs, different cases different ones."""
    return zlib.crc32(repr(parts).encode())


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the test's id."""
    import torch

    return torch.Generator().manual_seed(case_seed(request.node.nodeid))


@pytest.fixture
def storage(tmp_path, monkeypatch):
    """A fresh SQLite tuning database (and cache root) per test, with the lookup cache cleared around it."""
    from maskdsl.autotune.database import clear_cache

    monkeypatch.setenv("MASKDSL_CACHE_DIR", str(tmp_path))
    clear_cache()
    yield f"sqlite:///{tmp_path / 'tuning.db'}"
    clear_cache()


@pytest.fixture
def tuning_env(tmp_path, monkeypatch):
    """A fresh cache root with no tuning database named, the lookup cache cleared and the front door's
    once-per-process warnings forgotten: what `maskdsl.compile` sees on a new machine."""
    from maskdsl import api
    from maskdsl.autotune.database import clear_cache

    monkeypatch.setenv("MASKDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MASKDSL_TUNING_DB", raising=False)
    monkeypatch.setattr(api, "_WARNED", set())
    clear_cache()
    yield tmp_path
    clear_cache()
