"""How a GPU runs a grid of CTAs: how many fit on an SM at once, and when the last one finishes.

The kernel launches one CTA per (query tile, batch x head), grid axis 0 the query tile, axis 1
the batch x head: the block scheduler hands CTAs out in that linear order (tile-major within a
head, then the next head) to whichever SM slot frees first. That is greedy list scheduling in
launch order, and it is what decides the makespan of imbalanced work: a heavy query tile that
launches early (the sink's tile 0, the first rows of a causal mask) runs alongside many short
ones and is usually not the critical path; one that launches last is. Longest-first scheduling
(LPT) would hide exactly that, so it is not what is modelled here.

`ctas_per_sm` estimates occupancy from the tile config; the k co-resident CTAs share their SM
(processor sharing): while all k slots are busy each runs at 1/k of the SM, so a CTA costing t
SM-time units occupies its slot for k * t, and list scheduling over the sms * k slots is exact. When
the last CTAs have been dispatched an SM empties slot by slot and its remaining residents speed up,
each to at most its own loop's rate alone (`shared_schedule`): the last partial wave of a small
grid (a few CTAs per SM) runs faster than k times its SM time.
"""

from __future__ import annotations

import math

import numpy as np

from maskdsl.analysis.tiles import forward_launch

SMEM_BYTES = 227 * 1024  # usable shared memory per SM (and per CTA) on H100 / H200
REGISTERS = 65536  # 32-bit registers per SM
MAX_THREADS = 2048
MAX_CTAS = 32
MAX_REGS = 255  # per thread; the compiler spills beyond


def default_launch(block_m: int, head_dim: int = 128) -> tuple[int, int]:
    """(num_warps, num_stages) of codegen's untuned config for a query tile of `block_m` tokens
    (the rule is maskdsl.analysis.tiles', which codegen.config builds its default with)."""
    return forward_launch(block_m, head_dim)


def ctas_per_sm(block_m: int, block_n: int, head_dim: int = 128, num_warps: int = 8, num_stages: int = 3,
                dtype_bytes: int = 2, smem_bytes: int = SMEM_BYTES) -> int:
    """CTAs of one config resident on an SM at once: the tightest of shared memory, registers, threads.

    Shared memory: `num_stages` buffers of a K and a V tile plus the Q tile. Registers: the fp32
    output accumulator and score tile spread over the CTA's threads plus ~48 for addresses and
    softmax state, capped at 255 (the compiler spills beyond). A 128-row tile on 8 warps gets
    one CTA per SM; a 64-row tile on 4 warps gets two.
    """
    smem = num_stages * block_n * head_dim * dtype_bytes * 2 + block_m * head_dim * dtype_bytes
    threads = 32 * num_warps
    regs = min(MAX_REGS, register_demand(block_m, block_n, head_dim, num_warps))
    limits = (smem_bytes // max(1, smem), REGISTERS // (regs * threads), MAX_THREADS // threads, MAX_CTAS)
    return max(1, min(limits))


def register_demand(block_m: int, block_n: int, head_dim: int = 128, num_warps: int = 8) -> int:
    """32-bit registers per thread a CTA's live state asks for: the fp32 output accumulator
    (block_m x head_dim) and the score tile with its softmax temporaries (~1.5 x block_m x block_n)
    spread over the threads, plus ~48 for addresses and row statistics."""
    return 48 + math.ceil((block_m * head_dim + 1.5 * block_m * block_n) / (32 * num_warps))


def spill_factor(block_m: int, block_n: int, head_dim: int = 128, num_warps: int = 8) -> float:
    """How much slower a key tile runs when its state does not fit the 255 registers a thread may
    hold: the excess lives in local memory and is reloaded every tile, so the tile's time grows with
    demand / 255 (a 128-row tile on 4 warps: 368 / 255 = 1.44)."""
    return max(1.0, register_demand(block_m, block_n, head_dim, num_warps) / MAX_REGS)


def warpgroup_split(rows: int, num_warps: int) -> float:
    """How much slower a tile's products run when its warpgroups share fewer than 64 rows each.

    Hopper's warpgroup MMA (4 warps) takes 64 rows (M) at a time; a CTA of several warpgroups on a tile
    of fewer rows than 64 per warpgroup splits the other dimension instead, so each warpgroup issues
    the same instructions for a fraction of the work: the time grows with 64 * groups / rows. One
    warpgroup on a small tile uses the older MMA and is not covered here (the pair exponent is). The
    backward's 64-token owned tiles on 8 warps are the case it exists for."""
    groups = num_warps // 4
    return max(1.0, 64 * groups / rows) if groups > 1 else 1.0


def uniform_makespan(jobs: int, duration: float, slots: int) -> float:
    """`jobs` equal CTAs on `slots` slots: whole waves, the last one partial."""
    return math.ceil(jobs / slots) * duration if jobs > 0 else 0.0


def list_schedule(durations: np.ndarray, slots: int, with_slots: bool = False):
    """Makespan of greedy list scheduling of `durations` in order onto `slots` identical slots.

    Each job, in order, starts on the slot that frees first. Exact, and vectorised: with the
    slots' free times sorted (f_0 <= f_1 <= ...), the next m jobs go to the m earliest slots, in
    order, as long as f_i <= f_0 + (shortest of those jobs), because then no job of the batch ends
    before the later ones start. So a round moves up to `slots` jobs at once; a spread of finish
    times wider than the shortest job only makes rounds smaller.

    Returns the makespan, or with `with_slots` (makespan, each job's slot, the slot finishing last):
    the jobs on that critical slot make the time linear in the constants, for the fit.
    """
    d = np.asarray(durations, dtype=np.float64)
    n = len(d)
    assign = np.empty(n, dtype=np.int64) if with_slots else None
    if n == 0:
        return (0.0, assign, 0) if with_slots else 0.0
    free = np.zeros(slots, dtype=np.float64)
    ids = np.arange(slots)
    j = 0
    while j < n:
        window = d[j:j + slots]
        reach = free[0] + np.minimum.accumulate(window)
        m = len(window) if free[len(window) - 1] <= reach[-1] else int(np.argmin(free[:len(window)] <= reach))
        free[:m] += window[:m]
        if with_slots:
            assign[j:j + m] = ids[:m]
        j += m
        # slots freeing at the same time (up to rounding) keep their order: which SM gets the next CTA
        # matters once CTAs share SMs (`shared_schedule`), and must not hang on the last bit of a sum
        order = np.argsort(np.round(free * (1e9 / max(float(free.max()), 1e-300))), kind="stable")
        free, ids = free[order], ids[order]
    makespan = float(free[-1])
    return (makespan, assign, int(ids[-1])) if with_slots else makespan


def shared_schedule(durations: np.ndarray, alone: np.ndarray, sms: int, k: int, feats: np.ndarray | None = None):
    """Makespan of CTAs that share their SM: each of the n resident on an SM drains at 1/n of it.

    `durations` are the CTAs' times with all k slots of their SM busy (k x their SM time, or longer
    where they wait for loads: `simulator.pipeline`), in launch order; `alone` their times as the only
    CTA on the SM (the pipeline's floor: a lone CTA speeds up to its own loop's rate, not beyond).
    With n < k residents a CTA runs min(k / n, durations / alone) times faster than with k.

    Exact for this model without an event loop: while every slot is busy the rates are those of
    slot list scheduling (`list_schedule`, slot i on SM i mod sms, the block scheduler's round robin),
    and the last CTA is dispatched before any slot empties (greedy gives every slot a job until
    then). So up to the moment an SM's first slot empties nothing differs; from then on no CTA
    arrives and each SM drains its residents' remaining time on its own: at most k steps, vectorised
    over the SMs.

    With `feats` ([n, F], durations = feats @ coef for some coef) returns (makespan, F-vector) whose
    dot with that coef is the makespan: the critical SM's pieces, the rates held at their values,
    linear in the constants for the fit (as the critical slot is for `list_schedule`).
    """
    d = np.asarray(durations, dtype=np.float64)
    slots = sms * k
    if len(d) == 0:
        return (0.0, np.zeros(0 if feats is None else feats.shape[1])) if feats is not None else 0.0
    span, assign, critical = list_schedule(d, slots, with_slots=True)
    if k == 1:
        if feats is None:
            return span
        return span, feats[assign == critical].sum(axis=0)
    last = np.full(slots, -1, dtype=np.int64)
    used, first_from_end = np.unique(assign[::-1], return_index=True)
    last[used] = len(d) - 1 - first_from_end  # each slot's last CTA
    free = np.bincount(assign, weights=d, minlength=slots).reshape(k, sms).T  # [sms, k], slot i = j * sms + m
    held = last.reshape(k, sms).T
    busy = held >= 0
    ratio = np.ones_like(free)
    ratio[busy] = d[held[busy]] / np.maximum(np.asarray(alone, np.float64)[held[busy]], 1e-300)
    start = free.min(axis=1)
    rem, cap = free - start[:, None], np.maximum(ratio, 1.0)
    ends = start + _drain(rem, cap, k)[0]
    if feats is None:
        return float(ends.max())
    m = int(np.argmax(ends))
    _, order = _drain(rem[m:m + 1], cap[m:m + 1], k, record=True)
    f = np.asarray(feats, np.float64)
    per_slot = np.stack([np.bincount(assign, weights=f[:, c], minlength=slots) for c in range(f.shape[1])], axis=1)
    vec = per_slot[np.arange(k) * sms + m]  # [k, F] the critical SM's slots
    lo = int(np.argmin(free[m]))
    rem = vec - vec[lo]
    out = vec[lo].copy()
    for rate, j, alive in order:
        step = rem[j] / rate[j]
        out += step
        rem[alive] -= rate[alive, None] * step
    return float(ends.max()), out


def _drain(rem: np.ndarray, cap: np.ndarray, k: int, record: bool = False):
    """Per SM (rows), the time until its residents' remaining times (in k-shared units) run out,
    each at min(k / residents, cap); with `record`, the first row's steps (rates, finisher, who ran)."""
    rem = rem.copy()
    rows = np.arange(len(rem))
    total = np.zeros(len(rem))
    steps = []
    scale = max(float(rem.max()), 1e-300) * 1e-12
    alive = rem > scale
    while alive.any():
        n = alive.sum(axis=1)
        rate = np.where(alive, np.minimum(k / np.maximum(n, 1)[:, None], cap), 1.0)
        until = np.where(alive, rem / rate, np.inf)
        j = np.argmin(until, axis=1)
        step = np.where(alive.any(axis=1), until[rows, j], 0.0)
        if record and alive[0].any():
            steps.append((rate[0], int(j[0]), alive[0].copy()))
        rem = np.where(alive, rem - rate * step[:, None], 0.0)
        rem[rows, j] = 0.0
        total += step
        alive = rem > scale
    return total, steps
