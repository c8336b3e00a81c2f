"""Who is tuning what: the device identity and the study key of a (GPU, Triton, mask, problem).

The problem (`maskdsl.harness.measure.Problem`) is the harness's: the tuner measures the problem it keys by.
"""

from __future__ import annotations

from dataclasses import dataclass

from maskdsl.spec import ir
from maskdsl.harness.measure import Problem


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

    from maskdsl.codegen.dispatch import interpreting

    if torch.cuda.is_available() and not interpreting():
        major, minor = torch.cuda.get_device_capability()
        return Device(torch.cuda.get_device_name(), f"sm{major}{minor}", triton.__version__)
    return Device("triton-interpreter", "cpu", triton.__version__)


PASSES = ("fwd", "bwd", "bwd-atomic")  # the backward's two dQ modes are studies of their own (BackwardConfig.atomic)


def study_name(device: Device, mask: ir.MaskDef, problem: Problem, pass_: str = "fwd") -> str:
    """One study per (GPU + capability, Triton version, mask content hash, problem shape and dtype, pass).

    The forward's name carries no pass field: studies stored before the backward was tuned keep
    their names (and are resumed), and a name without the field reads as a forward study.
    """
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    name = f"maskdsl|{device.name}|{device.capability}|triton-{device.triton}|{mask.content_hash()}|{problem.label()}"
    return name if pass_ == "fwd" else f"{name}|{pass_}"


def parse_study_name(name: str) -> dict | None:
    """The fields of a maskdsl study name (with `pass`: one of PASSES), or None for another tool's study."""
    parts = name.split("|")
    if len(parts) == 6:
        parts.append("fwd")
    if len(parts) != 7 or parts[0] != "maskdsl" or parts[6] not in PASSES:
        return None
    return dict(zip(("tool", "gpu", "capability", "triton", "mask_hash", "problem", "pass"), parts))
