"""`maskdsl tune FILE --mask NAME [--backward]` and `maskdsl tune --list`."""

from __future__ import annotations


def cmd_tune(args) -> int:
    if args.list:
        return _list(args)
    if not args.file or not args.mask:
        print("give FILE and --mask NAME (or --list)")
        return 2
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        print("no GPU found: tuning under Triton's interpreter on a slice of the problem; "
              "the times only show the machinery works, they do not rank configs for a GPU")
    from maskdsl.api import resolve
    from maskdsl.autotune.tuner import tune

    spec, _, _ = resolve(args.file, args.mask)  # an unknown --mask fails here, before any study is made
    if args.exhaustive:
        if args.backward:
            print("--exhaustive times the forward's space; the backward's (the product of its two kernels' "
                  "configs) is tuned by a study: drop --exhaustive")
            return 2
        return _exhaustive(spec, args)
    per_volume = args.per_volume or (1 if args.backward else 3)
    result = tune(spec, args.mask, trials=args.trials, storage=args.storage, timeout=args.timeout,
                  progress=not args.quiet, per_volume=per_volume, backward=args.backward,
                  deterministic=args.deterministic)
    print(f"{'backward' if args.backward else 'forward'} study {result.study}: {result.trials} trials "
          f"({result.pruned} pruned)")
    if result.best:
        line = f"best {result.best.key()}: {result.best_ms:.4f} ms"
        if result.default_ms:
            line += f"; default config {result.default_ms:.4f} ms ({result.default_ms / result.best_ms:.2f}x)"
        print(line)
    return 0


def _exhaustive(spec, args) -> int:
    import json

    from maskdsl.autotune.tuner import exhaustive

    def show(cfg, ms, err):
        print(f"  swept {cfg.key()}: {'failed: ' + err if ms is None else f'{ms:.4f} ms'}", flush=True)

    rows = exhaustive(spec, args.mask, per_volume=args.per_volume or 3, on_result=show)
    timed = sorted((r for r in rows if r[1] is not None), key=lambda r: r[1])
    print(f"exhaustive sweep: {len(rows)} configs, {len(timed)} ran, {len(rows) - len(timed)} failed")
    for cfg, ms, _ in timed[:5]:
        print(f"  {cfg.key()}: {ms:.4f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{"config": c.key(), "ms": ms, "error": err} for c, ms, err in rows], fh, indent=1)
    return 0


def _list(args) -> int:
    from maskdsl.autotune.database import list_studies, storage_url

    rows = list_studies(args.storage)
    print(f"storage {storage_url(args.storage)}: {len(rows)} study(ies)")
    for r in rows:
        best = "-" if r["best_ms"] is None else f"{r['best_ms']:.4f} ms"
        spd = "-" if r["speedup_vs_default"] is None else f"{r['speedup_vs_default']:.2f}x"
        note = " (interpreter)" if r["interpreted"] else ""
        print(f"  {r['gpu']} {r['capability']} {r['triton']} | {r['mask']} = {r['mask_text']} | {r['problem']} | "
              f"{ {'bwd': 'backward', 'bwd-atomic': 'backward (atomic dQ)'}.get(r['pass'], 'forward')} | "
              f"{r['trials']} trials | best {best} {r['best_config'] or ''} | vs default {spd}{note}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("tune", help="autotune a mask's kernel with Optuna into the tuning database")
    p.add_argument("file", nargs="?")
    p.add_argument("--mask")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--storage", help="Optuna storage URL (default: SQLite in the user cache directory)")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--list", action="store_true", help="list stored studies")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--exhaustive", action="store_true", help="time every config of the space instead (no study)")
    p.add_argument("--per-volume", type=int,
                   help="tile shapes per (BLOCK_M, BLOCK_N) in the space (default 3; 1 with --backward)")
    p.add_argument("--backward", action="store_true",
                   help="tune the backward kernels (dK/dV and dQ configs; objective: the backward's time)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--deterministic", dest="deterministic", action="store_true", default=None,
                      help="with --backward: tune the split backward (bitwise-equal gradients run to run; the default "
                           "maskdsl.compile runs)")
    mode.add_argument("--atomic", dest="deterministic", action="store_false",
                      help="with --backward: tune the atomic-dQ backward (maskdsl.compile(deterministic=False))")
    p.add_argument("--json", help="with --exhaustive: write every timing here")
    p.set_defaults(func=cmd_tune)
