"""An earlier Gluon forward against the package's, on every Gluon row of the benchmarks (GPU).

For each case both kernels run on the same inputs from the same schedule (table, bounds, items per
program: what `CompiledAttention` launches), into outputs poisoned with NaN. The script checks that
out and LSE are bitwise equal, checks sampled rows of each against the float64 reference (the
bench's row check, maskdsl.harness.measure), and times both with `triton.testing.do_bench` (median),
interleaved old, new, old, new. It writes $OUT/gluon_rows.json (the working directory without OUT)
and prints a table; it exits 1 when a case differs or fails its check.

    git show REV:codegen/gluon_fwd.py > /tmp/old_gluon_fwd.py
    python bench/scripts/gluon_rows.py /tmp/old_gluon_fwd.py [--only dense_32k,gna_3d] [--heads N]
    python bench/scripts/gluon_rows.py /tmp/old_gluon_fwd.py --dry-run   # CPU: cases and schedules only
"""

import argparse
import importlib.util
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

SUITE = Path(__file__).resolve().parent.parent / "suite"
H100_SMS = 132  # the dry run's multiprocessor count (items per program)

# name -> a suite file, or (layout, mask, attention arguments) for a case the suite does not hold
CASES = {
    "dense_32k": "dense_32k",
    "causal_32k": ("grid(32768)", "causal", "heads=32, head_dim=128, dtype=bf16"),
    "stream_sink_65k": "stream_sink_65k",
    "window_1d_32k": "window_1d_32k",
    "gna_3d": "gna_3d",
    "hunyuan_gna_stride": "hunyuan_gna_stride",
    "flux_gna": "flux_gna",
    "blocked_3d": "blocked_3d",
    "block_2048_1head": "block_2048_1head",
    "window_2048_stride_1head": "window_2048_stride_1head",
    "neighborhood_3d": "neighborhood_3d",
    "cosmos_gna_ragged": "cosmos_gna_ragged",
}
TIMER = {"warmup": 25, "rep": 100}
ROWS = 64  # rows checked against the reference per case


def load_spec(source):
    from maskdsl.lang.parser import load, parse

    if isinstance(source, str):
        return load(SUITE / f"{source}.mask")
    layout, mask, attention = source
    return parse(f"layout seq = {layout}\nmask m = {mask}\nattention main(mask=m, {attention})\n")


def load_kernel(path: str):
    """A codegen/gluon_fwd.py from a file (the earlier kernel), as its own module."""
    spec = importlib.util.spec_from_file_location("old_gluon_fwd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Row:
    """One case: its mask, problem, the Gluon schedule both kernels run, and (not in a dry run) inputs."""

    name: str
    spec: object
    mask: object
    problem: object
    config: object
    fn: object  # CompiledAttention
    per: int
    q: object = None
    k: object = None
    v: object = None
    reference: object = None  # maskdsl.harness.measure.RowReference

    @property
    def schedule(self):
        return self.fn.gluon_schedule


def build(name: str, heads: int | None, device: str, sms: int, seed: int = 0) -> Row:
    """The case `name`: the Gluon forward's tile pair (the one the bench times: autotune.policy.gluon_pair;
    the untuned config on a 1-D order), its schedule, and on a device the inputs and the reference rows."""
    from maskdsl.api import resolve
    from maskdsl.autotune.policy import gluon_pair
    from maskdsl.codegen.build import compile_attention
    from maskdsl.harness.measure import Problem, make_inputs, reference_rows, sample_rows
    from maskdsl.analysis.tile_table import WIDTH

    spec, mask, attention = resolve(load_spec(CASES[name]))
    problem = Problem.for_attention(attention)
    if heads is not None:
        problem = replace(problem, heads=heads, kv_heads=heads)
    # a 1-D order runs the kernel's own tiles whatever the config (codegen.gluon_plan.kernel_tiles)
    pair = gluon_pair(mask, problem.head_dim, attention)
    fn = compile_attention(spec, mask.name, pair and pair[0])
    schedule = fn.gluon_schedule
    if not schedule.ranges.ok:
        raise ValueError(f"{name}: {schedule.ranges.reason}")
    if schedule.table.shape[1] != WIDTH[schedule.ranges.mode]:
        raise ValueError(f"{name}: a {schedule.ranges.mode!r} table of {schedule.table.shape[1]} columns")
    items = len(schedule.table) * problem.batch * problem.heads
    row = Row(name, spec, mask, problem, fn.config, fn, schedule.items_per_program(items, sms))
    if device != "meta":
        tokens = mask.layout.tokens
        row.q, row.k, row.v = make_inputs(problem, tokens, device, seed)
        row.reference = reference_rows(row.q, row.k, row.v, spec, mask.name, sample_rows(tokens, ROWS, seed))
    return row


def launcher(module, row: Row, out, lse):
    """A call of `module`'s kernel over the row's whole schedule into out and lse (what
    CompiledAttention._launch_gluon does; idle query tiles are filled once here, not per call)."""
    import torch

    table, idle_rows, bounds = row.schedule.on(row.q.device)
    r = row.schedule.ranges
    if len(idle_rows):
        out.index_fill_(2, idle_rows, 0.0)
        lse.index_fill_(2, idle_rows, float("-inf"))
    scale = 1.0 / row.problem.head_dim ** 0.5
    mode = (r.mode,) if "mode" in inspect.signature(module.launch).parameters else ()  # the earlier one infers it
    args = (row.q, row.k, row.v, out, lse, scale, table, 0, len(table), r.shape, r.q_tile, r.kv_tile, *mode)

    def call():
        module.launch(*args, bounds=bounds, long=r.long, per=row.per)

    assert out.is_contiguous() and lse.dtype == torch.float32
    return call


def bitwise_equal(a, b) -> bool:
    import torch

    view = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return bool(torch.equal(a.view(view), b.view(view)))


def run_row(row: Row, kernels: dict, repeats: int = 2, new_first: bool = False) -> dict:
    """Both kernels once into poisoned outputs (checked), then timed interleaved, `repeats` times each."""
    import torch

    from maskdsl.harness.measure import time_ms, tolerance

    r = row.schedule.ranges
    entry = {"case": row.name, "mask": row.mask.expr.fmt(), "grid": list(row.mask.layout.shape),
             "heads": row.problem.heads, "head_dim": row.problem.head_dim, "dtype": row.problem.dtype,
             "config": row.config.key(), "mode": r.mode, "table_rows": len(row.schedule.table), "per": row.per}
    outs, calls = {}, {}
    for which, module in kernels.items():
        out = torch.full_like(row.q, float("nan"))
        lse = torch.full(row.q.shape[:3], float("nan"), device=row.q.device, dtype=torch.float32)
        start = time.perf_counter()
        calls[which] = launcher(module, row, out, lse)
        calls[which]()
        torch.cuda.synchronize()
        entry[f"{which}_first_call_s"] = time.perf_counter() - start
        check = row.reference.check(out)
        entry[f"{which}_check"] = {"rows": check.rows, "unwritten": check.unwritten, "error": check.error,
                                   "ok": check.ok(tolerance(row.q.device))}
        outs[which] = (out, lse)
    entry["out_bitwise_equal"] = bitwise_equal(outs["old"][0], outs["new"][0])
    entry["lse_bitwise_equal"] = bitwise_equal(outs["old"][1], outs["new"][1])
    for which in (("new", "old") if new_first else ("old", "new")) * repeats:
        entry.setdefault(f"{which}_ms", []).append(time_ms(calls[which], **TIMER))
    entry["new_over_old"] = min(entry["new_ms"]) / min(entry["old_ms"])
    entry["ok"] = (entry["out_bitwise_equal"] and entry["lse_bitwise_equal"] and entry["old_check"]["ok"]
                   and entry["new_check"]["ok"])
    return entry


def print_row(e: dict) -> None:
    if "failed" in e:
        print(f"{e['case']:26} FAILED {e['failed']}", flush=True)
        return
    if "old_ms" not in e:  # a dry run
        print(f"{e['case']:26} {e['mode']:6} {e['config']:22} rows {e['table_rows']:6} per {e['per']}", flush=True)
        return
    same = "yes" if e["out_bitwise_equal"] and e["lse_bitwise_equal"] else \
        f"NO (out {e['out_bitwise_equal']}, lse {e['lse_bitwise_equal']})"
    ms = lambda xs: "/".join(f"{x:.3f}" for x in xs)  # noqa: E731
    print(f"{e['case']:26} {e['mode']:6} {e['per']:3} {same:>5} {e['old_check']['error']:9.2e} "
          f"{e['new_check']['error']:9.2e} {ms(e['old_ms']):>17} {ms(e['new_ms']):>17} {e['new_over_old']:6.3f}",
          flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="an earlier codegen/gluon_fwd.py (git show REV:codegen/gluon_fwd.py > FILE)")
    parser.add_argument("--only", help="comma-separated case names (default: all)", default="")
    parser.add_argument("--heads", type=int, help="run every case with this many heads (a quicker check)")
    parser.add_argument("--repeats", type=int, default=2, help="timings of each kernel, interleaved (default 2)")
    parser.add_argument("--new-first", action="store_true", help="interleave new, old (a check on order effects)")
    parser.add_argument("--dry-run", action="store_true", help="build the cases and schedules only (no GPU)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    kernels = {"old": load_kernel(args.old)}
    from maskdsl.codegen import gluon_fwd

    kernels["new"] = gluon_fwd
    if args.dry_run:
        device, sms = "meta", H100_SMS
    else:
        import torch

        from maskdsl.codegen.dispatch import sm_count, tensor_blocker

        device, sms = "cuda", sm_count(torch.device("cuda"))
    result = {"old": args.old, "device": device, "cases": []}
    if device == "cuda":
        import torch

        result["device"] = torch.cuda.get_device_name()
        print(f"{'case':26} {'mode':6} {'per':3} {'same':>5} {'err old':>9} {'err new':>9} {'old ms':>17} "
              f"{'new ms':>17} {'new/old':>6}")
    for name in names:
        try:
            row = build(name, args.heads, device, sms)
            if device == "meta":
                r = row.schedule.ranges
                entry = {"case": name, "mode": r.mode, "config": row.config.key(),
                         "table_rows": len(row.schedule.table), "per": row.per}
            else:
                blocker = tensor_blocker(row.q, row.k, row.v, row.q)
                if blocker:
                    raise RuntimeError(f"the Gluon forward cannot take these tensors: {blocker}")
                entry = run_row(row, kernels, args.repeats, args.new_first)
        except Exception as exc:  # noqa: BLE001 - a case that fails must not hide the others
            entry = {"case": name, "failed": f"{type(exc).__name__}: {str(exc)[:300]}", "ok": False}
        result["cases"].append(entry)
        print_row(entry)
    path = Path(os.environ.get("OUT", ".")) / "gluon_rows.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0 if all(e.get("ok", True) for e in result["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
