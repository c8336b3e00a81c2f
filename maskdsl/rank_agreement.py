"""Ranks agree or fail together: every rank states what it holds, and if any rank differs, all of them raise.

A context-parallel layer built from different specs on two ranks does not fail by itself: the ranks
exchange halos by a plan each computed alone, so a different window gives every rank a wrong result,
and a different grid posts sends and receives of different sizes (gloo aborts the process). Before any
such exchange the ranks all-gather a fixed-size digest of their facts (any backend carries 32 bytes);
only when the digests differ are the facts themselves gathered, so that the error on every rank names
which ranks differ and in what.

Every wait is bounded: a peer that raised before the check (and stays alive) would otherwise leave the
others blocked until the process group's own timeout, which defaults to ten minutes or more.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time

import torch
import torch.distributed as dist


class RanksDisagree(RuntimeError):
    """The ranks of a group hold different layers (or one failed to build its own): none of them runs."""


class RankTimeout(RuntimeError):
    """A peer did not reach a collective step within the layer's timeout (it raised, or runs other code)."""


def agree(facts: dict[str, str], group=None, timeout: float = 30.0, what: str = "the layer") -> None:
    """Return on every rank of `group` when all ranks' `facts` are equal; else raise RanksDisagree on all.

    A rank whose own set-up failed passes {"error": "..."} so its peers fail at once with its reason
    instead of waiting. RankTimeout when some rank does not take part within `timeout` seconds.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = _device(group)
    text = json.dumps(facts, sort_keys=True)
    mine = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(gathered, mine, group=group, async_op=True)
    wait(work, group, timeout, f"{what}: rank {rank} of {world} waited {timeout:g} s for every rank to join the "
                               "check that the ranks hold the same layer")
    if all(torch.equal(g.cpu(), mine.cpu()) for g in gathered):
        return
    every: list = [None] * world
    dist.all_gather_object(every, facts, group=group)  # every rank saw the same digests: all are here
    raise RanksDisagree(f"{what}: the ranks disagree, so none runs (rank {rank} raising): "
                        + describe(every) + "; hint: build it from the same spec, mask and arguments on "
                        "every rank, and call it with the same batch, heads, head_dim, dtype and scale")


def describe(every: list[dict]) -> str:
    """Which ranks differ and in what: each fact that is not the same everywhere, with its values by rank."""
    parts = []
    failed = [(r, f["error"]) for r, f in enumerate(every) if "error" in f]
    for r, error in failed:
        parts.append(f"rank {r} could not build it ({error})")
    if failed:
        return "; ".join(parts)
    keys = list(dict.fromkeys(k for f in every for k in f))
    for key in keys:
        values = [f.get(key, "(missing)") for f in every]
        if len(set(values)) == 1:
            continue
        by_value: dict[str, list[int]] = {}
        for r, v in enumerate(values):
            by_value.setdefault(v, []).append(r)
        parts.append(f"{key} differs: " + ", ".join(f"{_ranks(rs)} {v}" for v, rs in by_value.items()))
    return "; ".join(parts)


def wait(work, group, timeout: float, waiting: str) -> None:
    """Wait for `work` at most `timeout` seconds; RankTimeout saying what was awaited when it does not come.

    gloo bounds the wait itself (and closes the pair, so the group's later calls fail at once rather
    than hang); other backends are polled (their `wait` orders a stream and does not block the host).
    """
    message = (f"{waiting}, in vain: a peer raised before reaching this step or runs other code (its own "
               "error says why); the process group is unusable for this layer now")
    if _backend(group) == "gloo":
        try:
            work.wait(timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as exc:
            if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
                raise RankTimeout(message) from exc
            raise
        return
    deadline = time.monotonic() + timeout
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise RankTimeout(message)
        time.sleep(0.001)
    work.wait()


def _ranks(rs: list[int]) -> str:
    return f"rank {rs[0]} has" if len(rs) == 1 else f"ranks {', '.join(map(str, rs))} have"


def _backend(group) -> str:
    return str(dist.get_backend(group)).lower()


def _device(group) -> torch.device:
    """Where the group's collectives take their tensors (NCCL: this process's GPU)."""
    if "nccl" in _backend(group):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
