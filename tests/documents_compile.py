"""Bind and compile the document kernels for sm_90 without a GPU, over many offsets: JIT cache sizes as JSON.

A separate process (as tests/gluon_compile.py, whose driver stub it uses) because TRITON_INTERPRET=1,
set by the test suite at import, binds Triton's builtins to the interpreter. Each draw of offsets goes
through exactly what a call does (`metadata`, `CompiledDocumentAttention.kernel_args`) and then the real
JIT's binder (`warmup`), which compiles on a new specialisation key and otherwise finds the cached kernel.

Usage: python tests/documents_compile.py CALLS [--mask INNER] [LENGTH ...]
  (INNER: what `document & (...)` holds; default a 4-term union, the kernels' general walk; one term,
  e.g. `causal`, takes their head/full/tail loops)
  prints {"LENGTH": {"forward": n, "delta": n, "dkdv": n, "dq": n}, ...}: kernels in each JIT cache after
  CALLS draws at each length in turn (cumulative: a new length is a new spec, and may compile).
"""

import json
import random
import sys

import torch
from triton.runtime import driver

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gluon_compile import Sm90Driver  # noqa: E402

import maskdsl  # noqa: E402
from maskdsl.codegen.build import compile_attention  # noqa: E402
from maskdsl.codegen.documents.compiled import metadata  # noqa: E402

MASK = "sliding_window(4096, causal=true) | (sink(4) & causal) | prefix"


def bind(fn, length: int, rng: random.Random, head_dim: int = 128) -> dict:
    """One call's launches, bound and (on a new key) compiled; the kernels' cache sizes after it."""
    cuts = sorted(rng.randint(0, length) for _ in range(rng.randint(0, 40)))
    offsets = torch.tensor([0, *cuts, length], dtype=torch.int32)
    prefix = torch.tensor([rng.randint(0, b - a) for a, b in zip(offsets.tolist(), offsets.tolist()[1:])],
                          dtype=torch.int32) if fn.form.uses_prefix else None
    q = torch.empty(1, 4, length, head_dim, dtype=torch.bfloat16)
    k, v = (torch.empty(1, 2, length, head_dim, dtype=torch.bfloat16) for _ in range(2))
    out, dout, dq = (torch.empty_like(q) for _ in range(3))
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    lse, delta = (torch.empty(q.shape[:3]) for _ in range(2))
    meta = metadata(offsets, prefix, length)
    sizes = {}
    for kind in ("forward", "delta", "dkdv", "dq"):
        kernel, grid, args, kwargs = fn.kernel_args(kind, q, k, v, 0.088, meta, out=out, lse=lse, dout=dout,
                                                    delta=delta, dq=dq, dk=dk, dv=dv)
        kernel.warmup(*args, grid=grid, **kwargs)
        sizes[kind] = len(kernel.device_caches[0][0])
    return sizes


def main(calls: int, lengths: list[int], inner: str = MASK) -> dict:
    driver.set_active(Sm90Driver())
    rng = random.Random(0)
    report = {}
    for length in lengths:
        spec = maskdsl.parse(f"layout s = grid({length})\nmask m = document & ({inner})\n")
        fn = compile_attention(spec, "m")
        for _ in range(calls):
            sizes = bind(fn, length, rng)
        report[str(length)] = sizes
    return report


if __name__ == "__main__":
    argv = sys.argv[2:]
    inner = MASK
    if argv[:1] == ["--mask"]:
        inner, argv = argv[1], argv[2:]
    print(json.dumps(main(int(sys.argv[1]), [int(x) for x in argv] or [32768], inner)))
