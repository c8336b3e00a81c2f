"""Context parallelism on N GPUs, weak scaling: the grid stretched along its outermost dimension to N
times the single-GPU case, one chunk per GPU.

Each GPU holds as many frames (tokens) as the single-GPU case, receives only the halo its queries attend
(maskdsl.distributed), and should take about the single-GPU case's time. Cases: `video`, the 3-D GNA
case (15,24,40) stride (2,8,8) on 30x48x80 per GPU, 24 heads; `window1d`, a 1-D sliding window of 4096
over --frames tokens per GPU (default 131072: 1M tokens on 8 GPUs), 8 heads.

    torchrun --nproc-per-node 4 examples/context_parallel_video.py            # 120x48x80 on 4 GPUs (NCCL)
    torchrun --nproc-per-node 2 examples/context_parallel_video.py --case window1d --frames 524288
    python examples/context_parallel_video.py --emulate 4                      # one GPU: each rank's share in turn
    torchrun --nproc-per-node 2 examples/context_parallel_video.py --device cpu  # tiny, gloo + the interpreter

Prints (and with --json writes) per rank: forward and forward+backward times of both schedules (own
frames while the halo travels; halo and own frames joined), the exchange alone, the all-gather baseline
(every K/V slab gathered, then the same kernels over the whole grid's keys, dK/dV reduce-scattered back),
peak memory, the halo bytes received against the plan's prediction, and each output's largest difference
from the all-gather baseline's; rank 0 also times the original case on one GPU (the weak-scaling ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout runs without installing

CASES = {
    "video": dict(frames=30, inner=(48, 80), heads=24, dim=128, tile=(2, 8, 8),
                  mask="neighborhood(window=(15, 24, 40), stride=(2, 8, 8))"),
    "window1d": dict(frames=131072, inner=(), heads=8, dim=128, tile=(128,), kv_tile=(64,),
                     mask="sliding_window(4096)"),
}
CPU = dict(frames=4, inner=(3, 8), heads=2, dim=16, tile=(2, 2, 8),
           mask="neighborhood(window=(3, 3, 5), stride=(1, 1, 2))")


def spec_text(p, frames: int) -> str:
    t = lambda xs: "(" + ", ".join(map(str, xs)) + ")"  # noqa: E731
    return (f"layout video = grid{t((frames, *p['inner']))}\n"
            f"mask gna = {p['mask']} on video\n"
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
    """The forward and backward tiles: one 128-token tile (a 64-key tile in 1-D, the simulator's pick there);
    the backward's dK/dV pass on one frame of it (3-D) or 64 rows (1-D)."""
    from maskdsl.codegen.config import BackwardConfig, KernelConfig

    tile = tuple(p["tile"])
    kv = tuple(p.get("kv_tile", tile))
    cfg = KernelConfig(tile, kv, 8 if p["dim"] >= 128 else 4, 3)
    if len(tile) == 1:
        return cfg, BackwardConfig(KernelConfig(kv, kv, 4, 2), KernelConfig(tile, kv, 8, 2))
    return cfg, BackwardConfig(KernelConfig((1, *tile[1:]), (1, *tile[1:]), 4, 2), KernelConfig(tile, (1, *tile[1:]), 8, 2))


def peak_gb(fn, device: str) -> float | None:
    """Peak GPU memory (GB) allocated while running fn once, above what was allocated before."""
    import torch

    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


class GatherBaseline:
    """The all-gather baseline (what ring/all-gather context parallelism moves): every rank's K and V
    gathered into whole-grid tensors, then this rank's queries over all keys in one kernel call (the
    mask still skips the tiles it does not visit, so the compute is the halo version's), and in backward
    dK, dV of every key reduce-scattered back to their owners. Needs one chunk per rank (no zig-zag)."""

    def __init__(self, attn):
        self.attn = attn

    def gather(self, t):
        import torch
        import torch.distributed as dist

        world = self.attn.ranks
        flat = torch.empty((world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(flat, t.contiguous())  # ranks stacked along dim 0
        return flat.view(world, *t.shape).movedim(0, 2).reshape(t.shape[0], t.shape[1], world * t.shape[2], t.shape[3])

    def forward(self, q, k, v, scale):
        import torch

        plan, fn = self.attn.plan, self.attn.fn
        (chunk,) = plan.chunks[self.attn.rank]
        kf, vf = self.gather(k), self.gather(v)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        fn.launch_segment(q, kf, vf, scale, out, lse, q_frames=chunk, k_frames=(0, plan.shape[0]))
        return out, lse, kf, vf

    def forward_backward(self, q, k, v, dout, scale):
        import torch
        import torch.distributed as dist

        plan, fn, world = self.attn.plan, self.attn.fn, self.attn.ranks
        (chunk,) = plan.chunks[self.attn.rank]
        out, lse, kf, vf = self.forward(q, k, v, scale)
        dq, dkf, dvf = torch.empty_like(q), torch.empty_like(kf), torch.empty_like(vf)
        fn.launch_backward_segment(q, kf, vf, out, lse, dout, scale, dq, dkf, dvf, q_frames=chunk,
                                   k_frames=(0, plan.shape[0]))
        grads = []
        for g in (dkf, dvf):  # [B, H, world * L, D] -> [world, B, H, L, D], summed onto the owner's rows
            parts = g.reshape(g.shape[0], g.shape[1], world, -1, g.shape[3]).movedim(2, 0).contiguous()
            mine = torch.empty_like(parts[0])
            dist.reduce_scatter_tensor(mine, parts.flatten(0, 1))
            grads.append(mine)
        return out, dq, *grads


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
    scale = p["dim"] ** -0.5
    row = {"rank": rank}
    for overlap in (True, False):
        attn = ContextParallelAttention(spec, "gna", config=cfg, backward_config=bcfg, overlap=overlap)
        rows = attn.local_rows()
        gen = torch.Generator(device).manual_seed(rank)
        q, k, v, dout = (torch.randn(1, p["heads"], rows, p["dim"], device=device, dtype=dtype, generator=gen)
                         for _ in range(4))
        q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
        name = "overlap" if overlap else "joined"
        out = attn(q, k, v)
        base = GatherBaseline(attn)
        b_out, b_dq, b_dk, b_dv = base.forward_backward(q.detach(), k.detach(), v.detach(), dout, scale)
        out.backward(dout)
        diffs = {n: (a.float() - b.float()).abs().max().item()
                 for n, a, b in (("out", out, b_out), ("dq", q.grad, b_dq), ("dk", k.grad, b_dk), ("dv", v.grad, b_dv))}
        os.environ["MASKDSL_GLUON"] = "0"  # the same segments on the Triton template: an independent kernel
        diffs["out_vs_template"] = (attn(q, k, v).float() - out.float()).abs().max().item()
        os.environ.pop("MASKDSL_GLUON")
        if any(not d < 5e-2 for d in diffs.values()):  # NaN fails too
            raise SystemExit(f"rank {rank} ({name}): differs from the all-gather baseline: {diffs}")

        def train():
            attn(q, k, v).backward(dout)

        row[name] = {"forward_ms": timed(lambda: attn(q, k, v), device, args.reps),
                     "fwd_bwd_ms": timed(train, device, args.reps),
                     "exchange_ms": timed(lambda: attn.exchange(k.detach(), v.detach()), device, args.reps),
                     "peak_fwd_bwd_gb": peak_gb(train, device),
                     "received_bytes": attn.exchange(k.detach(), v.detach()),
                     "predicted_bytes": attn.plan.received_bytes(rank, p["dim"], p["heads"], 1, q.element_size()),
                     "max_abs_diff_vs_all_gather": diffs, "segments": len(attn.plan.segments[rank][0])}
        if overlap:
            qd, kd, vd = q.detach(), k.detach(), v.detach()
            row["chunks"] = attn.plan.chunks[rank]
            row["all_gather"] = {
                "forward_ms": timed(lambda: base.forward(qd, kd, vd, scale), device, args.reps),
                "fwd_bwd_ms": timed(lambda: base.forward_backward(qd, kd, vd, dout, scale), device, args.reps),
                "gather_ms": timed(lambda: (base.gather(kd), base.gather(vd)), device, args.reps),
                "peak_fwd_bwd_gb": peak_gb(lambda: base.forward_backward(qd, kd, vd, dout, scale), device)}
        del q, k, v, dout, out, b_out, b_dq, b_dk, b_dv
    single = {}
    if rank == 0:  # the original case on one GPU, for the weak-scaling ratio
        one = maskdsl.compile(maskdsl.parse(spec_text(p, p["frames"])), "gna", cfg, bcfg)
        L = one.mask.layout.tokens
        q1, k1, v1, d1 = (torch.randn(1, p["heads"], L, p["dim"], device=device, dtype=dtype) for _ in range(4))
        for t in (q1, k1, v1):
            t.requires_grad_(True)
        single = {"forward_ms": timed(lambda: one(q1, k1, v1), device, args.reps),
                  "fwd_bwd_ms": timed(lambda: one(q1, k1, v1).backward(d1), device, args.reps),
                  "gluon": one.gluon_blocker(q1.detach()) is None if device == "cuda" else False}
    per_rank = [None] * world
    dist.all_gather_object(per_rank, row)
    dist.destroy_process_group()
    return {"case": args.case, "ranks": world, "frames_per_rank": p["frames"], "shape": [p["frames"] * world, *p["inner"]],
            "heads": p["heads"], "head_dim": p["dim"], "config": cfg.key(), "backward_config": bcfg.key(),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "per_rank": per_rank, "single_gpu": single}


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
    ap.add_argument("--case", choices=sorted(CASES), default="video")
    ap.add_argument("--frames", type=int, help="frames (1-D: tokens) per GPU; default the case's")
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
    p = dict(CASES[args.case] if args.device == "cuda" else CPU)
    if args.frames:
        p["frames"] = args.frames
    result = run_emulated(args, p) if args.emulate else run_distributed(args, p)
    if os.environ.get("RANK", "0") != "0" and not args.emulate:
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not args.emulate:
        print_distributed(result)
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
    return 0


def print_distributed(result: dict) -> None:
    single = result["single_gpu"]
    print(f"{result['case']} {'x'.join(map(str, result['shape']))} on {result['ranks']} ranks ({result['device']}); "
          f"one GPU, {result['frames_per_rank']} frames: forward {single['forward_ms']:.3f} ms, "
          f"fwd+bwd {single['fwd_bwd_ms']:.3f} ms")
    for row in result["per_rank"]:
        for name in ("overlap", "joined", "all_gather"):
            r = row[name]
            extra = (f", exchange alone {r['exchange_ms']:.3f} ms, halo {r['received_bytes'] / 1e6:.1f} MB received "
                     f"({r['predicted_bytes'] / 1e6:.1f} predicted)" if "exchange_ms" in r
                     else f", gather alone {r['gather_ms']:.3f} ms")
            peak = "" if r["peak_fwd_bwd_gb"] is None else f", peak {r['peak_fwd_bwd_gb']:.2f} GB"
            print(f"rank {row['rank']} {name:<10} forward {r['forward_ms']:.3f} ms "
                  f"({single['forward_ms'] / r['forward_ms']:.1%}), fwd+bwd {r['fwd_bwd_ms']:.3f} ms "
                  f"({single['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1%}){extra}{peak}")


if __name__ == "__main__":
    sys.exit(main())
