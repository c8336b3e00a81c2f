"""Warm host time per call of every kernel family (GPU): how long the Python side of one call takes
once everything is compiled and cached, the number a decode step or a small layer pays on top of the
kernel. Each call is timed alone with time.perf_counter (no synchronisation inside the loop), on
problems small enough that the GPU never holds the host back; the median over many calls is reported.

Usage: python bench/scripts/host_time.py [OUT.json] [--calls N]
"""

from __future__ import annotations

import json
import sys

import torch

import maskdsl
from maskdsl.harness.measure import host_us

CASES = [  # (name, spec text, mask): each kernel family the dispatch can pick
    ("gluon_fwd_1d", "layout s = grid(4096)\nmask m = sliding_window(513, causal=true)\n"
                     "attention a(mask=m, heads=1, head_dim=128, dtype=bf16)", "m"),
    ("gluon_fwd_3d", "layout v = grid(8, 16, 16)\nmask m = neighborhood(window=(4, 8, 8), stride=(1, 8, 8))\n"
                     "attention a(mask=m, heads=1, head_dim=128, dtype=bf16)", "m"),
    ("triton_fwd_2d_dilated", "layout g = grid(48, 48)\nmask m = neighborhood(window=7, dilation=2)\n"
                              "attention a(mask=m, heads=1, head_dim=128, dtype=bf16)", "m"),
    ("topk_fwd", "layout s = grid(4096)\nmask m = topk(4, 128)\nattention a(mask=m, heads=1, head_dim=128, dtype=bf16)",
     "m"),
]


def _median_us(fn, calls: int) -> float:
    return host_us(fn, calls=calls, sync=torch.cuda.synchronize, every=50)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    calls = 400
    if "--calls" in argv:
        i = argv.index("--calls")
        calls = int(argv[i + 1])
        del argv[i:i + 2]
    out_path = argv[0] if argv else None
    rows = []
    for name, text, mask in CASES:
        row = {"case": name}
        try:
            spec = maskdsl.parse(text)
            fn = maskdsl.compile(spec, mask)
            tokens = spec.mask(mask).layout.tokens
            q, k, v = (torch.randn(1, 1, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:3], device="cuda", dtype=torch.float32)
            from maskdsl.codegen import dispatch

            row["forward"] = (dispatch.choose_forward(fn, q, k, v, out, lse) if not spec.mask(mask).dynamic
                              else "topk")
            row["call_us"] = _median_us(lambda: fn(q, k, v), calls)  # the op, as users call it
            row["launch_us"] = _median_us(lambda: fn.launch(q, k, v, 0.088, out, lse), calls)
            if not spec.mask(mask).dynamic:
                o, l = fn(q, k, v, return_lse=True)
                do = torch.randn_like(q)
                grads = [torch.empty_like(t) for t in (q, k, v)]
                row["backward"] = fn.backward_config.key()
                row["backward_launch_us"] = _median_us(
                    lambda: fn.launch_backward(q, k, v, o, l, do, 0.088, *grads), calls)
            qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
            row["train_step_us"] = _median_us(lambda: torch.autograd.grad(fn(qs, ks, vs).sum(), (qs, ks, vs)), calls // 4)
        except Exception as exc:  # one family failing must not hide the others
            row["failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "calls": calls, "rows": rows}
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
