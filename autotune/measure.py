"""Timing one config, after checking its output: on the GPU with do_bench, else in the interpreter.

The forward (`Bench`): on a GPU every trial's output is compared with the default config's output on the same inputs
before its time counts. In the interpreter (no GPU) the problem is cut to a slice of query tiles
of one head, checked against the float64 reference rows; the time is wall-clock and says little.
Inputs, the row check and the timer are the shared harness's (`maskdsl.harness.measure`). The backward
(`BackwardBench`) times `torch.autograd.grad` after checking dQ, dK and dV the same two ways.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from maskdsl.spec import ir
from maskdsl.autotune.keys import Device
from maskdsl.codegen.config import KernelConfig
from maskdsl.harness.measure import Problem, make_inputs, reference_rows, relative_error, time_ms, tolerance


class WrongOutput(Exception):
    """A config that computes something else than the default config (never timed)."""


def slice_rows(fn, tiles) -> torch.Tensor:
    """Flat row indices of the given query tiles of a compiled kernel (sorted, CPU int64)."""
    plan = getattr(fn, "plan", None)
    if plan is not None:
        from maskdsl.codegen.plan import tile_rows

        rows = {r for t in tiles for r in tile_rows(plan, t)}
    else:  # top-k kernels run 1-D row-major tiles of block_m tokens
        block, tokens = fn.config.block_m, fn.mask.layout.tokens
        rows = {r for t in tiles for r in range(t * block, min((t + 1) * block, tokens))}
    return torch.tensor(sorted(rows), dtype=torch.int64)


def run_slice(fn, q, k, v, tiles) -> torch.Tensor:
    """Launch only the given query tiles (a range: one launch) into a NaN-poisoned output.

    What the interpreter can afford; the rows it leaves NaN tell which rows the kernel did not write.
    """
    out = torch.full_like(q, float("nan"))
    lse = torch.empty(q.shape[:3], device=q.device)
    for part in [tiles] if isinstance(tiles, range) else [range(t, t + 1) for t in tiles]:
        fn.launch(q, k, v, q.shape[-1] ** -0.5, out, lse, tiles=part)
    return out


@dataclass
class Bench:
    spec: ir.Spec
    mask: str
    problem: Problem
    device: Device
    interpreter_tiles: int = 2

    def __post_init__(self):
        from maskdsl.codegen.build import compile_attention, untuned_config

        mdef = self.spec.mask(self.mask)
        if self.device.interpreted:
            self.q, self.k, self.v = make_inputs(self.problem.interpreter_slice(), mdef.layout.tokens, "cpu")
        else:
            self.q, self.k, self.v = make_inputs(self.problem, mdef.layout.tokens, "cuda")
        self.compile = compile_attention
        if not self.device.interpreted:
            default = untuned_config(mdef, self.problem.head_dim)
            self.expected = compile_attention(self.spec, self.mask, default)(self.q, self.k, self.v)

    def time_ms(self, config: KernelConfig) -> float:
        fn = self.compile(self.spec, self.mask, config)
        if self.device.interpreted:
            return self._interpreted(fn)
        out = fn(self.q, self.k, self.v)
        torch.cuda.synchronize()
        err = relative_error(out, self.expected, torch.float32)
        if not err < tolerance("cuda"):  # NaN fails too
            raise WrongOutput(f"output differs from the default config's (relative error {err:.2e})")
        return time_ms(lambda: fn(self.q, self.k, self.v), warmup=25, rep=100)

    def _interpreted(self, fn) -> float:
        q_tiles = getattr(fn, "q_tiles", None) or fn.plan.q_tiles
        tiles = range(0, min(q_tiles, self.interpreter_tiles))
        start = time.perf_counter()
        out = run_slice(fn, self.q, self.k, self.v, tiles)
        elapsed = (time.perf_counter() - start) * 1000
        check = reference_rows(self.q, self.k, self.v, self.spec, self.mask, slice_rows(fn, tiles)).check(
            out, slice_only=True)
        if not check.ok(tolerance("cpu")):
            raise WrongOutput(f"output differs from the reference: {check.describe()}")
        return elapsed


INTERPRETER_TOKENS = 4096  # the interpreter runs the whole backward of one head: small grids only


@dataclass
class BackwardBench:
    """Times a BackwardConfig: `torch.autograd.grad` of the compiled function's output on a retained
    graph (the backward alone, no forward), after checking its gradients.

    GPU: dQ, dK and dV are compared with the untuned backward config's on the same inputs (like
    `Bench` does with outputs), then timed with do_bench. Interpreter: one head in float32, the whole
    backward, dO non-zero on a sample of rows only, so the float64 reference of those rows
    (`reference_attention_rows`) gives dQ there and all of dK and dV exactly; the time is wall-clock.
    The forward config is the untuned one (it only makes O and LSE, which the backward reads).
    """

    spec: ir.Spec
    mask: str
    problem: Problem
    device: Device
    rows: int = 24

    def __post_init__(self):
        from maskdsl.autotune.policy import ranked_backward_default, ranked_default
        from maskdsl.codegen.build import compile_attention

        mdef = self.spec.mask(self.mask)
        tokens = mdef.layout.tokens
        self.forward = ranked_default(mdef, self.problem.head_dim)
        self.compile = compile_attention
        where = "cpu" if self.device.interpreted else "cuda"
        if self.device.interpreted and tokens > INTERPRETER_TOKENS:
            raise ValueError(f"mask {self.mask!r} has {tokens:,} tokens: the interpreter runs the whole backward, "
                             f"so backward tuning without a GPU takes grids of at most {INTERPRETER_TOKENS:,} "
                             "tokens; hint: tune on a GPU")
        problem = self.problem.interpreter_slice() if self.device.interpreted else self.problem
        self.q, self.k, self.v = make_inputs(problem, tokens, where)
        gen = torch.Generator(device=where).manual_seed(1)
        self.dout = torch.randn(self.q.shape, generator=gen, device=where, dtype=self.q.dtype)
        if self.device.interpreted:
            from maskdsl.harness.measure import sample_rows

            self.sample = sample_rows(tokens, self.rows, seed=2)
            keep = torch.zeros(tokens, dtype=torch.bool)
            keep[self.sample] = True
            self.dout[:, :, ~keep] = 0
            self.expected = self._reference()
        else:
            default = ranked_backward_default(mdef, self.problem.head_dim)
            _, self.expected = self._grads(default)

    def _grads(self, config):
        leaves = [t.detach().clone().requires_grad_() for t in (self.q, self.k, self.v)]
        out = self.compile(self.spec, self.mask, self.forward, config)(*leaves)
        return (leaves, out), torch.autograd.grad(out, leaves, self.dout, retain_graph=True)

    def _reference(self):
        from maskdsl.harness.reference import reference_attention_rows

        leaves = [t.detach().to(torch.float64).requires_grad_() for t in (self.q, self.k, self.v)]
        out = reference_attention_rows(*leaves, self.spec, self.mask, self.sample)
        dq, dk, dv = torch.autograd.grad(out, leaves, self.dout[:, :, self.sample].to(torch.float64))
        return dq[:, :, self.sample], dk, dv

    def time_ms(self, config) -> float:
        start = time.perf_counter()
        (leaves, out), grads = self._grads(config)
        elapsed = (time.perf_counter() - start) * 1000
        if self.device.interpreted:
            grads = (grads[0][:, :, self.sample], grads[1], grads[2])
        tol = tolerance(self.q.device)
        for name, got, want in zip(("dQ", "dK", "dV"), grads, self.expected):
            err = relative_error(got, want)
            if not err < tol:  # NaN fails too
                what = "the float64 reference" if self.device.interpreted else "the untuned backward config's"
                raise WrongOutput(f"{name} differs from {what} (relative error {err:.2e})")
        if self.device.interpreted:
            return elapsed
        return time_ms(lambda: torch.autograd.grad(out, leaves, self.dout, retain_graph=True), warmup=25, rep=100)
