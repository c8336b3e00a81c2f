"""`maskdsl compile` (write the rendered kernel) and `maskdsl run` (the main job, `maskdsl.bench.job`)."""

from __future__ import annotations

import argparse


def _parse_tile(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,8,8, got {text!r}") from None


def _config(args, mask, attention=None):
    from maskdsl.api import lookup_config
    from maskdsl.codegen.config import KernelConfig

    base = lookup_config(mask, attention)
    if not (args.q_tile or args.kv_tile or args.num_warps or args.num_stages):
        return base
    return KernelConfig(args.q_tile or base.q_tile, args.kv_tile or base.kv_tile,
                        args.num_warps or base.num_warps, args.num_stages or base.num_stages)


def cmd_compile(args) -> int:
    from maskdsl.api import compile, resolve

    spec, mask, attention = resolve(args.file, args.mask)
    fn = compile(spec, args.mask, _config(args, mask, attention))
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(fn.source)
        print(f"wrote {args.output} ({fn.config.key()}, {fn.plan.q_tiles} query tiles per head)")
    else:
        print(fn.source)
    return 0


def cmd_run(args) -> int:
    from maskdsl.bench.job import run_main_job

    return run_main_job(args.file, args.mask, config_factory=lambda mask, att: _config(args, mask, att),
                        tiles=args.tiles, seed=args.seed)


def _add_config_args(p) -> None:
    p.add_argument("--q-tile", type=_parse_tile, help="query tile per dimension, e.g. 2,8,8")
    p.add_argument("--kv-tile", type=_parse_tile, help="key tile per dimension, e.g. 2,8,8")
    p.add_argument("--num-warps", type=int)
    p.add_argument("--num-stages", type=int)


def register(sub) -> None:
    p = sub.add_parser("compile", help="render the Triton kernel for a mask (standalone, readable module)")
    p.add_argument("file")
    p.add_argument("--mask", required=True)
    p.add_argument("-o", "--output", help="write the module here (default: print it)")
    _add_config_args(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="compile a mask, check it against the reference, and time it (the main job)")
    p.add_argument("file")
    p.add_argument("--mask", help="default: the mask of the spec's attention statement, else its only mask")
    p.add_argument("--tiles", type=int, default=2, help="query tiles to run under the interpreter (no GPU)")
    p.add_argument("--seed", type=int, default=0)
    _add_config_args(p)
    p.set_defaults(func=cmd_run)
