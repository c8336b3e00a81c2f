"""Fuzz: a few thousand generated spec texts, well-formed and mangled. The only exception allowed is
SpecError; whatever parses must also be checked (`maskdsl check`'s analysis) without any exception.

A seeded generator (not hypothesis) keeps the run reproducible and fast; MASKDSL_FUZZ_SEED and
MASKDSL_FUZZ_COUNT widen it locally.
"""

import os
import random
import resource
import time

import maskdsl
from maskdsl.describe import density_line, describe

SEED = int(os.environ.get("MASKDSL_FUZZ_SEED", "20261125"))
COUNT = int(os.environ.get("MASKDSL_FUZZ_COUNT", "3000"))

EXTENTS = ["1", "2", "5", "16", "33", "0", "-3", "4194305", "9223372036854775808", "1" + "0" * 30, "x", "(4)"]
WORDS = ["full", "causal", "fulll", "m0", "m1", "grid", "mask", "on", "true", "sink", "topk"]
NOISE = ["(", ")", "|", "&", ",", "=", "#", "\n", "\x0c", "\u2028", "\ufeff", "é", "\x00", "'", "-", "9" * 25, "  "]


def _int(r, hi, lo=1):
    roll = r.random()
    return str(r.randint(lo, max(hi, lo)) if roll < 0.97 else r.randint(-2, hi + 3))


def _tuple(r, rank, hi, kind="int", lo=1):
    def one():
        return r.choice(["true", "false"]) if kind == "bool" else _int(r, hi, lo)
    if r.random() < 0.5:
        return one()
    n = rank if r.random() < 0.95 else r.randint(1, 4)
    return "(" + ", ".join(one() for _ in range(n)) + ")"


def _primitive(r, rank, hi):
    kind = r.randrange(10)
    if kind == 0:
        args = [f"window={_tuple(r, rank, hi, lo=2)}"]
        if r.random() < 0.3:
            args.append(f"dilation={_tuple(r, rank, 2)}")
        if r.random() < 0.5:
            args.append(f"stride={_tuple(r, rank, 2)}")
        if r.random() < 0.3:
            args.append(f"causal={_tuple(r, rank, 1, 'bool')}")
        r.shuffle(args)
        return f"neighborhood({', '.join(args)})"
    if kind == 1 and (rank == 1 or r.random() < 0.1):
        return f"sliding_window({_int(r, hi)}{', causal=true' if r.random() < 0.5 else ''})"
    if kind == 2:
        return f"dilated({_tuple(r, rank, hi // 2)}, {_tuple(r, rank, 2)})"
    if kind == 3:
        return f"strided(window={_tuple(r, rank, hi, lo=2)}, stride={_tuple(r, rank, 2)})"
    if kind == 4:
        return f"block({_tuple(r, rank, hi)})"
    if kind == 5:
        return f"sink({_int(r, hi * 2)})"
    if kind == 6 and r.random() < 0.3:
        return f"topk(k={_int(r, 4)}, block={r.choice(['16', '32', _int(r, 40)])})"
    return r.choice(WORDS[:5] if r.random() < 0.05 else ["full", "causal", "sink(2)"])


def _expr(r, rank, hi, depth=0):
    if depth > 3 or r.random() < 0.4:
        return _primitive(r, rank, hi)
    op = r.choice([" | ", " & "])
    terms = [_expr(r, rank, hi, depth + 1) for _ in range(r.randint(2, 4))]
    text = op.join(terms)
    return f"({text})" if r.random() < 0.5 else text


def spec_text(r: random.Random) -> str:
    rank = r.choice([1, 1, 2, 3])
    extents = [r.choice(["4", "7", "12", "16", "20"]) if r.random() < 0.95 else r.choice(EXTENTS) for _ in range(rank)]
    hi = min((int(e) for e in extents if e.isdigit() and 0 < int(e) < 100), default=4)
    lines = [f"layout g = grid({', '.join(extents)})"]
    for i in range(r.randint(1, 3)):
        expr = _expr(r, rank, hi)
        if i and r.random() < 0.3:  # named masks used again: fmt writes them out (depth, size on the inlined form)
            expr = f"({expr}) {r.choice('|&')} m{r.randrange(i)}"
        if r.random() < 0.03:  # top-k beside a dilated neighborhood: refused at parse, never later
            expr = f"topk(k=2, block={r.choice(['4', '16'])}) | dilated({_tuple(r, rank, hi // 2)}, {_tuple(r, rank, 3)})"
        lines.append(f"mask m{i} = {expr}" + (" on g" if r.random() < 0.3 else ""))
    if r.random() < 0.3:
        lines.append(f"attention a(mask=m0, heads={_int(r, 8)}, head_dim={r.choice(['16', '64', '128', '48'])}, "
                     f"dtype={r.choice(['bf16', 'fp32', 'fp16', 'int8'])})")
    text = "\n".join(lines)
    for _ in range(r.choice([0, 0, 0, 0, 0, 1, 2, 4])):  # mangle: insert, delete or swap at random places
        at = r.randrange(len(text) + 1)
        action = r.randrange(3)
        if action == 0:
            text = text[:at] + r.choice(NOISE + WORDS) + text[at:]
        elif action == 1:
            text = text[:at] + text[at + r.randint(1, 6):]
        else:
            text = text[:at] + text[at:][::-1][:3] + text[at + 3:]
    return text


SECONDS_PER_TEXT = 5.0  # CPU seconds (not wall: CI shares its cores) to parse, check and maybe simulate one text
MEMORY_CEILING_KIB = 1536 * 1024  # peak resident memory of the whole run


def _simulate_some(spec, index):
    """Every 50th parsed spec is simulated too (the simulator's bounds are part of 'whatever parses works')."""
    if index % 50:
        return
    from maskdsl.simulator.simulation import simulate

    for mask in spec.masks:
        simulate(spec, mask.name, tuple(1 for _ in mask.layout.shape[:-1]) + (16,))


def test_generated_specs_raise_only_spec_error():
    import maskdsl.simulator.simulation  # noqa: F401 - imported once, outside the per-text clock
    import maskdsl.harness.topk  # noqa: F401 - (torch)

    r = random.Random(SEED)
    parsed = refused = 0
    for index in range(COUNT):
        text = spec_text(r)
        start = time.process_time()
        try:
            spec = maskdsl.parse(text, filename=f"fuzz{index}.mask")
        except maskdsl.SpecError as exc:
            refused += 1
            assert exc.line >= 0 and exc.column >= 0 and str(exc).startswith(f"fuzz{index}.mask:")
            elapsed = time.process_time() - start
            assert elapsed < SECONDS_PER_TEXT, f"seed {SEED} text #{index} took {elapsed:.1f} s to refuse\n{text!r}"
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"seed {SEED} text #{index} raised {type(exc).__name__}: {exc}\n{text!r}") from exc
        parsed += 1
        try:
            for mask in spec.masks:
                density_line(mask)
                describe(mask.expr, mask.layout.rank)
            assert maskdsl.parse(spec.fmt()) == spec
            _simulate_some(spec, index)
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"seed {SEED} text #{index} parsed but failed to analyse: "
                                 f"{type(exc).__name__}: {exc}\n{text!r}") from exc
        elapsed = time.process_time() - start
        assert elapsed < SECONDS_PER_TEXT, f"seed {SEED} text #{index} took {elapsed:.1f} s\n{text!r}"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < MEMORY_CEILING_KIB
    assert parsed > COUNT // 8 and refused > COUNT // 8, (parsed, refused)  # the generator reaches both sides
