"""`maskdsl bench`: needs a GPU; `maskdsl simulate` answers without one."""

from __future__ import annotations


def cmd_bench(args) -> int:
    if args.replot:
        import json

        from maskdsl.bench.plot import plot

        data = json.load(open(args.replot))
        env = data.get("environment", {})
        print(f"wrote {plot(data['results'], args.plot or 'bench.png', _title(env))}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("maskdsl bench measures on a GPU and none is available here; "
              "`maskdsl simulate FILE --mask NAME` predicts the speedup without one")
        return 2
    from maskdsl.bench.run import bench_mask, print_table, run_suite, suite_files

    if args.suite:
        results = run_suite(suite_files(), args.json, only=args.only)
        _maybe_plot(results, args)
        return 0
    if not args.file or not args.mask:
        print("give FILE and --mask, or --suite")
        return 2
    import json

    from maskdsl.parser import load

    result = bench_mask(load(args.file), args.mask)
    result["file"] = args.file
    print_table([result])
    _maybe_plot([result], args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def _title(env) -> str:
    return " | ".join(str(env[k]) for k in ("gpu", "torch", "triton", "date") if k in env)


def _maybe_plot(results, args) -> None:
    if not args.plot:
        return
    try:
        from maskdsl.bench.plot import plot
        from maskdsl.bench.run import environment

        print(f"wrote {plot(results, args.plot, _title(environment()))}")
    except ImportError:
        print("--plot needs matplotlib (pip install 'maskdsl[show]'); re-plot later with --replot JSON")


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure a mask on the GPU against dense SDPA and FlexAttention")
    p.add_argument("file", nargs="?")
    p.add_argument("--mask")
    p.add_argument("--suite", action="store_true", help="run bench/suite (the DESIGN.md §7 cases and more)")
    p.add_argument("--only", help="with --suite: only cases whose 'file:mask' contains this text")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="draw predicted vs measured vs FlexAttention speedups (PNG)")
    p.add_argument("--replot", metavar="JSON", help="draw --plot from a saved --json of a suite run (no GPU needed)")
    p.set_defaults(func=cmd_bench)
