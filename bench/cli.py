"""`maskdsl bench`: needs a GPU; `maskdsl simulate` answers without one."""

from __future__ import annotations


def cmd_bench(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("maskdsl bench measures on a GPU and none is available here; "
              "`maskdsl simulate FILE --mask NAME` predicts the speedup without one")
        return 2
    from bench.run import bench_mask, print_table, run_suite, suite_files

    if args.suite:
        run_suite(suite_files(), args.json, only=args.only)
        return 0
    if not args.file or not args.mask:
        print("give FILE and --mask, or --suite")
        return 2
    import json

    from maskdsl.parser import load

    result = bench_mask(load(args.file), args.mask)
    result["file"] = args.file
    print_table([result])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure a mask on the GPU against dense SDPA and FlexAttention")
    p.add_argument("file", nargs="?")
    p.add_argument("--mask")
    p.add_argument("--suite", action="store_true", help="run bench/suite (the DESIGN.md §7 cases and more)")
    p.add_argument("--only", help="with --suite: only cases whose 'file:mask' contains this text")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=cmd_bench)
