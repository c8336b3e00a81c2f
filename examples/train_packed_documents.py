"""Train a small language model on packed sequences: documents of random lengths, new ones every step.

Each step packs documents into one sequence of fixed length (a data loader's packing; the last document
is cut to fit) and passes their offsets to the attention: `document & causal` (or `document & (causal |
prefix)` with --prefix-lm), so no token attends across a document boundary and nothing recompiles when
the lengths change. Every document restarts a synthetic language: a random walk over the vocabulary
with a per-document step, which the model can only predict from its own document's earlier tokens.
The last line evaluates a held-out packed sequence with its documents, and (causal masks) the same
model with the documents merged into one sequence, for comparison.

    python examples/train_packed_documents.py --steps 300                 # GPU: 8k tokens, 4 layers
    python examples/train_packed_documents.py --cpu-smoke                 # Triton's interpreter, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import random

GPU = dict(length=8192, low=128, high=2048, vocab=512, dim=512, heads=8, layers=4, steps=300, lr=3e-4)
CPU = dict(length=64, low=4, high=24, vocab=32, dim=32, heads=2, layers=1, steps=3, lr=1e-2)


def build(p, device, dtype):
    import torch

    import maskdsl

    mask = "document & (causal | prefix)" if p["prefix_lm"] else "document & causal"
    spec = maskdsl.parse(f"layout seq = grid({p['length']})\nmask m = {mask}\n")
    if device == "cpu":
        from maskdsl.codegen.build import compile_attention
        from maskdsl.codegen.documents.compiled import DocumentConfig

        attend = compile_attention(spec, "m", DocumentConfig((16, 16, 4, 1), (16, 16, 4, 1), (16, 16, 4, 1)))
    else:
        attend = maskdsl.compile(spec, "m")
    dim, heads = p["dim"], p["heads"]

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.proj = torch.nn.Linear(dim, dim)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                           torch.nn.Linear(4 * dim, dim))

        def forward(self, x, documents, prefix):
            n = x.shape[1]
            q, k, v = self.qkv(self.norm1(x)).view(1, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            a = attend(q.contiguous(), k.contiguous(), v.contiguous(), documents=documents, prefix=prefix,
                       check_documents=False)  # the packer below makes valid offsets; no sync per layer
            x = x + self.proj(a.transpose(1, 2).reshape(1, n, dim))
            return x + self.mlp(self.norm2(x))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(p["vocab"], dim)
            self.pos = torch.nn.Embedding(p["length"], dim)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(p["layers"]))
            self.head = torch.nn.Linear(dim, p["vocab"])

        def forward(self, tokens, positions, documents, prefix):
            x = self.embed(tokens) + self.pos(positions)
            for block in self.blocks:
                x = block(x, documents, prefix)
            return self.head(x)

    return Model().to(device=device, dtype=dtype)


def pack(p, rng: random.Random, device):
    """One packed sequence: tokens, each token's position in its document, offsets, prefix lengths, and
    the loss mask (the first token of a document has nothing to be predicted from)."""
    import torch

    from maskdsl.spec.documents import draw_offsets

    offsets = draw_offsets(p["length"], p["low"], p["high"], rng)
    tokens, positions, first = [], [], []
    for a, b in zip(offsets, offsets[1:]):
        step, t = rng.randint(1, 5), rng.randrange(p["vocab"])
        for i in range(b - a):
            tokens.append(t)
            positions.append(i)
            first.append(i == 0)
            t = (t + step) % p["vocab"]
    prefix = [rng.randint(0, (b - a) // 2) for a, b in zip(offsets, offsets[1:])] if p["prefix_lm"] else None
    as_t = lambda xs, dt: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
    return (as_t([tokens], torch.long), as_t([positions], torch.long), as_t(offsets, torch.int32),
            None if prefix is None else as_t(prefix, torch.int32), as_t(first, torch.bool))


def loss_of(model, batch, documents=None):
    import torch

    tokens, positions, offsets, prefix, first = batch
    logits = model(tokens, positions, offsets if documents is None else documents, prefix)
    target = tokens[0, 1:]
    keep = ~first[1:]  # predicting a document's first token from another document is not the task
    return torch.nn.functional.cross_entropy(logits[0, :-1][keep].float(), target[keep])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on Triton's interpreter (CPU)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--prefix-lm", action="store_true", help="document & (causal | prefix)")
    parser.add_argument("--json", help="write the loss curve here")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    p = dict(CPU if args.cpu_smoke else GPU, prefix_lm=args.prefix_lm)
    if args.steps:
        p["steps"] = args.steps
    device = "cpu" if args.cpu_smoke else "cuda"
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    torch.manual_seed(0)
    rng = random.Random(0)
    model = build(p, device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"])
    losses = []
    for step in range(p["steps"]):
        loss = loss_of(model, pack(p, rng, device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == p["steps"] - 1:
            print(f"step {step}: loss {losses[-1]:.4f}", flush=True)
    with torch.no_grad():
        batch = pack(p, rng, device)
        merged = torch.tensor([0, p["length"]], dtype=torch.int32, device=device)
        held_out = loss_of(model, batch).item()
        leaked = loss_of(model, batch, documents=merged).item() if not p["prefix_lm"] else None
    print(f"held-out loss {held_out:.4f} with the documents; {leaked if leaked is None else round(leaked, 4)} "
          "with them merged into one")
    result = {"problem": p, "losses": losses, "held_out": held_out, "merged": leaked}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
