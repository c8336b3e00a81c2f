"""Serve a model trained with a maskdsl mask: prefill with the training kernel, then decode step by step.

The mask is StreamingLLM's (a causal sliding window plus sink tokens, kept causal). The prompt's
tokens go through the compiled attention (the kernel training used) as one segment of the grid, their
keys and values fill a KV cache (contiguous, or a pool of shuffled pages with --paged), and then each
step appends the next --q-len tokens' keys and values to the cache and runs `fn.decode` on them. Every
output (the prefill's and each step's) is checked against the float64 reference of the whole sequence.
Random tensors stand in for a model's projections: what is shown is the attention's serving path.

    python examples/serve_decode.py                     # a GPU: 32k-token grid, 8k prompt, 64 steps, GQA 32/8
    python examples/serve_decode.py --paged --q-len 4   # paged cache, 4 new tokens per step
    python examples/serve_decode.py --device cpu        # no GPU: a small size through Triton's interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout runs without installing

import torch  # noqa: E402

GPU = dict(tokens=32768, window=4096, sinks=4, prompt=8192, steps=64, heads=32, kv_heads=8, dim=128, batch=2)
CPU = dict(tokens=512, window=48, sinks=4, prompt=256, steps=6, heads=4, kv_heads=2, dim=16, batch=2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--q-len", type=int, default=1, help="new tokens per sequence and step (1 to 16)")
    ap.add_argument("--steps", type=int, help="decode steps (default: 64 on a GPU, 6 on the CPU)")
    ap.add_argument("--paged", action="store_true", help="a paged cache (page size 16 on the CPU, 256 on a GPU)")
    args = ap.parse_args()
    cpu = args.device == "cpu"
    if cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import maskdsl
    from maskdsl.harness.measure import relative_error, tolerance
    from maskdsl.harness.reference import reference_attention_rows

    size = dict(CPU if cpu else GPU)
    if args.steps:
        size["steps"] = args.steps
    dtype = torch.float32 if cpu else torch.bfloat16
    spec = maskdsl.parse(
        f"layout seq = grid({size['tokens']})\n"
        f"mask stream = (sliding_window({size['window']}, causal=true) | sink({size['sinks']})) & causal\n"
        f"attention main(mask=stream, heads={size['heads']}, kv_heads={size['kv_heads']}, head_dim={size['dim']})\n")
    fn = maskdsl.compile(spec, "stream")
    b, h, hk, d, n, prompt = (size[k] for k in ("batch", "heads", "kv_heads", "dim", "tokens", "prompt"))
    gen = torch.Generator(device=args.device).manual_seed(0)
    q, k, v = (torch.randn(b, heads, n, d, generator=gen, device=args.device, dtype=dtype)
               for heads in (h, hk, hk))
    tol = tolerance(args.device)

    def check(what, out, rows):
        ref = reference_attention_rows(q, k, v, spec, "stream", rows)
        err = relative_error(out, ref)
        print(f"{what}: relative error vs float64 reference {err:.2e}")
        if not err < tol:
            raise SystemExit(f"{what} does not match the reference (tolerance {tol})")

    # prefill: the prompt's queries over the prompt's keys, on the training kernel (a segment of the grid:
    # a causal mask's prompt rows see only prompt keys, so this is their attention on the whole sequence)
    out = torch.empty_like(q[:, :, :prompt])
    lse = torch.empty(out.shape[:3], device=args.device, dtype=torch.float32)
    prompt_qkv = (x[:, :, :prompt].contiguous() for x in (q, k, v))
    fn.launch_segment(*prompt_qkv, d ** -0.5, out, lse, (0, prompt), (0, prompt))
    rows = torch.cat([torch.arange(8), torch.arange(prompt - 8, prompt)])  # the sinks' rows and the prompt's last
    check(f"prefill of {prompt} tokens (rows {rows.tolist()})", out[:, :, rows.to(out.device)], rows)

    # the cache, filled with the prompt's keys and values
    if args.paged:
        page = 16 if cpu else 256
        pages = -(-n // page)
        table = torch.randperm(b * pages, generator=gen, device=args.device).view(b, pages).to(torch.int32)
        k_cache = torch.zeros(b * pages, hk, page, d, device=args.device, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
    else:
        table = None
        k_cache = torch.zeros(b, hk, n, d, device=args.device, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)

    def append(start, stop):
        if table is None:
            k_cache[:, :, start:stop], v_cache[:, :, start:stop] = k[:, :, start:stop], v[:, :, start:stop]
            return
        for pos in range(start, stop):
            slot = table[:, pos // page].long()
            k_cache[slot, :, pos % page], v_cache[slot, :, pos % page] = k[:, :, pos], v[:, :, pos]

    append(0, prompt)
    length = prompt
    for step in range(size["steps"]):
        append(length, length + args.q_len)
        length += args.q_len
        lens = torch.full((b,), length, dtype=torch.int32, device=args.device)
        got = fn.decode(q[:, :, length - args.q_len:length], k_cache, v_cache, lens, table)
        check(f"step {step}: tokens {length - args.q_len}..{length - 1}", got, torch.arange(length - args.q_len, length))
    return 0


if __name__ == "__main__":
    sys.exit(main())
