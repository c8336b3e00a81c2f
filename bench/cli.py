"""`maskdsl bench`: needs a GPU; `maskdsl simulate` answers without one."""

from __future__ import annotations


def cmd_bench(args) -> int:
    if args.fit_from:
        return _fit_from(args)
    if args.replot:
        import json

        from maskdsl.bench.plot import plot

        data = json.load(open(args.replot))
        env = data.get("environment", {})
        print(f"wrote {plot(data['results'], args.plot or 'bench.png', _title(env))}")
        return 0
    import json

    import torch

    if not torch.cuda.is_available():
        print("maskdsl bench measures on a GPU and none is available here; "
              "`maskdsl simulate FILE --mask NAME` predicts the speedup without one")
        return 2
    if args.documents:
        from maskdsl.bench.documents import run_documents

        run_documents(args.only, args.json, calls=args.calls, with_flex=not args.no_flex, sweep=args.sweep)
        return 0
    if args.decode:
        from maskdsl.bench.decode import parse_configs, run_decode

        run_decode(args.json, only=args.only, with_flex=not args.no_flex, configs=parse_configs(args.decode_configs))
        return 0
    from maskdsl.bench.report import print_paths, print_table
    from maskdsl.bench.cases import suite_files
    from maskdsl.bench.run import bench_mask, profile_launches, run_suite

    if args.train:
        from maskdsl.bench.training import run_training

        if not (args.suite or args.file):
            print("give FILE (and --mask when the spec has several), or --suite")
            return 2
        configs_from = None
        if args.configs_from:
            from maskdsl.bench.training import best_training_configs

            configs_from = best_training_configs([json.load(open(path)) for path in args.configs_from])
        if args.suite:
            run_training(suite_files(), args.json, only=args.only, with_flex=not args.no_flex, configs_from=configs_from)
        else:
            run_training([args.file], args.json, only=f":{args.mask}" if args.mask else None, with_flex=not args.no_flex)
        return 0
    if args.suite:
        configs_from = None
        if args.configs_from:
            from maskdsl.bench.run import best_configs

            configs_from = best_configs([json.load(open(path)) for path in args.configs_from])
        results = run_suite(suite_files(), args.json, only=args.only, flex_gather=args.flex_gather, paths=args.paths,
                            with_flex=not args.no_flex, configs_from=configs_from)
        if args.paths:
            print_paths(results)
        else:
            _maybe_plot(results, args)
        return 0
    if not args.file:
        print("give FILE (and --mask when the spec has several), or --suite")
        return 2
    from maskdsl.api import resolve
    from maskdsl.codegen.config import KernelConfig

    spec, mask, _ = resolve(args.file, args.mask)
    configs = [KernelConfig.from_key(c) for c in args.config] if args.config else None
    if args.profile:
        if not configs or len(configs) != 1:
            print("--profile launches one kernel: give exactly one --config, e.g. --config q2x8x8_k1x8x8_w8_s3")
            return 2
        profile_launches(spec, mask.name, configs[0])
        return 0
    result = bench_mask(spec, mask.name, configs, with_flex=not args.no_flex, flex_gather=args.flex_gather,
                        paths=args.paths)
    result["file"] = args.file
    print_table([result])
    if args.paths:
        print_paths([result])
    _maybe_plot([result], args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def _fit_from(args) -> int:
    """Fit and cross-validate the simulator's constants from saved suite runs (no GPU): several `--json`
    files of one GPU (a suite split over calls) count as one run; a case in several takes the latest
    file's entry (files are read in the order given)."""
    import json

    from maskdsl.bench.report import calibrate, latest_per_case, print_table

    runs = [json.load(open(path)) for path in args.fit_from]
    gpus = {r["environment"]["gpu"] for r in runs}
    if len(gpus) != 1:
        print(f"--fit-from takes runs of one GPU; these are from {sorted(gpus)}")
        return 2
    results = latest_per_case(runs)  # a case in several runs: the latest file's entry
    print_table(results)
    fitted = calibrate(results, gpus.pop())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": runs[0]["environment"], "sources": args.fit_from, "results": results,
                       "cost_fit": fitted}, fh, indent=1)
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
    p.add_argument("--suite", action="store_true", help="run bench/suite (the docs/DESIGN.md §7 cases and more)")
    p.add_argument("--only", help="with --suite: only cases whose 'file:mask' contains this text (or any of "
                                  "several, comma-separated)")
    p.add_argument("--config", action="append", metavar="KEY",
                   help="time this config (e.g. q2x8x8_k1x8x8_w8_s3; repeatable) instead of the candidates")
    p.add_argument("--paths", action="store_true",
                   help="run every config with copy-engine (TMA) loads and with pointer loads (MASKDSL_TMA=1/0); "
                        "with --suite: the configs of docs/BENCHMARKS.md's comparison, no cost fit")
    p.add_argument("--flex-gather", action="store_true",
                   help="also time FlexAttention with a mask_mod that gathers the token permutation per element")
    p.add_argument("--profile", action="store_true",
                   help="with FILE and one --config: three launches of that kernel and nothing else (for ncu)")
    p.add_argument("--train", action="store_true",
                   help="forward, backward and forward+backward (training) against dense SDPA and FlexAttention")
    p.add_argument("--decode", action="store_true",
                   help="decode steps against a KV cache (bench/decode.py: GQA 64/8, 8k-128k, batch 1-64, q_len 1-8; "
                        "a window of 4096 with sinks at 128k; NSA-style top-k at 32k) against SDPA over the whole "
                        "cache and flex decoding; --only picks cases by name")
    p.add_argument("--decode-configs", metavar="NxWxS,...",
                   help="with --decode: time these launch configs (BLOCK_N x num_warps x num_stages, e.g. 64x4x2,128x8x3) "
                        "and report the best, each checked first (default: the decode path's own)")
    p.add_argument("--no-flex", action="store_true", help="leave FlexAttention out (ours and dense SDPA only)")
    p.add_argument("--configs-from", nargs="+", metavar="JSON",
                   help="with --suite: re-time only the best config of each case in these saved runs (with --train: "
                        "each dQ mode's best forward/backward pair of saved --train runs)")
    p.add_argument("--documents", action="store_true",
                   help="packed documents (bench/documents.py): new lengths every call, against SDPA on nested jagged "
                        "tensors and FlexAttention with a per-call BlockMask; --only picks cases")
    p.add_argument("--calls", type=int, default=20, help="with --documents: calls timed, each with its own draw")
    p.add_argument("--sweep", action="store_true", help="with --documents: also time each kernel's candidate tiles "
                                                        "(bench/documents.py SWEEP_*) and report the fastest")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="draw predicted vs measured vs FlexAttention speedups (PNG)")
    p.add_argument("--fit-from", nargs="+", metavar="JSON",
                   help="fit and cross-validate the simulator from saved --suite --json runs of one GPU (no GPU needed); "
                        "a case in several files takes the last file's entry")
    p.add_argument("--replot", metavar="JSON", help="draw --plot from a saved --json of a suite run (no GPU needed)")
    p.set_defaults(func=cmd_bench)
