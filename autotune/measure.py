"""Timing one config, after checking its output: on the GPU with do_bench, else in the interpreter.

On a GPU every trial's output is compared with the default config's output on the same inputs
before its time counts. In the interpreter (no GPU) the problem is cut to a slice of query tiles
of one head, checked against the float64 reference rows; the time is wall-clock and says little.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from maskdsl.autotune.keys import Device, Problem
from maskdsl.codegen.config import KernelConfig
from maskdsl import ir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class WrongOutput(Exception):
    """A config that computes something else than the default config (never timed)."""


@dataclass
class Bench:
    spec: ir.Spec
    mask: str
    problem: Problem
    device: Device
    interpreter_tiles: int = 2

    def __post_init__(self):
        from maskdsl.codegen.compiled import compile_attention, untuned_config

        mdef = self.spec.mask(self.mask)
        tokens = mdef.layout.tokens
        gen = torch.Generator().manual_seed(0)
        if self.device.interpreted:
            shape, kv_shape, dtype, dev = (1, 1, tokens, self.problem.head_dim), None, torch.float32, "cpu"
            kv_shape = shape
        else:
            p = self.problem
            shape = (p.batch, p.heads, tokens, p.head_dim)
            kv_shape = (p.batch, p.kv_heads, tokens, p.head_dim)
            dtype, dev = DTYPES[p.dtype], "cuda"
        self.q = torch.randn(shape, generator=gen).to(dev, dtype)
        self.k = torch.randn(kv_shape, generator=gen).to(dev, dtype)
        self.v = torch.randn(kv_shape, generator=gen).to(dev, dtype)
        self.compile = compile_attention
        if not self.device.interpreted:
            default = untuned_config(mdef, self.problem.head_dim)
            self.expected = compile_attention(self.spec, self.mask, default)(self.q, self.k, self.v)

    def time_ms(self, config: KernelConfig) -> float:
        fn = self.compile(self.spec, self.mask, config)
        if self.device.interpreted:
            return self._interpreted(fn)
        import triton

        out = fn(self.q, self.k, self.v)
        torch.cuda.synchronize()
        err = ((out.float() - self.expected.float()).norm() / self.expected.float().norm()).item()
        if not err < 2e-2:  # NaN fails too
            raise WrongOutput(f"output differs from the default config's (relative error {err:.2e})")
        return triton.testing.do_bench(lambda: fn(self.q, self.k, self.v), warmup=25, rep=100, return_mode="median")

    def _interpreted(self, fn) -> float:
        from maskdsl.reference import reference_attention_rows

        q_tiles = getattr(fn, "q_tiles", None) or fn.plan.q_tiles
        tiles = range(0, min(q_tiles, self.interpreter_tiles))
        out = torch.full_like(self.q, float("nan"))
        lse = torch.empty(self.q.shape[:3])
        start = time.perf_counter()
        fn.launch(self.q, self.k, self.v, self.q.shape[-1] ** -0.5, out, lse, tiles=tiles)
        elapsed = (time.perf_counter() - start) * 1000
        written = torch.nonzero(~torch.isnan(out[0, 0]).any(-1)).flatten()
        if len(written) == 0:
            raise WrongOutput("no output row was written")
        ref = reference_attention_rows(self.q, self.k, self.v, self.spec, self.mask, written)
        got = out[:, :, written].double()
        err = ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()
        if not err < 2e-3:
            raise WrongOutput(f"output differs from the reference (relative error {err:.2e})")
        return elapsed
