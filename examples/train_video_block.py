"""Train one transformer block over a 3-D token grid with a GNA mask: maskdsl vs FlexAttention.

Both runs start from the same weights and see the same batches; only the attention differs (the
same mask: maskdsl's compiled kernels, or FlexAttention with a BlockMask from the same analysis).
The synthetic task is local: predict a fixed random mix of each token's grid neighbourhood, which
the masked attention can express. Loss curves go to JSON and a PNG.

    python examples/train_video_block.py --steps 300 --device cuda   # a video DiT block, whole-step times
    python examples/train_video_block.py --steps 3 --device cpu      # tiny, Triton's interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROBLEMS = {
    # a video DiT block's shape: 16 x 32 x 32 latent tokens, head_dim 128, a GNA window (the default on a GPU)
    "video": dict(grid=(16, 32, 32), window=(8, 16, 16), stride=(2, 8, 8), dim=1024, heads=8, batch=2),
    "small": dict(grid=(8, 16, 16), window=(5, 8, 8), stride=(1, 4, 4), dim=256, heads=4, batch=4),
    "cpu": dict(grid=(2, 4, 8), window=(2, 3, 4), stride=(1, 1, 2), dim=32, heads=2, batch=2),
}
WARMUP_STEPS = 3  # compiles and autotuning happen here; step times are the median of the steps after them


def spec_text(p) -> str:
    t = lambda xs: "(" + ", ".join(map(str, xs)) + ")"  # noqa: E731
    return (f"layout video = grid{t(p['grid'])}\n"
            f"mask gna = neighborhood(window={t(p['window'])}, stride={t(p['stride'])}) on video\n")


def make_block(attention, dim: int, heads: int):
    """Pre-norm attention + MLP; torch is imported here, after main() set TRITON_INTERPRET on the CPU."""
    import torch

    class TransformerBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.proj = torch.nn.Linear(dim, dim)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
            self.attention = attention

        def forward(self, x):  # x: [B, L, dim], tokens in row-major grid order
            b, n, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            a = self.attention(q.contiguous(), k.contiguous(), v.contiguous())
            x = x + self.proj(a.transpose(1, 2).reshape(b, n, dim))
            return x + self.mlp(self.norm2(x))

    return TransformerBlock()


class DenseMasked:
    """softmax attention with a materialized boolean mask (small grids only)."""

    def __init__(self, mask):
        self.mask = mask

    def __call__(self, q, k, v):
        import torch

        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def make_task(p, device, seed=0):
    """A fixed target map: each token's output mixes its 3x3x3 grid neighbourhood with random weights."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dim = p["dim"]
    mix = (torch.randn(dim, dim, generator=gen) / dim ** 0.5).to(device)
    kernel = torch.rand(3, 3, 3, generator=gen).to(device)
    kernel /= kernel.sum()

    def target(x):
        b = x.shape[0]
        grid = x.view(b, *p["grid"], dim).permute(0, 4, 1, 2, 3).reshape(b * dim, 1, *p["grid"])
        smooth = torch.nn.functional.conv3d(grid, kernel.view(1, 1, 3, 3, 3), padding=1)
        smooth = smooth.view(b, dim, *p["grid"]).permute(0, 2, 3, 4, 1).reshape(b, -1, dim)
        return torch.tanh(smooth @ mix)

    return target


def train(model, target, p, steps, lr, device, seed=1, label="", order=None):
    """Train `steps` steps; returns (losses, seconds, median step ms after WARMUP_STEPS). A step is the whole
    of it: the model's forward (attention, norms, MLP), the loss, the backward and the optimizer.
    `order`: the token order the model runs in (a permutation of the grid's row-major tokens; the block
    is per token but for its attention, so the loss is the same whatever the order)."""
    import statistics

    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = 1
    for n in p["grid"]:
        tokens *= n
    losses, step_s = [], []
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    start = time.perf_counter()
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        x = torch.randn(p["batch"], tokens, p["dim"], device=device, generator=gen)
        # bf16 autocast on a GPU, as video models train; float32 on the CPU (the interpreter)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device != "cpu"):
            y = target(x)
            if order is not None:
                x, y = x[:, order], y[:, order]
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        step_s.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"  {label:8s} step {step:4d} loss {losses[-1]:.5f}", flush=True)
    timed = step_s[WARMUP_STEPS:] or step_s
    return losses, time.perf_counter() - start, statistics.median(timed) * 1e3


def attention_ms(attention, p, device) -> float:
    """Median ms of the attention alone, forward + backward, on the block's q, k, v shapes (GPU)."""
    import torch
    import triton

    tokens = 1
    for n in p["grid"]:
        tokens *= n
    shape = (p["batch"], p["heads"], tokens, p["dim"] // p["heads"])
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    do = torch.randn(shape, device=device, dtype=torch.bfloat16)

    def step():
        torch.autograd.grad(attention(q, k, v), (q, k, v), do)
    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", default="train_video_block_out", help="folder for losses.json and losses.png")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--no-flex", action="store_true", help="train only with maskdsl")
    ap.add_argument("--problem", choices=[k for k in PROBLEMS if k != "cpu"], default="video",
                    help="the block's shape on a GPU (the CPU runs a tiny one)")
    args = ap.parse_args(argv)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    import maskdsl
    from maskdsl.bench.flex import FlexRunner
    from maskdsl.nn import MaskedAttention

    p = PROBLEMS[args.problem] if device != "cpu" else PROBLEMS["cpu"]
    spec = maskdsl.parse(spec_text(p))
    mask = spec.mask("gna")
    torch.manual_seed(0)
    ours = make_block(MaskedAttention(spec, "gna"), p["dim"], p["heads"]).to(device)
    runs = {"maskdsl": ours}
    orders = {}
    if not args.no_flex:
        if device == "cpu":
            # FlexAttention has no CPU backward: on the CPU the comparison is dense SDPA with the same
            # boolean mask (materialized: fine for the tiny CPU grid only)
            name, other = "sdpa_masked", DenseMasked(maskdsl.reference_mask(spec, "gna").to(device))
        else:
            name, other = "flex", FlexRunner(mask, (2, 8, 8), device)
            if bool(other.valid.all()):
                # whole tiles: as an expert writes it, the block keeps its tokens tile-major throughout, so
                # FlexAttention's blocks are the mask's tiles and no call permutes q, k, v or the output
                orders[name], other = other.perm, other.attend_permuted
        twin = make_block(other, p["dim"], p["heads"]).to(device)
        twin.load_state_dict(ours.state_dict())  # the same initial weights
        runs[name] = twin
    target = make_task(p, device)
    result = {"spec": spec_text(p), "problem": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
              "device": device, "steps": args.steps, "lr": args.lr, "losses": {}, "seconds": {}, "step_ms": {},
              "attention_fwd_bwd_ms": {}}
    if device != "cpu":
        result["gpu"] = torch.cuda.get_device_name()
    for name, model in runs.items():
        losses, seconds, step_ms = train(model, target, p, args.steps, args.lr, device, label=name,
                                         order=orders.get(name))
        result["losses"][name] = losses
        result["seconds"][name] = seconds
        result["step_ms"][name] = step_ms
        if device != "cpu":
            result["attention_fwd_bwd_ms"][name] = attention_ms(model.attention, p, device)
    names = list(runs)
    for name in names:
        extra = f", attention fwd+bwd {result['attention_fwd_bwd_ms'][name]:.2f} ms" if device != "cpu" else ""
        print(f"{name:12s} whole training step {result['step_ms'][name]:.2f} ms (median after {WARMUP_STEPS} "
              f"warm-up steps){extra}")
    if len(names) == 2 and device != "cpu":
        result["step_speedup"] = result["step_ms"][names[1]] / result["step_ms"][names[0]]
        print(f"maskdsl's training step is {result['step_speedup']:.2f}x {names[1]}'s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "losses.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "losses.png")
    print(f"wrote {out / 'losses.json'} and {out / 'losses.png'}")
    return 0


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in result["losses"].items():
        ax.plot(losses, label=f"{name} ({result['seconds'][name]:.1f} s)")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.set_yscale("log")
    ax.set_title(f"GNA block on grid {tuple(result['problem']['grid'])}, {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout imports without installing
    sys.exit(main())
