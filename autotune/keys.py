"""Who is tuning what: the device identity and the study key of a (GPU, Triton, mask, problem).

The problem (`maskdsl.harness.Problem`) is the harness's: the tuner measures the problem it keys by.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from maskdsl import ir
from maskdsl.harness import Problem


@dataclass(frozen=True)
class Device:
    name: str  # e.g. "NVIDIA H200", or "triton-interpreter" without a GPU
    capability: str  # e.g. "sm90", or "cpu"
    triton: str

    @property
    def interpreted(self) -> bool:
        return self.capability == "cpu"


def current_device() -> Device:
    import torch
    import triton

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        major, minor = torch.cuda.get_device_capability()
        return Device(torch.cuda.get_device_name(), f"sm{major}{minor}", triton.__version__)
    return Device("triton-interpreter", "cpu", triton.__version__)


def study_name(device: Device, mask: ir.MaskDef, problem: Problem) -> str:
    """One study per (GPU + capability, Triton version, mask content hash, problem shape and dtype)."""
    return f"maskdsl|{device.name}|{device.capability}|triton-{device.triton}|{mask.content_hash()}|{problem.label()}"


def parse_study_name(name: str) -> dict | None:
    parts = name.split("|")
    if len(parts) != 6 or parts[0] != "maskdsl":
        return None
    return dict(zip(("tool", "gpu", "capability", "triton", "mask_hash", "problem"), parts))
