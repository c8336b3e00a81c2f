"""codegen.dispatch: which forward and backward a call gets, in order, and why the others were refused.

Hopper is asked about through `dispatch.HOPPER` with tensors on the meta device (shapes and strides,
no memory), so every branch of the order is exercised on a machine without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import maskdsl
from maskdsl.codegen import dispatch
from maskdsl.codegen.build import compile_attention
from maskdsl.codegen.compiled import tma_descriptors
from maskdsl.codegen.config import KernelConfig
from maskdsl.codegen.dispatch import HOPPER, Target


def _compile(text: str, config: KernelConfig | None = None):
    spec = maskdsl.parse(text)
    return compile_attention(spec, spec.masks[0].name, config)


def _meta(tokens: int, head_dim: int = 128, dtype=torch.bfloat16, heads: int = 2):
    return torch.empty(1, heads, tokens, head_dim, device="meta", dtype=dtype)


BLOCK = "layout g = grid(256)\nmask m = block(128)"  # whole 128-token tiles: the Gluon forward's first mode
TOPK = "layout s = grid(512)\nmask m = topk(2, block=64)"


def test_hopper_takes_the_gluon_forward_first_and_the_template_stays_compatible():
    fn = _compile(BLOCK, KernelConfig((64,), (64,), 4, 2))
    q = _meta(256)
    assert dispatch.can_run_gluon(fn, q, target=HOPPER) is None
    assert dispatch.choose_forward(fn, q, target=HOPPER) == "gluon"
    assert dispatch.compatible_forwards(fn, q, target=HOPPER) == ["gluon", "triton"]
    assert fn.gluon_schedule.ranges.mode == "whole"


def test_the_interpreter_gets_the_template_and_says_why_not_gluon():
    fn = _compile(BLOCK, KernelConfig((64,), (64,), 4, 2))
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    reasons = dict(dispatch.forward_reasons(fn, q))
    assert "interpreter" in reasons["gluon"]
    assert reasons["triton"] is None and "no top-k term" in reasons["topk"]
    assert dispatch.choose_forward(fn, q) == "triton"
    assert fn.gluon_blocker(q) == reasons["gluon"]  # the method is a thin delegate


@pytest.mark.parametrize("change, fragment", [
    (dict(dtype=torch.float32), "dtype"),
    (dict(head_dim=96), "head_dim 96"),
])
def test_tensors_the_gluon_forward_refuses_fall_to_the_template(change, fragment):
    fn = _compile(BLOCK, KernelConfig((64,), (64,), 4, 2))
    q = _meta(256, **change)
    assert fragment in dispatch.can_run_gluon(fn, q, target=HOPPER)
    assert dispatch.choose_forward(fn, q, target=HOPPER) == "triton"


def test_devices_the_gluon_forward_refuses(monkeypatch):
    fn = _compile(BLOCK, KernelConfig((64,), (64,), 4, 2))
    q = _meta(256)
    assert "8.x" in dispatch.can_run_gluon(fn, q, target=Target("cuda", 8))
    assert "10.x" in dispatch.can_run_gluon(fn, q, target=Target("cuda", 10))
    assert "interpreter" in dispatch.can_run_gluon(fn, q, target=Target("cuda", 9, True))
    monkeypatch.setenv("MASKDSL_GLUON", "0")
    assert dispatch.can_run_gluon(fn, q, target=HOPPER) == "MASKDSL_GLUON=0"
    assert dispatch.choose_forward(fn, q, target=HOPPER) == "triton"


def test_a_mask_the_schedule_refuses_gives_the_schedules_reason():
    # a 2-D grid runs the config's tiles, and 64-token tiles are not the kernel's 128
    fn = _compile("layout g = grid(16, 16)\nmask m = full", KernelConfig((4, 16), (4, 16), 4, 2))
    q = _meta(256)
    reason = dispatch.can_run_gluon(fn, q, target=HOPPER)
    assert "128 tokens" in reason
    assert dispatch.choose_forward(fn, q, target=HOPPER) == "triton"


def test_the_boxes_mode_runs_head_dim_128_only():
    fn = _compile("layout g = grid(12, 32)\nmask m = neighborhood(window=(5, 7))", KernelConfig((4, 32), (4, 32), 8, 3))
    assert fn.gluon_schedule.ranges.mode == "boxes"
    assert dispatch.choose_forward(fn, _meta(384, 128), target=HOPPER) == "gluon"
    reason = dispatch.can_run_gluon(fn, _meta(384, 64), target=HOPPER)
    assert "head_dim 64" in reason and "128 only" in reason
    assert dispatch.choose_forward(fn, _meta(384, 64), target=HOPPER) == "triton"


def test_a_topk_mask_gets_the_topk_forward_and_backward():
    fn = _compile(TOPK)
    q = torch.zeros(1, 1, 512, 64, dtype=torch.float16)
    reasons = dict(dispatch.forward_reasons(fn, q, target=HOPPER))
    assert "top-k mask" in reasons["gluon"] and "top-k mask" in reasons["triton"] and reasons["topk"] is None
    assert dispatch.choose_forward(fn, q) == "topk" and dispatch.compatible_forwards(fn, q) == ["topk"]
    assert dispatch.choose_backward(fn) == "topk" and dispatch.compatible_backwards(fn) == ["topk"]
    assert "top-k" in dispatch.can_run_split_backward(fn)


def test_a_static_mask_gets_the_split_backward():
    fn = _compile(BLOCK, KernelConfig((64,), (64,), 4, 2))
    assert dispatch.choose_backward(fn) == "triton" and dispatch.compatible_backwards(fn) == ["triton"]
    assert "no top-k term" in dispatch.can_run_topk_backward(fn)


def test_no_forward_runs_cpu_tensors_outside_the_interpreter(monkeypatch):
    fn = _compile(BLOCK, KernelConfig((64,), (64,), 4, 2))
    q = torch.zeros(1, 1, 256, 64, dtype=torch.float16)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not dispatch.interpreting()
    with pytest.raises(ValueError, match="no forward kernel runs this call: gluon: tensors on cpu"):
        dispatch.choose_forward(fn, q)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):  # the argument checks say so first
        fn(q, q, q)


def test_launch_follows_the_dispatch(monkeypatch):
    """`launch` runs what `choose_forward` answers: forcing the Gluon predicate reaches the Gluon path."""
    fn = _compile(BLOCK, KernelConfig((64,), (64,), 4, 2))
    q = torch.zeros(1, 1, 256, 64, dtype=torch.float16)
    taken = []
    monkeypatch.setattr(type(fn), "_launch_gluon", lambda self, *a: taken.append("gluon"))
    monkeypatch.setitem(dispatch.FORWARD_CHECKS, "gluon", lambda *a: None)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
    fn.launch(q, q, q, 1.0, out, lse)
    assert taken == ["gluon"]
    fn.launch(q, q, q, 1.0, out, lse, tiles=range(1))  # a slice always runs the template
    assert taken == ["gluon"]


def test_copy_engine_rule():
    fn = _compile(BLOCK, KernelConfig((64,), (64,), 4, 2))
    q = _meta(256)
    assert dispatch.tma_blocker(fn.plan, q, q, q, q, HOPPER) is None
    assert "no copy engine" in dispatch.tma_blocker(fn.plan, q, q, q, q, Target("cuda", 8))
    assert "padded" in dispatch.tma_blocker(fn.plan, _meta(256, 96), q, q, q, HOPPER)
    bshd = torch.empty(2, 256, 2, 128, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    assert "k (strides" in dispatch.tma_blocker(fn.plan, _meta(256), bshd[:1].expand(2, -1, -1, -1), q, q, HOPPER)
    dilated = _compile("layout g = grid(16, 16)\nmask m = dilated(window=(3, 3), dilation=(2, 2))")
    assert "dilation" in dispatch.tma_blocker(dilated.plan, q, q, q, q, HOPPER)


def test_the_copy_engine_switch(monkeypatch):
    fn = _compile(BLOCK, KernelConfig((64,), (64,), 4, 2))
    q = torch.zeros(1, 1, 256, 64, dtype=torch.float16)
    assert tma_descriptors(fn.plan, q, q, q, q)["TMA"]  # the interpreter emulates the copy engine
    monkeypatch.setenv("MASKDSL_TMA", "0")
    assert dispatch.tma_blocker(fn.plan, q, q, q, q) == "MASKDSL_TMA=0"
    assert not tma_descriptors(fn.plan, q, q, q, q)["TMA"]
