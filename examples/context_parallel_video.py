"""The 3-D GNA video case on N GPUs: the grid stretched along time to N times the frames, one chunk per GPU.

Weak scaling: each GPU holds as many frames as the single-GPU case, receives only the halo its
queries attend (maskdsl.distributed), and should take about the single-GPU case's time.

    torchrun --nproc-per-node 4 examples/context_parallel_video.py            # 120x48x80 on 4 GPUs (NCCL)
    python examples/context_parallel_video.py --emulate 4                      # one GPU: each rank's share in turn
    torchrun --nproc-per-node 2 examples/context_parallel_video.py --device cpu  # tiny, gloo + the interpreter

Prints (and with --json writes) per-rank forward and forward+backward times, the single-GPU time of
the original case, the weak-scaling ratio, and the halo bytes received against the plan's prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout runs without installing

GPU = dict(frames=30, inner=(48, 80), window=(15, 24, 40), stride=(2, 8, 8), heads=24, dim=128, tile=(2, 8, 8))
CPU = dict(frames=4, inner=(3, 8), window=(3, 3, 5), stride=(1, 1, 2), heads=2, dim=16, tile=(2, 2, 8))


def spec_text(p, frames: int) -> str:
    t = lambda xs: "(" + ", ".join(map(str, xs)) + ")"  # noqa: E731
    return (f"layout video = grid{t((frames, *p['inner']))}\n"
            f"mask gna = neighborhood(window={t(p['window'])}, stride={t(p['stride'])}) on video\n"
            f"attention main(mask=gna, heads={p['heads']}, head_dim={p['dim']}, dtype=bf16)\n")


def timed(fn, device: str, reps: int) -> float:
    """Median milliseconds of `fn()` (events on the GPU, wall clock on the CPU)."""
    import torch

    times = []
    for _ in range(reps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times = sorted(times[2:])
    return times[len(times) // 2]


def config(p):
    from maskdsl.codegen.config import BackwardConfig, KernelConfig

    tile = tuple(p["tile"])
    cfg = KernelConfig(tile, tile, 8 if p["dim"] >= 128 else 4, 3)
    return cfg, BackwardConfig(KernelConfig((1, *tile[1:]), (1, *tile[1:]), 4, 2), KernelConfig(tile, (1, *tile[1:]), 8, 2))


def run_distributed(args, p) -> dict:
    import torch
    import torch.distributed as dist

    import maskdsl
    from maskdsl.distributed import ContextParallelAttention

    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg, bcfg = config(p)
    spec = maskdsl.parse(spec_text(p, p["frames"] * world))
    attn = ContextParallelAttention(spec, "gna", config=cfg, backward_config=bcfg)
    rows = attn.local_rows()
    gen = torch.Generator(device).manual_seed(rank)
    q, k, v, dout = (torch.randn(1, p["heads"], rows, p["dim"], device=device, dtype=dtype, generator=gen)
                     for _ in range(4))
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    fwd = timed(lambda: attn(q, k, v), device, args.reps)
    got = attn.received_bytes
    want = attn.plan.received_bytes(rank, p["dim"], p["heads"], 1, q.element_size())

    def train():
        attn(q, k, v).backward(dout)

    both = timed(train, device, args.reps)
    single = {}
    if rank == 0:  # the original case on one GPU, for the weak-scaling ratio
        one = maskdsl.compile(maskdsl.parse(spec_text(p, p["frames"])), "gna", cfg, bcfg)
        L = one.mask.layout.tokens
        q1, k1, v1, d1 = (torch.randn(1, p["heads"], L, p["dim"], device=device, dtype=dtype) for _ in range(4))
        for t in (q1, k1, v1):
            t.requires_grad_(True)
        single = {"forward_ms": timed(lambda: one(q1, k1, v1), device, args.reps),
                  "fwd_bwd_ms": timed(lambda: one(q1, k1, v1).backward(d1), device, args.reps)}
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"rank": rank, "chunks": attn.plan.chunks[rank], "forward_ms": fwd,
                                      "fwd_bwd_ms": both, "received_bytes": got, "predicted_bytes": want})
    dist.destroy_process_group()
    return {"ranks": world, "per_rank": per_rank, "single_gpu": single}


def run_emulated(args, p) -> dict:
    """Every rank's share on this one GPU in turn (no communication), against the original case."""
    import torch
    import triton

    import maskdsl
    from maskdsl.distributed import emulate_rank, plan_for

    world = args.emulate
    cfg, bcfg = config(p)
    fn = maskdsl.compile(maskdsl.parse(spec_text(p, p["frames"] * world)), "gna", cfg, bcfg)
    one = maskdsl.compile(maskdsl.parse(spec_text(p, p["frames"])), "gna", cfg, bcfg)
    dtype = torch.bfloat16
    L = fn.mask.layout.tokens
    q, k, v, dout = (torch.randn(1, p["heads"], L, p["dim"], device="cuda", dtype=dtype) for _ in range(4))
    scale = p["dim"] ** -0.5
    bench = lambda f: triton.testing.do_bench(f, warmup=5, rep=50, return_mode="median")  # noqa: E731
    whole = fn(q, k, v)  # the whole stretched grid on one GPU: each rank's rows must equal it
    per_rank = []
    modes = {"both": (True, False), "yes": (True,), "no": (False,)}[args.overlap]
    for overlap, r in ((o, r) for o in modes for r in range(world)):
        plan = plan_for(fn, world, overlap=overlap)
        n = plan.inner
        mine = emulate_rank(fn, plan, r, q, k, v, scale)
        theirs = torch.cat([whole[:, :, a * n:b * n] for a, b in plan.chunks[r]], dim=2)
        err = (mine.float() - theirs.float()).abs().max().item()
        if not err < 2e-2 or torch.isnan(mine).any():
            raise SystemExit(f"rank {r}: its share differs from the whole-grid kernel by {err:.3e}")
        per_rank.append({"rank": r, "overlap": overlap, "chunks": plan.chunks[r], "max_abs_diff_vs_whole": err,
                         "forward_ms": bench(lambda: emulate_rank(fn, plan, r, q, k, v, scale)),
                         "fwd_bwd_ms": bench(lambda: emulate_rank(fn, plan, r, q, k, v, scale, dout)),
                         "predicted_bytes": plan.received_bytes(r, p["dim"], p["heads"], 1, 2)})
    L1 = one.mask.layout.tokens
    q1, k1, v1, d1 = (t[:, :, :L1].contiguous() for t in (q, k, v, dout))
    single = {"forward_ms": bench(lambda: one(q1, k1, v1)),
              "fwd_bwd_ms": bench(lambda: _fwd_bwd(one, q1, k1, v1, d1))}
    return {"ranks": world, "emulated": True, "per_rank": per_rank, "single_gpu": single}


def _fwd_bwd(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    fn(q, k, v).backward(dout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--emulate", type=int, help="one GPU, no process group: run this many ranks' shares in turn")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--overlap", choices=("both", "yes", "no"), default="both",
                    help="with --emulate: the schedules to time (own frames first with halos overlapped, "
                         "or halo and own frames joined into one call)")
    ap.add_argument("--json", help="write the results here (rank 0)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.reps = min(args.reps, 1)
    p = GPU if args.device == "cuda" else CPU
    result = run_emulated(args, p) if args.emulate else run_distributed(args, p)
    if os.environ.get("RANK", "0") != "0" and not args.emulate:
        return 0
    single = result["single_gpu"]
    for row in result["per_rank"]:
        extra = ""
        if single:
            extra = (f"  weak scaling fwd {single['forward_ms'] / row['forward_ms']:.1%}, "
                     f"fwd+bwd {single['fwd_bwd_ms'] / row['fwd_bwd_ms']:.1%}")
        got = row.get("received_bytes")
        mode = {True: " (overlap)", False: " (joined)"}.get(row.get("overlap"), "")
        print(f"rank {row['rank']}{mode} frames {row['chunks']}: forward {row['forward_ms']:.3f} ms, fwd+bwd "
              f"{row['fwd_bwd_ms']:.3f} ms, halo {row['predicted_bytes'] / 1e6:.1f} MB predicted"
              + ("" if got is None else f", {got / 1e6:.1f} MB received") + extra)
    if single:
        print(f"one GPU, {p['frames']} frames: forward {single['forward_ms']:.3f} ms, "
              f"fwd+bwd {single['fwd_bwd_ms']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
