"""The `maskdsl` command: the front door. Subcommands import what they need lazily."""

from __future__ import annotations

import argparse
import os
import sys

from maskdsl.spec.errors import SpecError


def _parse_coords(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,8,8, got {text!r}") from None


def cmd_check(args) -> int:
    from maskdsl.describe import density_line, describe
    from maskdsl.lang.parser import load

    spec = load(args.file)
    for mask in spec.masks:
        lay = mask.layout
        print(f"{mask.name}: on {lay.name} grid{lay.shape} ({lay.tokens:,} tokens); "
              f"{density_line(mask)}; {describe(mask.expr, lay.rank)}")
    for att in spec.attentions:
        print(f"{att.name}: {att.mask}, batch {att.batch}, {att.heads} heads ({att.kv_heads} kv), "
              f"head_dim {att.head_dim}, {att.dtype}")
    print(f"ok: {args.file} ({len(spec.masks)} mask(s), spec hash {spec.content_hash()})")
    return 0


def cmd_fmt(args) -> int:
    from maskdsl.lang.parser import load

    sys.stdout.write(load(args.file).fmt())
    return 0


def cmd_show(args) -> int:
    from maskdsl.lang.parser import load
    from maskdsl.show import draw

    spec = load(args.file)
    queries = [_parse_coords(q) for q in args.query] if args.query else None
    print(f"wrote {draw(spec.mask(args.mask), args.output, queries)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskdsl", description="Attention masks as a language, compiled to Triton.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="validate a spec; print each mask's layout, density and description")
    p.add_argument("file")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("fmt", help="print the spec in canonical form")
    p.add_argument("file")
    p.set_defaults(func=cmd_fmt)

    p = sub.add_parser("show", help="draw which keys a few queries see (PNG)")
    p.add_argument("file")
    p.add_argument("--mask", required=True)
    p.add_argument("-o", "--output", default="mask.png")
    p.add_argument("--query", action="append", help="query coordinate, e.g. 15,24,40 (repeatable)")
    p.set_defaults(func=cmd_show)

    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Subcommands that live above the language layer (simulator, codegen, autotune, bench)."""
    out = []
    for module in ("maskdsl.simulator.cli", "maskdsl.codegen.cli", "maskdsl.autotune.cli", "maskdsl.bench.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError as exc:
            if exc.name and module.startswith(exc.name.split(".")[0]):
                continue  # that layer is not installed in this environment
            raise
        out.append(mod.register)
    return out


SIGPIPE_EXIT = 128 + 13  # what a shell reports for a tool ended by SIGPIPE, as `yes | head -1` does


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader (`head`, a pager) has what it wanted: stop quietly, and point stdout at devnull so
        # the interpreter's own final flush does not report the same closed pipe again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, ValueError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
