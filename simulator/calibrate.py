"""Fit the cost model's per-GPU constants from measured kernel times.

Each measurement is (spec, mask, q_tile, kv_tile, copies = batch x heads, measured ms). The
simulator gives every query tile's full and partial key-tile counts; with the SMs evenly
loaded the time is linear in the constants,

    ms ~ copies / sms * (c_full * sum(full) * s_pair + c_partial * sum(partial) * s_pair + c_tile * Q * s_q),

so a least-squares fit on relative errors (each row divided by its measured time) gives them.
They are stored in units of one full 128x128 tile (c_full = 1) plus `tile_us`, the
microseconds of that unit, so the predicted speedup (a ratio) does not depend on the unit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskdsl.simulator.cost import REFERENCE_TILE, CostModel
from maskdsl.simulator.simulation import simulate


@dataclass(frozen=True)
class Measurement:
    spec: object  # maskdsl.Spec or a path
    mask: str
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    copies: int
    ms: float


def _features(m: Measurement, sms: int, beta: float) -> np.ndarray:
    r = _sim(m)
    q_tokens, kv_tokens = int(np.prod(m.q_tile)), int(np.prod(m.kv_tile))
    pair = (q_tokens * kv_tokens / REFERENCE_TILE**2) ** beta
    return np.array([r.full_tiles * pair, r.partial_tiles * pair, r.q_tiles * (q_tokens / REFERENCE_TILE) ** beta],
                    dtype=np.float64) * m.copies / sms


_SIMS: dict = {}


def _sim(m: Measurement):
    key = (id(m.spec), m.mask, m.q_tile, m.kv_tile)
    if key not in _SIMS:
        _SIMS[key] = simulate(m.spec, m.mask, m.q_tile, m.kv_tile)
    return _SIMS[key]


def fit(measurements: list[Measurement], gpu: str, sms: int = 132, source: str = "") -> dict:
    """A cost entry (gpu_costs.json shape) fitted to the measurements.

    The three constants are a linear least-squares fit on relative error; the tile-size exponent
    beta is the best of a small grid (0.5 .. 1.0) by root-mean-square relative error.
    """
    if len(measurements) < 3:
        raise ValueError(f"fitting three constants needs at least 3 measurements, got {len(measurements)}")
    y = np.array([m.ms * 1000.0 for m in measurements])  # microseconds
    best = None
    for beta in np.linspace(0.5, 1.0, 11):
        a = np.stack([_features(m, sms, beta) for m in measurements]) / y[:, None]
        coef, *_ = np.linalg.lstsq(a, np.ones(len(y)), rcond=None)
        coef = np.clip(coef, 1e-9, None)
        err = float(np.sqrt(np.mean((a @ coef - 1.0) ** 2)))
        if best is None or err < best[0]:
            best = (err, beta, coef)
    _, beta, (c_full, c_partial, c_tile) = best
    return {"c_full": 1.0, "c_partial": float(c_partial / c_full), "c_tile": float(c_tile / c_full), "sms": sms,
            "tile_us": float(c_full), "pair_exponent": float(beta), "head_dim": 128, "source": source}


def evaluate_fit(measurements: list[Measurement], entry: dict, gpu: str) -> list[dict]:
    """Predicted against measured time for each measurement, with the full (load-balanced) model."""
    model = CostModel.from_entry(gpu, entry)
    out = []
    for m in measurements:
        r = simulate(m.spec, m.mask, m.q_tile, m.kv_tile, costs=model)
        q_tokens, kv_tokens = int(np.prod(m.q_tile)), int(np.prod(m.kv_tile))
        full = np.asarray(r.full_per_query_tile, dtype=np.float64)
        partial = np.asarray(r.visits_per_query_tile, dtype=np.float64) - full
        units = model.time(full, partial, q_tokens, kv_tokens, copies=m.copies)
        pred_ms = units * model.tile_us / 1000.0
        out.append({"mask": m.mask, "q_tile": m.q_tile, "kv_tile": m.kv_tile, "measured_ms": m.ms,
                    "predicted_ms": pred_ms, "ratio": m.ms / pred_ms})
    return out


def store(entry: dict, gpu: str, path: str | Path) -> Path:
    """Merge a fitted entry into a cost file (what MASKDSL_GPU_COSTS or CostModel.for_gpu(path=) read)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"gpus": {}}
    data.setdefault("gpus", {})[gpu] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
