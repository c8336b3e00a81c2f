"""How a key-tile loop hides the latency of its K/V loads: the slot time of one tile, compute or wait.

A CTA's loop over key tiles loads a K and a V tile per iteration. A software-pipelined loop
(`num_stages` s) issues each load s - 1 iterations ahead, so s - 1 loads are in flight while it
computes; by Little's law a slot then finishes at most (s - 1) tiles per load latency `L`:

    pipelined:    slot time per tile = max(k * c, L / (s - 1))
    unpipelined:  slot time per tile = max(k * c, c + L)

c is the tile's SM time (the calibrated compute cost), k the CTAs sharing the SM (each slot runs at
1/k of it, `simulator.schedule`). A loop whose loads sit inside a branch cannot be pipelined (the
top-k kernel's general loop: `if full: ... else: masked ...` around every tile, codegen.topk.forward), so
each of its tiles waits for its load before computing; other CTAs on the SM fill that wait only
when there are enough of them (the first max). A short tile in a two-stage pipeline (a 64-key tile
on one CTA per SM) waits too: one load in flight does not cover the latency.

`L` (`CostModel.load_us`) is one constant with a physical meaning, the time from issuing a tile's
loads to using them under a full GPU's memory traffic; it is fitted, and zero turns the term off.
"""

from __future__ import annotations


def split(compute: float, k: int, stages: int, pipelined: bool, load: float) -> tuple[float, float]:
    """(compute factor, load factor): one tile's slot time is `compute factor * c + load factor * L`,
    whichever regime binds at these constants (c = `compute`, L = `load`, both SM-time units).

    Linear in (c, L) once the regime is chosen, which is what the fit's alternation relies on (the
    critical slot's regimes are re-chosen from the current constants each round, like its jobs)."""
    if pipelined and stages >= 2:
        return (float(k), 0.0) if k * compute >= load / (stages - 1) else (0.0, 1.0 / (stages - 1))
    return (float(k), 0.0) if k * compute >= compute + load else (1.0, 1.0)


def tile_slot_time(compute: float, k: int, stages: int, pipelined: bool, load: float) -> float:
    """One tile's slot time (the two regimes' maximum, see the module docstring)."""
    if pipelined and stages >= 2:
        return max(k * compute, load / (stages - 1))
    return max(k * compute, compute + load)
