"""Train one transformer block over a 3-D token grid with a GNA mask: maskdsl vs FlexAttention.

Both runs start from the same weights and see the same batches; only the attention differs (the
same mask: maskdsl's compiled kernels, or FlexAttention with a BlockMask from the same analysis).
The synthetic task is local: predict a fixed random mix of each token's grid neighbourhood, which
the masked attention can express. Loss curves go to JSON and a PNG.

    python examples/train_video_block.py --steps 300 --device cuda
    python examples/train_video_block.py --steps 3 --device cpu     # tiny, Triton's interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

GPU_PROBLEM = dict(grid=(8, 16, 16), window=(5, 8, 8), stride=(1, 4, 4), dim=256, heads=4, batch=4)
CPU_PROBLEM = dict(grid=(2, 4, 8), window=(2, 3, 4), stride=(1, 1, 2), dim=32, heads=2, batch=2)


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


def train(model, target, p, steps, lr, device, seed=1, label=""):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = 1
    for n in p["grid"]:
        tokens *= n
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        x = torch.randn(p["batch"], tokens, p["dim"], device=device, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), target(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"  {label:8s} step {step:4d} loss {losses[-1]:.5f}", flush=True)
    return losses, time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", default="train_video_block_out", help="folder for losses.json and losses.png")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--no-flex", action="store_true", help="train only with maskdsl")
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

    p = GPU_PROBLEM if device != "cpu" else CPU_PROBLEM
    spec = maskdsl.parse(spec_text(p))
    mask = spec.mask("gna")
    torch.manual_seed(0)
    ours = make_block(MaskedAttention(spec, "gna"), p["dim"], p["heads"]).to(device)
    runs = {"maskdsl": ours}
    if not args.no_flex:
        if device == "cpu":
            # FlexAttention has no CPU backward: on the CPU the comparison is dense SDPA with the same
            # boolean mask (materialized: fine for the tiny CPU grid only)
            name, other = "sdpa_masked", DenseMasked(maskdsl.reference_mask(spec, "gna").to(device))
        else:
            name, other = "flex", FlexRunner(mask, (2, 8, 8), device)
        twin = make_block(other, p["dim"], p["heads"]).to(device)
        twin.load_state_dict(ours.state_dict())  # the same initial weights
        runs[name] = twin
    target = make_task(p, device)
    result = {"spec": spec_text(p), "problem": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
              "device": device, "steps": args.steps, "lr": args.lr, "losses": {}, "seconds": {}}
    for name, model in runs.items():
        losses, seconds = train(model, target, p, args.steps, args.lr, device, label=name)
        result["losses"][name] = losses
        result["seconds"][name] = seconds
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
