"""Compile the decode kernels (codegen.decode.kernel) for sm_90 without a GPU; print ptxas' spills as JSON.

A separate process for the reason tests/gluon_compile.py gives (TRITON_INTERPRET binds Triton's builtins
to the interpreter at import). The real host path binds the arguments: `CompiledDecode.launch` with
the kernels swapped for their `warmup`, so what compiles is what a GPU call would launch.

Usage: python tests/decode_compile.py HEAD_DIM {contiguous|paged} Q_LEN SPLITS [topk]
    (topk: an NSA-style mask, top-k blocks with a causal window and sinks, instead of the window and sinks)
"""

import json
import re
import sys
from pathlib import Path

import torch
from triton.runtime import driver

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gluon_compile import Sm90Driver, ptxas  # noqa: E402

import maskdsl  # noqa: E402
from maskdsl.codegen.decode import attention, kernel  # noqa: E402
from maskdsl.codegen.decode.checks import CacheShape, value_problem  # noqa: E402


MASKS = {"window": "(sliding_window(1024, causal=true) | sink(4)) & causal",
         "topk": "(topk(k=8, block=64) | sliding_window(256, causal=true) | sink(4)) & causal"}


def main(head_dim: int, layout: str, q_len: int, splits: int, mask: str = "window") -> dict:
    spec = maskdsl.parse(f"layout seq = grid(4096)\nmask m = {MASKS[mask]}\n")
    fn = attention.CompiledDecode(spec.mask("m"))
    batch, heads, kv_heads, dtype = 2, 8, 1, torch.bfloat16
    q = torch.zeros(batch, heads, q_len, head_dim, dtype=dtype)
    if layout == "paged":
        kc = torch.zeros(64, kv_heads, 64, head_dim, dtype=dtype)
        table = torch.zeros(batch, 64, dtype=torch.int32)
        shape = CacheShape(batch, heads, kv_heads, q_len, head_dim, 4096, 64, 64)
    else:
        kc = torch.zeros(batch, kv_heads, 4096, head_dim, dtype=dtype)
        table = None
        shape = CacheShape(batch, heads, kv_heads, q_len, head_dim, 4096)
    lens = torch.zeros(batch, dtype=torch.int32)
    compiled = {}

    class Warm:
        def __init__(self, name):
            self.jit = saved[name]
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: compiled.__setitem__(self.name, self.jit.warmup(*args, grid=grid, **kwargs))

    driver.set_active(Sm90Driver())
    fn._on[torch.device("cpu")] = (torch.zeros(4096, 4, dtype=torch.int32), torch.zeros(4096, dtype=torch.int32))
    names = ("decode_split", "decode_merge", "decode_check")
    saved = {name: getattr(kernel, name) for name in names}
    for name in names:
        setattr(kernel, name, Warm(name))
    try:
        out = torch.empty_like(q)
        fn.launch(shape, q, kc, kc, lens, table, 0.1, out, torch.empty(q.shape[:3]), splits)
        value_problem(shape, lens, table, torch.zeros(4096, dtype=torch.int32), 4096)  # binds the value check
    finally:
        for name, jit in saved.items():
            setattr(kernel, name, jit)
    result = {}
    for name, k in compiled.items():
        report, _ = ptxas(k.asm["ptx"])
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        result[name] = {"spills": [int(spills[1]), int(spills[2])] if spills else None, "shared": k.metadata.shared}
    return result


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])))
