"""The calibrated cost model: tile counts -> predicted kernel time, per GPU.

One program of the kernel handles one query tile of one (batch, head). Its time is

    t_q = full_q * c_full' + partial_q * c_partial' + c_tile'

(full key tiles run without the mask predicate, partial ones with it, plus a fixed per-query-tile
cost for loading Q and writing O and the log-sum-exp). The primes are the per-GPU constants
scaled to the tile size, since the work of a tile pair grows with BLOCK_M * BLOCK_N and the
per-query-tile work with BLOCK_M:

    c_full' = c_full * (V_q * V_k) / 128^2,  c_partial' = c_partial * (V_q * V_k) / 128^2,
    c_tile' = c_tile * V_q / 128           (V = tokens per tile, padded: prod(tile))

The batch * heads copies of every t_q are scheduled longest-first onto `sms` bins (greedy:
each program goes to the least-loaded SM), and the predicted time is the busiest SM's load:
that is where a few heavy query tiles (sinks, dense rows) show up as imbalance. The dense
baseline is the same kernel with every key tile full (NK * c_full' + c_tile' per query tile),
and predicted_speedup = dense time / predicted time.

Constants live in gpu_costs.json in units of "one full 128x128 tile"; `tile_us`, when measured,
turns units into microseconds. A fitted override is a JSON file of the same shape, passed as
`path` or named by the MASKDSL_GPU_COSTS environment variable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_GPU = "NVIDIA H100 80GB HBM3"
REFERENCE_TILE = 128  # the constants are for 128-token query and key tiles
_BUILTIN = Path(__file__).with_name("gpu_costs.json")


@dataclass(frozen=True)
class CostModel:
    """Per-GPU constants (units: one full 128x128 tile) and where they came from."""

    name: str
    c_full: float
    c_partial: float
    c_tile: float
    sms: int
    tile_us: float | None = None
    source: str = ""
    pair_exponent: float = 1.0  # cost of a tile pair ~ (V_q V_k)^beta: small tiles use the tensor cores worse

    @property
    def placeholder(self) -> bool:
        return "PLACEHOLDER" in self.source.upper()

    @classmethod
    def for_gpu(cls, name: str | None = None, path: str | os.PathLike | None = None) -> "CostModel":
        """Constants for GPU `name` (as torch.cuda.get_device_name says it; a unique substring works).

        Entries from `path` (or $MASKDSL_GPU_COSTS) override the built-in ones, so fitted constants
        win over the shipped defaults.
        """
        table = _load(_BUILTIN)
        fitted = fitted_path()
        if fitted.exists():  # what the last `maskdsl bench --suite` on this machine fitted
            table.update(_load(fitted))
        override = path or os.environ.get("MASKDSL_GPU_COSTS")
        if override:
            table.update(_load(Path(override)))
        name = name or DEFAULT_GPU
        key = _match(name, table)
        return cls.from_entry(key, table[key])

    @classmethod
    def from_entry(cls, name: str, entry: dict) -> "CostModel":
        try:
            model = cls(name=name, c_full=float(entry["c_full"]), c_partial=float(entry["c_partial"]),
                        c_tile=float(entry["c_tile"]), sms=int(entry["sms"]),
                        tile_us=None if entry.get("tile_us") is None else float(entry["tile_us"]),
                        source=str(entry.get("source", "")), pair_exponent=float(entry.get("pair_exponent", 1.0)))
        except KeyError as exc:
            raise ValueError(f"cost entry for {name!r} lacks {exc.args[0]!r}; "
                             "hint: give c_full, c_partial, c_tile and sms") from None
        if model.sms <= 0 or min(model.c_full, model.c_partial, model.c_tile) < 0:
            raise ValueError(f"cost entry for {name!r} needs sms > 0 and non-negative constants, got {entry}")
        return model

    def scaled(self, q_tokens: int, kv_tokens: int) -> tuple[float, float, float]:
        """(c_full', c_partial', c_tile') for tiles of `q_tokens` x `kv_tokens` (see the module doc)."""
        pair = (q_tokens * kv_tokens / REFERENCE_TILE**2) ** self.pair_exponent
        return self.c_full * pair, self.c_partial * pair, self.c_tile * (q_tokens / REFERENCE_TILE) ** self.pair_exponent

    def query_tile_times(self, full: np.ndarray, partial: np.ndarray, q_tokens: int, kv_tokens: int) -> np.ndarray:
        cf, cp, ct = self.scaled(q_tokens, kv_tokens)
        return np.asarray(full, dtype=np.float64) * cf + np.asarray(partial, dtype=np.float64) * cp + ct

    def time(self, full: np.ndarray, partial: np.ndarray, q_tokens: int, kv_tokens: int, copies: int = 1) -> float:
        """Predicted time (units) of the kernel: busiest SM after longest-first scheduling."""
        values, counts = np.unique(self.query_tile_times(full, partial, q_tokens, kv_tokens), return_counts=True)
        return lpt_makespan(values, counts * copies, self.sms)

    def dense_time(self, q_tiles: int, k_tiles: int, q_tokens: int, kv_tokens: int, copies: int = 1) -> float:
        """The same kernel with no sparsity: every query tile visits every key tile, all full."""
        cf, _, ct = self.scaled(q_tokens, kv_tokens)
        return lpt_makespan(np.array([k_tiles * cf + ct]), np.array([q_tiles * copies]), self.sms)


def fitted_path() -> Path:
    """Where `maskdsl bench --suite` stores the constants it fits, next to the tuning database."""
    root = os.environ.get("MASKDSL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "maskdsl")
    return Path(root) / "gpu_costs.json"


def lpt_makespan(values: np.ndarray, counts: np.ndarray, bins: int) -> float:
    """Makespan of longest-first greedy scheduling of `counts[i]` jobs of length `values[i]`.

    Exact, and fast for many equal jobs: `r` equal jobs of length v go to the `r` least-loaded
    bins as long as those all sit below (least load + v), which is what one-at-a-time greedy does.
    """
    loads = np.zeros(bins, dtype=np.float64)
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    for v, c in zip(np.asarray(values, dtype=np.float64)[order], np.asarray(counts, dtype=np.int64)[order]):
        c = int(c)
        if v <= 0 or c <= 0:
            continue
        while c > 0:
            loads.sort()
            if loads[-1] < loads[0] + v:  # every bin takes one before any takes two
                rounds, c = divmod(c, bins)
                loads += rounds * v
                loads[:c] += v
                c = 0
            else:
                r = min(c, int(np.searchsorted(loads, loads[0] + v, side="left")))
                loads[:r] += v
                c -= r
    return float(loads.max())


def _load(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"cost file {path} does not exist; hint: pass the JSON the benchmark wrote") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"cost file {path} is not valid JSON: {exc}") from None
    table = data.get("gpus", data) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"cost file {path} must map GPU names to entries (optionally under \"gpus\")")
    return {k: v for k, v in table.items() if isinstance(v, dict)}


def _match(name: str, table: dict) -> str:
    if name in table:
        return name
    lowered = {k.lower(): k for k in table}
    if name.lower() in lowered:
        return lowered[name.lower()]
    hits = [k for k in table if name.lower() in k.lower() or k.lower() in name.lower()]
    if len(hits) == 1:
        return hits[0]
    known = ", ".join(sorted(table))
    what = "matches several entries" if hits else "has no cost constants"
    raise KeyError(f"GPU {name!r} {what}; known: {known}. Hint: add an entry to a JSON file and pass it "
                   "as path= (or $MASKDSL_GPU_COSTS)")
