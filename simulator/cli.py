"""`maskdsl simulate`: the simulator from the command line (registered by maskdsl.cli).

    maskdsl simulate FILE --mask NAME [--q-tile 2,8,8 --kv-tile 2,8,8] [--no-permute] [--warps 8 --stages 3]
                     [--backward-config KEY] [--sweep [--limit N]] [--suggest] [--json] [--gpu NAME] [--costs FILE]
    maskdsl simulate --calibrate-backward TRAIN.json [...] [--no-recorded] [--out FILE] [--gpu NAME] [--costs FILE]

Without tiles it simulates the best 128-token tile (``simulator.ranking.default_config``). For a static
mask it also predicts the backward and forward+backward (``simulator.backward``) of the backward config
`compile` would use untuned (``autotune.policy.ranked_backward_default``) or of --backward-config; a CLI
sits above codegen and autotune, so it may ask them for the config. It then says which forward kernel
the mask gets (``codegen.dispatch``) for the config given, else the untuned one, and why the kernels
before it in the order were refused: on this machine's GPU, or, without one, as on a Hopper GPU.

--calibrate-backward refits the backward's constants (``simulator.calibrate_backward``) from
``maskdsl bench --train --json`` files, with the GPU entry's recorded ``bwd_measurements`` unless
--no-recorded, and prints the constants, the in-sample and the leave-one-case-out tables (per dQ mode);
--out writes the GPU's entry, refitted and with the new records, into a cost file (created, or updated
in place keeping its other entries: ``--out simulator/gpu_costs.json`` refits the shipped constants).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys


def _tile(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated tile extents like 2,8,8, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"tile extents must be positive, got {text!r}")
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="predict the tile schedule and speedup of a mask (GNA-style)")
    p.add_argument("file", nargs="?", help="the spec (not with --calibrate-backward)")
    p.add_argument("--mask", help="mask name (default: the attention statement's mask, or the only mask)")
    p.add_argument("--q-tile", type=_tile, help="query tile extents per dimension, e.g. 2,8,8")
    p.add_argument("--kv-tile", type=_tile, help="key tile extents (default: the query tile)")
    p.add_argument("--no-permute", action="store_true", help="row-major tokens: a tile is prod(tile) consecutive tokens")
    p.add_argument("--sweep", action="store_true", help="rank every tile configuration (16..256 tokens per tile)")
    p.add_argument("--limit", type=int, default=10, help="configs shown by --sweep (default 10)")
    p.add_argument("--suggest", action="store_true",
                   help="perfectly block-sparse windows/strides near the mask's, for the tile")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--lengths", type=_offsets, help="document masks: document lengths drawn in LOW,HIGH (default: one "
                                                 "document) or, with more numbers, the offsets 0,l1,...,L themselves")
    p.add_argument("--gpu", help="GPU whose cost constants to use (default: NVIDIA H100 80GB HBM3)")
    p.add_argument("--costs", help="JSON file of fitted cost constants overriding the built-in ones")
    p.add_argument("--warps", type=int, help="num_warps of the kernel (occupancy; default: codegen's untuned choice)")
    p.add_argument("--stages", type=int, help="num_stages of the kernel (occupancy; default 3)")
    p.add_argument("--backward-config", help="backward config key to predict, e.g. bwd-q64_k64_w4_s2-q128_k64_w8_s2 "
                   "(default: the untuned backward's simulator-ranked tiles)")
    p.add_argument("--ranks", type=int, help="also predict context parallelism over this many GPUs: per-rank "
                   "tiles, halo bytes, link time and whether the exchange hides (maskdsl.distributed)")
    p.add_argument("--zigzag", action="store_true", help="with --ranks: zig-zag chunks (balance a causal mask)")
    p.add_argument("--link-gbps", type=float, default=400.0,
                   help="with --ranks: point-to-point GB/s between neighbouring GPUs (default 400, H100 NVLink)")
    p.add_argument("--calibrate-backward", nargs="+", metavar="TRAIN_JSON",
                   help="refit the backward's constants from `maskdsl bench --train --json` files (GPU: theirs, "
                        "or --gpu) and print the leave-one-case-out table")
    p.add_argument("--no-recorded", action="store_true",
                   help="with --calibrate-backward: fit the files' timings alone, not the entry's bwd_measurements too")
    p.add_argument("--out", help="with --calibrate-backward: cost file to write the refitted entry into")
    p.set_defaults(func=cmd_simulate)


def _offsets(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give integers separated by commas, got {text!r}") from None
    if any(x < 0 for x in values) or len(values) < 2:
        raise argparse.ArgumentTypeError(f"give LOW,HIGH or offsets 0,...,L (non-negative), got {text!r}")
    return values


def cmd_simulate(args) -> int:
    if args.calibrate_backward:
        return cmd_calibrate_backward(args)
    if args.file is None:
        raise ValueError("maskdsl simulate needs a spec FILE; hint: maskdsl simulate FILE [--mask NAME], "
                         "or --calibrate-backward TRAIN.json")
    from maskdsl.api import resolve
    from maskdsl.simulator.simulation import simulate
    from maskdsl.simulator.suggestions import suggest
    from maskdsl.simulator.ranking import default_config, sweep

    spec, mdef, _ = resolve(args.file, args.mask)
    if mdef.documents:  # its tiles depend on the offsets of each call: predicted from drawn layouts
        from maskdsl.simulator.documents import simulate_cli

        return simulate_cli(args, spec, mdef)
    mask = mdef.name
    permute = not args.no_permute
    cost = {"gpu": args.gpu, "costs": args.costs}
    if args.kv_tile and not args.q_tile:
        raise ValueError("--kv-tile needs --q-tile; hint: give both, e.g. --q-tile 2,8,8 --kv-tile 2,8,8")
    if args.sweep:
        rows = [r for _, r in sweep(spec, mask, permute=permute, limit=args.limit, **cost)]
        title = f"sweep of {mask}: best {len(rows)} configs by upper bound, then predicted speedup"
    elif args.q_tile:
        rows = [simulate(spec, mask, args.q_tile, args.kv_tile, permute=permute, num_warps=args.warps,
                         num_stages=args.stages, **cost)]
        title = f"simulation of {mask}"
    else:
        rows = [default_config(spec, mask, permute=permute, **cost)[1]]
        title = f"simulation of {mask} (best 128-token tile; choose with --q-tile/--kv-tile)"
    forward = None if args.sweep else dispatch_info(spec, mdef, args)
    backward = None
    if not args.sweep and not mdef.dynamic:
        backward = _backward(spec, mdef, args, permute, cost)
        rows[0] = dataclasses.replace(rows[0], backward=backward)
    suggestions = []
    if args.suggest:
        best = rows[0]
        suggestions = suggest(spec, mask, best.q_tile, best.kv_tile, **cost)
    if args.json:
        out = {"file": args.file, "mask": mask, "results": [r.to_dict() for r in rows]}
        if forward is not None:
            out["forward"] = forward
        if args.suggest:
            out["suggestions"] = [{"expr": nb.fmt(), **r.to_dict()} for nb, r in suggestions]
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(title)
    print(format_table(rows))
    if not args.sweep and not mdef.dynamic:
        print(format_backward(rows[0], args.backward_config is None,
                              (args.backward_config or "").strip().endswith("-atomic")))
    if forward is not None:
        print(format_dispatch(forward))
    for note in dict.fromkeys(n for r in rows for n in r.notes):
        print(f"note: {note}")
    if args.suggest:
        _print_suggestions(spec.mask(mask).expr, rows[0], suggestions)
    if args.ranks:
        print(format_ranks(spec, mask, rows[0], args))
    return 0


def cmd_calibrate_backward(args) -> int:
    """Bench --train files -> records -> the refitted backward entry, its in-sample and held-out tables."""
    from pathlib import Path

    from maskdsl.codegen.config import BackwardConfig
    from maskdsl.simulator.calibrate_backward import (cross_validate_backward, evaluate_backward, fit_backward,
                                                      format_evaluation, measurements_from_records,
                                                      records_from_bench)
    from maskdsl.simulator.cost import _BUILTIN, CostModel, _load, _match

    records, gpus = [], set()
    for path in args.calibrate_backward:
        data = json.loads(Path(path).read_text())
        gpus.add((data.get("environment") or {}).get("gpu"))
        records += records_from_bench(data.get("results", []), source=str(path))
    if not records:
        raise ValueError(f"no checked backward timing in {', '.join(args.calibrate_backward)}; "
                         "hint: pass the JSON of maskdsl bench --train --json FILE run on a GPU")
    gpu = args.gpu or next(iter(gpus - {None}), None)
    if gpu is None or (args.gpu is None and len(gpus - {None}) > 1):
        raise ValueError(f"the files were run on {sorted(map(str, gpus))}; hint: name the GPU with --gpu")
    table = _load(_BUILTIN)  # the shipped entry, not this machine's cached forward fit
    if args.costs:
        table.update(_load(Path(args.costs)))
    name = _match(gpu, table)
    entry = dict(table[name])
    model = CostModel.from_entry(name, entry)
    recorded = [] if args.no_recorded else list(entry.get("bwd_measurements", []))
    records = recorded + records
    measurements = measurements_from_records(records, BackwardConfig.from_key)
    source = (f"fitted by maskdsl simulate --calibrate-backward {' '.join(args.calibrate_backward)}"
              f"{' --no-recorded' if args.no_recorded else ''} ({len(measurements)} timings of "
              f"{len({m.case for m in measurements})} cases, {sum(m.config.atomic for m in measurements)} atomic-dQ)")
    fitted = fit_backward(measurements, model, source=source)
    entry.update(fitted)
    entry["bwd_measurements"] = records
    refit = CostModel.from_entry(name, entry)
    print(f"backward constants for {name} from {len(measurements)} timings:")
    for key, value in fitted.items():
        if key not in ("bwd_source", "bwd_fitted_cases"):
            print(f"  {key} = {value if value is None or isinstance(value, str) else round(value, 6)}")
    print("\nin sample:")
    print(format_evaluation(evaluate_backward(measurements, refit)))
    if len({m.case for m in measurements}) < 3:
        print("\nleave one case out: not run (fitting needs 2 cases besides the held-out one)")
    else:
        print("\nleave one case out (each case predicted by constants fitted on the others):")
        print(format_evaluation(cross_validate_backward(measurements, model)))
    if args.out:
        out = Path(args.out)
        data = json.loads(out.read_text()) if out.exists() else {"gpus": {}}
        data.setdefault("gpus", {})[name] = entry
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nwrote {name}'s entry to {out}")
    return 0


def format_ranks(spec, mask: str, row, args) -> str:
    """Per-rank prediction of the sharded grid for the config shown above."""
    from maskdsl.simulator.sharding import simulate_sharded

    preds = simulate_sharded(spec, mask, args.ranks, row.q_tile, row.kv_tile, args.link_gbps, args.gpu,
                             args.zigzag)
    lines = [f"context parallel over {args.ranks} ranks{' (zig-zag)' if args.zigzag else ''}, "
             f"link {args.link_gbps:g} GB/s:",
             "rank  frames                 q tiles  visited  calls  halo MB  link ms  compute ms  hidden"
             "  gather MB  vs all-gather"]
    for p in preds:
        frames = " ".join(f"{a}-{b}" for a, b in p.chunks)
        compute = "-" if p.compute_ms is None else f"{p.compute_ms:.3f}"
        hidden = "-" if p.hidden is None else ("yes" if p.hidden else "no")
        ratio = "-" if p.speedup_over_gather is None else f"{p.speedup_over_gather:.3f}x"
        lines.append(f"{p.rank:>4}  {frames:<21}  {p.query_tiles:>7}  {p.visited_tiles:>7}  {p.segments:>5}  "
                     f"{p.halo_bytes / 1e6:>7.1f}  {p.comm_ms:>7.3f}  {compute:>10}  {hidden:<6}"
                     f"  {p.gather_bytes / 1e6:>9.1f}  {ratio:>12}")
    lines.append("vs all-gather: the predicted forward of an all-gather of every K/V slab followed by the same "
                 "tiles, over this rank's (compute, or the link where the halo does not hide)")
    return "\n".join(lines)


def _backward(spec, mdef, args, permute, cost):
    """The predicted backward of --backward-config or of the untuned backward config; None if uncalibrated."""
    from maskdsl.codegen.config import BackwardConfig
    from maskdsl.simulator.backward import simulate_backward

    if args.backward_config:
        config = BackwardConfig.from_key(args.backward_config)
        config.validate(len(mdef.layout.shape))
    else:
        from maskdsl.autotune.policy import ranked_backward_default

        att = spec.attention_for(mdef.name)
        config = ranked_backward_default(mdef, att.head_dim if att else 128)
    return simulate_backward(spec, mdef.name, config, permute=permute, **cost)


def dispatch_info(spec, mdef, args) -> dict:
    """Which forward `codegen.dispatch` picks for the mask, its config and the refusals before it.

    The tensors are the attention statement's (heads, head_dim, dtype; bf16 x 128 without one), built
    on the meta device: shapes and strides only. The device is this machine's CUDA GPU, or a Hopper
    GPU where there is none (or Triton's interpreter runs the kernels)."""
    import torch

    from maskdsl.autotune.policy import ranked_default
    from maskdsl.codegen import dispatch
    from maskdsl.codegen.build import compile_attention
    from maskdsl.codegen.config import KernelConfig
    from maskdsl.harness.measure import torch_dtype
    from maskdsl.analysis.tiles import forward_launch

    att = spec.attention_for(mdef.name)
    head_dim, dtype = (att.head_dim, torch_dtype(att.dtype)) if att else (128, torch.bfloat16)
    heads, kv_heads = (att.heads, att.kv_heads) if att else (1, 1)
    here = torch.cuda.is_available() and not dispatch.interpreting()
    target = dispatch.Target.of(torch.device("cuda", torch.cuda.current_device())) if here else dispatch.HOPPER
    info = {"device": target.describe() if here else "a Hopper GPU (none here: as it would run there)",
            "dtype": str(dtype).removeprefix("torch."), "head_dim": head_dim}
    try:
        if args.q_tile:
            q_tile = tuple(args.q_tile)
            warps, stages = forward_launch(math.prod(q_tile), head_dim)
            config = KernelConfig(q_tile, tuple(args.kv_tile or q_tile), args.warps or warps, args.stages or stages)
        else:
            config = ranked_default(mdef, head_dim, att, on_hopper=target == dispatch.HOPPER)
        fn = compile_attention(spec, mdef.name, config)
    except ValueError as exc:  # a config the kernels cannot take, an unsupported mask
        return {**info, "error": str(exc)}
    q = torch.empty(1, heads, mdef.layout.tokens, head_dim, device="meta", dtype=dtype)
    kv = torch.empty(1, kv_heads, mdef.layout.tokens, head_dim, device="meta", dtype=dtype)
    reasons = dispatch.forward_reasons(fn, q, kv, kv, q, None, target)
    chosen = next((name for name, reason in reasons if reason is None), None)
    info.update(config=fn.config.key(), untuned=not args.q_tile, forward=chosen,
                refused={name: reason for name, reason in reasons[:[n for n, _ in reasons].index(chosen)]
                         if chosen is not None} if chosen else dict(reasons))
    if chosen == "gluon":
        info["mode"] = fn.gluon_schedule.ranges.mode
    elif chosen is not None:
        info["copy_engine"] = dispatch.tma_blocker(fn.plan, q, kv, kv, q, target) or "yes"
    return info


def format_dispatch(info: dict) -> str:
    """The forward line(s) of `dispatch_info`."""
    where = f"on {info['device']}, {info['dtype']} x head_dim {info['head_dim']}"
    if "error" in info:
        return f"forward {where}: cannot compile: {info['error']}"
    which = " (the untuned default)" if info["untuned"] else ""
    if info["forward"] is None:
        head = f"forward {where}, config {info['config']}{which}: no kernel runs it"
    else:
        detail = (f"{info['mode']} mode" if "mode" in info else
                  "copy-engine loads" if info["copy_engine"] == "yes" else f"pointer loads: {info['copy_engine']}")
        head = f"forward {where}, config {info['config']}{which}: {info['forward']} ({detail})"
    return "\n".join([head] + [f"  not {name}: {reason}" for name, reason in info["refused"].items()])


def format_backward(r, default: bool, atomic: bool = False) -> str:
    """The backward and forward+backward lines under the forward's table."""
    b = r.backward
    if b is None:
        what = "constant for the atomic-dQ backward (bwd_atomic_us)" if atomic else "backward constants"
        return (f"backward: not predicted: {r.gpu} has no {what}; hint: fit them from maskdsl bench --train "
                "times with maskdsl simulate --calibrate-backward TRAIN.json (docs/SIMULATOR.md)")
    which = " (the untuned default)" if default else ""
    if b.atomic:
        line = (f"backward {b.label()}{which}: dK/dV with atomic dQ {b.dkdv_ms:.3f} ms + float32 buffers "
                f"{b.pass_ms:.3f} ms = {b.ms:.3f} ms predicted ({b.dkdv.ctas_per_sm} CTAs/SM)")
    else:
        line = (f"backward {b.label()}{which}: dK/dV {b.dkdv_ms:.3f} ms + dQ {b.dq_ms:.3f} ms = {b.ms:.3f} ms "
                f"predicted ({b.dkdv.ctas_per_sm} + {b.dq.ctas_per_sm} CTAs/SM)")
    if b.speedup is not None:
        line += f"; dense SDPA backward {b.dense_ms:.3f} ms ({_x(b.speedup)})"
    if r.predicted_fwd_bwd_ms is not None:
        line += f"\nforward+backward: {r.predicted_fwd_bwd_ms:.3f} ms predicted"
        if r.predicted_fwd_bwd_speedup is not None:
            dense = r.predicted_fwd_bwd_ms * r.predicted_fwd_bwd_speedup
            line += f"; dense SDPA {dense:.3f} ms ({_x(r.predicted_fwd_bwd_speedup)})"
    return line


def _print_suggestions(expr, base, suggestions) -> None:
    tiles = f"q {_dims(base.q_tile)} / kv {_dims(base.kv_tile)}"
    if not suggestions:
        why = " (a causal dimension never is: its diagonal tile is partial)" if any(getattr(expr, "causal", ())) else ""
        print(f"\nno perfectly block-sparse window/stride near {expr.fmt()} for {tiles}{why}")
        return
    print(f"\nperfectly block-sparse neighborhoods near {expr.fmt()} for {tiles}:")
    for nb, r in suggestions:
        print(f"  {nb.fmt():<58} upper bound {_x(r.upper_bound_speedup)}, FLOP-ideal {_x(r.flop_ideal_speedup)}, "
              f"predicted {_x(r.predicted_speedup)}")


def _dims(t) -> str:
    return "x".join(map(str, t))


def _x(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}x"


def _n(v) -> str:
    return f"{v:,}" if isinstance(v, int) else f"~{v:,.1f}"


def format_table(rows) -> str:
    """One line per SimResult: tiles, tile counts, bounds (ours and the GNA paper's), prediction, the forward
    it is for (Hopper's Gluon kernel or the Triton template), schedule."""
    head = ("q tile", "kv tile", "layout", "tiles q x kv", "visited", "full", "partial", "upper bound",
            "worst tile", "FLOP-ideal", "predicted", "pred ms", "kernel", "CTAs/SM", "waves", "visits max/mean", "block-sparse")
    body = [(_dims(r.q_tile), _dims(r.kv_tile), "tile-major" if r.permute else "row-major",
             f"{r.q_tiles:,} x {r.kv_tiles:,}", _n(r.visited_tiles), _n(r.full_tiles), _n(r.partial_tiles),
             _x(r.upper_bound_speedup), _x(r.worst_tile_speedup), _x(r.flop_ideal_speedup), _x(r.predicted_speedup),
             "-" if r.predicted_ms is None else f"{r.predicted_ms:.3f}", "gluon" if r.gluon else "triton",
             f"{r.ctas_per_sm} (12w/2s)" if r.gluon else f"{r.ctas_per_sm} ({r.num_warps}w/{r.num_stages}s)",
             f"{r.waves:,.1f}", f"{_n(r.max_visits)}/{r.mean_visits:,.1f}", "yes" if r.perfectly_block_sparse else "no")
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
