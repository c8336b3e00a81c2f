"""Context-parallel masked attention over torch.distributed: each rank fetches only the keys it attends.

The grid is sharded along its outermost dimension (`maskdsl.analysis.shard_plan`): a rank holds the q, k and v
rows of its chunk(s) of frames, `[B, H, L_local, D]`, and gets back its chunk's output. Ring attention
and all-gather (Ulysses) schemes move every key to every rank; a neighborhood mask's queries attend
only a halo of frames around their own, known exactly from the analysis, so that halo is all that
moves (point-to-point, `batch_isend_irecv`). The chunk's own keys are attended first, while the halo is
in flight; each remote segment is one more kernel call over a buffer of just those frames, and the
segments' partial outputs are merged by their log-sum-exps. The backward fetches the same halos
again (nothing O(L) is kept between the passes), and sends the dK/dV rows it computed for another
rank's keys back to their owner, which adds them in a fixed order (deterministic).

Global masks (a sink, a long causal window, full attention) are the same machinery with more
segments: their keys stream through buffers of at most `max_segment_frames` frames, a ring pass with
a bounded buffer. A top-k mask needs every key to select from: its one segment is the whole grid.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist

from maskdsl.analysis.counts import layout_dilation, num_products
from maskdsl.codegen.merge import merge_into
from maskdsl.analysis.shard_plan import ShardPlan, full_plan, shard_plan
from maskdsl.rank_agreement import RanksDisagree, RankTimeout, agree, wait


def plan_for(fn, ranks: int, zigzag: bool = False, max_segment_frames: int | None = None,
             head_dim: int = 128, overlap: bool = True) -> ShardPlan:
    """The shard plan of a compiled mask: chunk edges on every kernel's dimension-0 tiles (the backward's
    default tiles depend on head_dim)."""
    mdef = fn.mask
    shape = mdef.layout.shape
    if not mdef.dynamic and layout_dilation(num_products(mdef.expr, shape), len(shape))[0] > 1:
        raise ValueError(f"mask {mdef.name!r}: dimension 0 is dilated, so its tokens are laid out by dilation "
                         "group rather than as slabs of frames; shard a grid whose outermost dimension is "
                         "undilated (reorder the layout's dimensions)")
    qt, kt = fn.frame_tiles
    bqt, bkt = fn.backward_frame_tiles(head_dim)
    key_unit = math.lcm(kt, bkt)
    chunk_unit = math.lcm(qt, bqt, key_unit)
    if mdef.dynamic:
        return full_plan(shape, ranks, chunk_unit, zigzag)
    return shard_plan(mdef.expr, shape, ranks, chunk_unit, key_unit, zigzag, max_segment_frames, overlap)


def _attend_segment(fn, q, kb, vb, scale: float, out, lse, rows: slice, frames, k_frames, first: bool) -> None:
    """Fold one segment into a chunk's `out`/`lse` (its rows; `rows` are the segment's queries among them,
    `q` their query rows). The chunk's first segment writes the rows itself (the rows it does not reach
    start empty); a later one is merged in place by log-sum-exp (codegen.merge)."""
    if first and (rows.start, rows.stop) != (0, out.shape[2]):
        out.zero_()
        lse.fill_(float("-inf"))
        first = False
    o, l = out[:, :, rows], lse[:, :, rows]
    l_s = torch.empty(o.shape[:3], dtype=torch.float32, device=o.device)  # kernels write contiguous LSE rows
    o_s = o if first else torch.empty_like(o, memory_format=torch.contiguous_format)
    fn.launch_segment(q, kb, vb, scale, o_s, l_s, q_frames=frames, k_frames=k_frames)
    if first:
        l.copy_(l_s)
    else:
        merge_into(o, l, o_s, l_s)


def _segment_rows(plan: ShardPlan, rank: int, c: int, seg) -> slice:
    """The segment's query rows among its chunk's rows."""
    a = plan.chunks[rank][c][0]
    return slice((seg.queries[0] - a) * plan.inner, (seg.queries[1] - a) * plan.inner)


def emulate_rank(fn, plan: ShardPlan, rank: int, q, k, v, scale: float, dout=None):
    """Rank `rank`'s kernel work with no communication, from whole [B, H, L, D] tensors on one device: its
    segments' buffers are views of the whole K and V. For measuring a rank's compute on one GPU (weak
    scaling without the GPUs); returns its local output, and with `dout` its local dq and the whole-size
    dk, dv it contributes."""
    n = plan.inner
    out, grads = [], []

    def buffer(t, seg):  # a buffer of several pieces is a copy on a real rank (torch.cat of what arrived)
        if len(seg.pieces) == 1:
            return t[:, :, seg.frames[0] * n:seg.frames[1] * n]
        return torch.cat([t[:, :, p.frames[0] * n:p.frames[1] * n] for p in seg.pieces], dim=2)

    dk = dv = None
    if dout is not None:
        dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    for c, (a, b) in enumerate(plan.chunks[rank]):
        o_c = torch.zeros_like(q[:, :, a * n:b * n])  # what a chunk no segment reaches keeps
        l_c = torch.full(o_c.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        for i, seg in enumerate(plan.segments[rank][c]):
            qa, qb = seg.queries
            _attend_segment(fn, q[:, :, qa * n:qb * n], buffer(k, seg), buffer(v, seg), scale, o_c, l_c,
                            _segment_rows(plan, rank, c, seg), seg.queries, seg.frames, first=i == 0)
        out.append(o_c)
        if dout is not None:
            dq_c = torch.zeros_like(o_c, dtype=torch.float32)
            for seg in plan.segments[rank][c]:
                qa, qb = seg.queries
                keys = slice(seg.frames[0] * n, seg.frames[1] * n)
                local = _segment_rows(plan, rank, c, seg)
                rows = slice(qa * n, qb * n)
                dq_s, dk_s, dv_s = torch.empty_like(q[:, :, rows]), torch.empty_like(k[:, :, keys]), torch.empty_like(v[:, :, keys])
                fn.launch_backward_segment(q[:, :, rows], buffer(k, seg), buffer(v, seg), o_c[:, :, local],
                                           l_c[:, :, local], dout[:, :, rows], scale, dq_s, dk_s, dv_s,
                                           q_frames=(qa, qb), k_frames=seg.frames)
                dq_c[:, :, local] += dq_s
                dk[:, :, keys] += dk_s
                dv[:, :, keys] += dv_s
            grads.append(dq_c)
    out = torch.cat(out, dim=2)
    if dout is None:
        return out
    return out, torch.cat(grads, dim=2).to(q.dtype), dk, dv


class ContextParallelAttention:
    """`attn(q, k, v)` on this rank's local rows; differentiable. Build it on every rank of `group`.

    `spec`/`mask` as for `maskdsl.compile` (a path, text or Spec, and the mask's name); `zigzag`
    gives each rank chunks r and 2R-1-r of 2R (balances a causal mask); `config`/`backward_config`
    choose the kernels' tiles (the tuning database's, else the simulator's best), `deterministic` the
    backward's dQ mode (as for `maskdsl.compile`); chunk edges fall on
    every kernel's dimension-0 tiles. `overlap` (shard_plan): attend the own frames while the halo
    travels (one more call per halo), or join halo and own frames into one buffer and one call.

    The ranks agree or fail together: construction, and the first call with each batch/heads/head_dim/
    dtype/scale, check that every rank holds the same layer (RanksDisagree, on every rank, names the ranks
    and what differs), and `timeout` seconds bound each wait on a peer (RankTimeout; on gloo the halo
    exchange's waits too).
    """

    def __init__(self, spec, mask: str, group=None, zigzag: bool = False, config=None, backward_config=None,
                 max_segment_frames: int | None = None, head_dim: int | None = None, overlap: bool = True,
                 timeout: float = 60.0, deterministic: bool | None = None):
        from maskdsl.api import compile as compile_mask

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                               "first (torchrun sets the environment it reads)")
        if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.timeout = float(timeout)  # bounds every wait on a peer (the agreement checks; gloo's exchange too)
        self._agreed_call = None  # the call signature every rank last agreed on
        self._host_waits = "gloo" in str(dist.get_backend(group)).lower()
        failure = None
        try:
            self.fn = compile_mask(spec, mask, config, backward_config, deterministic=deterministic)
            attention = _attention(spec, mask)
            self.head_dim = head_dim or (attention.head_dim if attention else 128)
            self.plan: ShardPlan = plan_for(self.fn, self.ranks, zigzag, max_segment_frames, self.head_dim, overlap)
            facts = self._layer_facts(zigzag, overlap, max_segment_frames)
        except Exception as exc:  # noqa: BLE001 - the peers are told, then this rank raises its own error
            failure = exc
            facts = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]}
        # Ranks holding different layers would exchange by different plans: a wrong result or a crash.
        _agree_or_raise(facts, failure, group, self.timeout, "ContextParallelAttention")
        self.received_bytes = 0  # K/V bytes this rank received in its last forward (checked against the plan)

    def _layer_facts(self, zigzag: bool, overlap: bool, max_segment_frames: int | None) -> dict[str, str]:
        """What must be the same on every rank for the exchange to be right (readable, for the error)."""
        mdef = self.fn.mask
        plan_text = repr((self.plan.chunk_unit, self.plan.key_unit, self.plan.chunks, self.plan.segments))
        return {"mask": f"{mdef.name} = {mdef.expr.fmt()}", "grid": f"grid({', '.join(map(str, mdef.layout.shape))})",
                "world size": str(self.ranks), "zigzag": str(zigzag), "overlap": str(overlap),
                "max_segment_frames": str(max_segment_frames), "head_dim": str(self.head_dim),
                "frame tiles (forward, backward)": f"{self.fn.frame_tiles}, {self.fn.backward_frame_tiles(self.head_dim)}",
                "backward": self.fn.backward_config.key() if getattr(self.fn, "backward_config", None) else "top-k",
                "shard plan": hashlib.sha256(plan_text.encode()).hexdigest()[:16]}

    # ---- moving whole tensors between the global and the sharded layouts (examples, tests) ----
    def local_rows(self, rank: int | None = None) -> int:
        return self.plan.local_frames(self.rank if rank is None else rank) * self.plan.inner

    def shard(self, x: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """This rank's rows of a whole [B, H, L, D] tensor (its chunks, concatenated)."""
        r = self.rank if rank is None else rank
        n = self.plan.inner
        return torch.cat([x[:, :, a * n:b * n] for a, b in self.plan.chunks[r]], dim=2)

    def unshard(self, x: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every rank's local rows (an all-gather; for checks and examples)."""
        most = max(self.local_rows(r) for r in range(self.ranks))
        padded = torch.zeros(*x.shape[:2], most, *x.shape[3:], dtype=x.dtype, device=x.device)
        padded[:, :, :x.shape[2]] = x
        parts = [torch.empty_like(padded) for _ in range(self.ranks)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        n = self.plan.inner
        out = torch.empty(*x.shape[:2], self.plan.shape[0] * n, *x.shape[3:], dtype=x.dtype, device=x.device)
        for r, part in enumerate(parts):
            for c, (a, b) in enumerate(self.plan.chunks[r]):
                off = self.plan.chunk_offset(r, c)
                out[:, :, a * n:b * n] = part[:, :, off:off + (b - a) * n]
        return out

    # ---- the attention ----
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 return_lse: bool = False):
        failure = None
        try:
            self._check_local(q, k, v)
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        except Exception as exc:  # noqa: BLE001
            if self._agreed_call is not None:
                raise  # the peers run on (documented): only the first call is checked by all ranks
            failure = exc
        signature = None if failure else _call_signature(q, k, v, scale)
        if failure or signature != self._agreed_call:
            # Checked on the first call and whenever this rank's call changes: a cheap host-side compare
            # otherwise (each check is a collective, and on NCCL a device-to-host copy).
            facts = {"error": f"{type(failure).__name__}: {str(failure).splitlines()[0]}"[:500]} if failure else \
                dict(zip(("q", "k", "v", "device", "scale"), signature))
            _agree_or_raise(facts, failure, self.group, self.timeout, "ContextParallelAttention call")
            self._agreed_call = signature
        out, lse = _Attention.apply(q, k, v, self, scale)
        return (out, lse) if return_lse else out

    def _check_local(self, q, k, v) -> None:
        want = self.local_rows()
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[2] != want:
                raise ValueError(f"{name} must be this rank's local rows [B, H, {want}, D] (rank {self.rank} "
                                 f"holds frames {self.plan.chunks[self.rank]} of {self.plan.shape[0]}); got "
                                 f"{tuple(t.shape)}; hint: ContextParallelAttention.shard(x) cuts a whole tensor")
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"q has head_dim {q.shape[-1]} but this attention was planned for {self.head_dim} "
                             f"(its backward tiles, hence chunk edges, depend on it); pass head_dim={q.shape[-1]}")

    def exchange(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """The forward's K/V exchange alone, with no attention: what the link costs (benchmarks time it
        against the forward it hides behind). Returns the bytes this rank received."""
        self.received_bytes = 0
        for _ in self._segments_in_order([k, v], count=True):
            pass
        return self.received_bytes

    def _chunk(self, c: int) -> slice:
        """Chunk c's local rows."""
        a, b = self.plan.chunks[self.rank][c]
        off = self.plan.chunk_offset(self.rank, c)
        return slice(off, off + (b - a) * self.plan.inner)

    def _buffer(self, seg, tensors, received):
        """The segment's key buffer(s): own pieces are views of the local rows, remote ones arrived."""
        parts = []
        for i, piece in enumerate(seg.pieces):
            if piece.source == self.rank:
                a, b = self.plan.piece_rows(piece)
                parts.append([t[:, :, a:b] for t in tensors])
            else:
                parts.append(received[i])
        if len(parts) == 1:
            return parts[0]
        return [torch.cat([p[j] for p in parts], dim=2) for j in range(len(tensors))]

    def _post(self, step: int, tensors) -> tuple[list, dict]:
        """Start step `step` of the exchange: send what others' step-th segments need from this rank,
        receive this rank's own step-th segment's remote pieces. Returns (works, {piece index: tensors})."""
        plan, r = self.plan, self.rank
        ops, received = [], {}
        for dest, index, piece in plan.sends(r, step):
            a, b = plan.piece_rows(piece)
            for j, t in enumerate(tensors):
                ops.append(dist.P2POp(dist.isend, t[:, :, a:b].contiguous(), _peer(dest, self.group), self.group,
                                      tag=_tag(step, index, j)))
        steps = plan.steps(r)
        if step < len(steps):
            c, i = steps[step]
            for index, piece in enumerate(plan.segments[r][c][i].pieces):
                if piece.source == r:
                    continue
                rows = (piece.frames[1] - piece.frames[0]) * plan.inner
                bufs = [t.new_empty(*t.shape[:2], rows, *t.shape[3:]) for t in tensors]
                received[index] = bufs
                for j, buf in enumerate(bufs):
                    ops.append(dist.P2POp(dist.irecv, buf, _peer(piece.source, self.group), self.group,
                                          tag=_tag(step, index, j)))
        return (dist.batch_isend_irecv(ops) if ops else []), received

    def _segments_in_order(self, tensors, count: bool = False):
        """Yield (chunk, segment, key buffers): the local segments first, then each exchange step's,
        the next step's transfer already posted while this one is attended."""
        plan, r = self.plan, self.rank
        pending = self._post(0, tensors) if plan.step_count() else None
        for c, segs in enumerate(plan.segments[r]):
            for seg in segs:
                if not seg.remote(r):
                    yield c, seg, self._buffer(seg, tensors, {})
        steps = plan.steps(r)
        for step in range(plan.step_count()):
            works, received = pending
            self._wait(works, f"exchange step {step}'s keys")
            pending = self._post(step + 1, tensors) if step + 1 < plan.step_count() else None
            self.received_bytes += count * sum(t.numel() * t.element_size() for bufs in received.values() for t in bufs)
            if step < len(steps):
                c, i = steps[step]
                seg = plan.segments[r][c][i]
                yield c, seg, self._buffer(seg, tensors, received)

    def forward(self, q, k, v, scale: float):
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        seen = [False] * len(self.plan.chunks[self.rank])
        self.received_bytes = 0
        for c, seg, (kb, vb) in self._segments_in_order([k, v], count=True):
            chunk = self._chunk(c)
            _attend_segment(self.fn, q[:, :, self._queries(c, seg)[0]], kb, vb, scale, out[:, :, chunk],
                            lse[:, :, chunk], _segment_rows(self.plan, self.rank, c, seg), seg.queries, seg.frames,
                            first=not seen[c])
            seen[c] = True
        for c, done in enumerate(seen):
            if not done:  # no query of the chunk attends any key
                out[:, :, self._chunk(c)] = 0
                lse[:, :, self._chunk(c)] = float("-inf")
        return out, lse

    def _queries(self, c: int, seg) -> tuple[slice, tuple[int, int]]:
        """The local rows and frames of chunk c's queries that attend segment `seg`."""
        off = self.plan.chunk_offset(self.rank, c)
        rows = _segment_rows(self.plan, self.rank, c, seg)
        return slice(off + rows.start, off + rows.stop), seg.queries

    def backward(self, q, k, v, out, lse, dout, scale: float):
        plan, r = self.plan, self.rank
        dq, dk, dv = _RowSum(q), _RowSum(k), _RowSum(v)
        returns = []  # (works, [(rows, dk piece, dv piece)]) of the dK/dV sent back to this rank
        steps = plan.steps(r)
        step = -1
        for c, seg, (kb, vb) in self._segments_in_order([k, v]):
            sl, frames = self._queries(c, seg)
            dq_s, dk_s, dv_s = torch.empty_like(q[:, :, sl]), torch.empty_like(kb), torch.empty_like(vb)
            self.fn.launch_backward_segment(q[:, :, sl], kb, vb, out[:, :, sl], lse[:, :, sl].contiguous(),
                                            dout[:, :, sl], scale, dq_s, dk_s, dv_s, q_frames=frames,
                                            k_frames=seg.frames)
            dq.add(sl.start, dq_s)
            remote = seg.remote(r)
            if remote:
                step += 1
            ops, first = [], 0
            for index, piece in enumerate(seg.pieces):
                n = (piece.frames[1] - piece.frames[0]) * plan.inner
                part = slice(first, first + n)
                first += n
                if piece.source == r:
                    a, _ = plan.piece_rows(piece)
                    dk.add(a, dk_s[:, :, part])
                    dv.add(a, dv_s[:, :, part])
                else:
                    for j, t in enumerate((dk_s, dv_s)):
                        ops.append(dist.P2POp(dist.isend, t[:, :, part].contiguous(), _peer(piece.source, self.group),
                                              self.group, tag=_tag(step, index, 2 + j)))
            if remote:
                returns.append(self._post_returns(step, ops, k, v))
        for step in range(len(steps), plan.step_count()):  # steps where only others send this rank's keys back
            returns.append(self._post_returns(step, [], k, v))
        for i, (works, adds) in enumerate(returns):
            self._wait(works, f"the dK/dV returns of exchange step {i}")
            for (a, _), gk, gv in adds:
                dk.add(a, gk)
                dv.add(a, gv)
        return dq.result(), dk.result(), dv.result()

    def _wait(self, works, what: str) -> None:
        """Wait for posted transfers. On gloo the host blocks, so the wait is bounded by `timeout` (a peer
        that raised leaves a clear error, not a hang); NCCL orders them on the stream, and a lost peer is
        its watchdog's to report (the process group's timeout)."""
        for w in works:
            if self._host_waits:
                wait(w, self.group, self.timeout, f"ContextParallelAttention: rank {self.rank} waited "
                                                  f"{self.timeout:g} s for {what}")
            else:
                w.wait()

    def _post_returns(self, step: int, ops: list, k, v):
        """Post this step's dK/dV returns: `ops` sends this rank's, plus receives of what the ranks this
        rank sent keys to at this step computed for them."""
        plan = self.plan
        adds = []
        for dest, index, piece in plan.sends(self.rank, step):
            a, b = plan.piece_rows(piece)
            bufs = [torch.empty(*t.shape[:2], b - a, *t.shape[3:], dtype=t.dtype, device=t.device) for t in (k, v)]
            for j, buf in enumerate(bufs):
                ops.append(dist.P2POp(dist.irecv, buf, _peer(dest, self.group), self.group,
                                      tag=_tag(step, index, 2 + j)))
            adds.append(((a, b), *bufs))
        return (dist.batch_isend_irecv(ops) if ops else []), adds


class _RowSum:
    """A gradient summed over row ranges of [B, H, rows, D], in the input's dtype, in a fixed order.

    The first part to reach a row is copied in, later ones added (PyTorch adds two bf16 tensors in
    float32 and rounds once); rows no part reaches are zero. A float32 buffer of the whole local size
    (zeroed, added into, cast back) costs about 10 bytes per element per gradient: at 512k tokens of 8
    heads, ~10 ms of a 100 ms backward, for rows that, but for the halo, get one part each.
    """

    def __init__(self, like: torch.Tensor):
        self.t = torch.empty_like(like, memory_format=torch.contiguous_format)
        self.done: list[tuple[int, int]] = []  # disjoint, sorted row ranges already written

    def add(self, start: int, part: torch.Tensor) -> None:
        stop = start + part.shape[2]
        cut = start
        for a, b in self.done:  # rows below each written range are new (copied), rows inside it are added
            if b <= cut or a >= stop:
                continue
            if a > cut:
                self.t[:, :, cut:a].copy_(part[:, :, cut - start:a - start])
            lo, hi = max(a, cut), min(b, stop)
            self.t[:, :, lo:hi].add_(part[:, :, lo - start:hi - start])
            cut = hi
        if cut < stop:
            self.t[:, :, cut:stop].copy_(part[:, :, cut - start:])
        self.done = _union(self.done, (start, stop))

    def result(self) -> torch.Tensor:
        cut = 0
        for a, b in self.done:
            if a > cut:
                self.t[:, :, cut:a].zero_()
            cut = b
        if cut < self.t.shape[2]:
            self.t[:, :, cut:].zero_()
        return self.t


def _union(ranges: list[tuple[int, int]], new: tuple[int, int]) -> list[tuple[int, int]]:
    """Sorted disjoint ranges with `new` merged in."""
    out = []
    a, b = new
    for x, y in sorted(ranges):
        if y < a or x > b:
            out.append((x, y))
        else:
            a, b = min(a, x), max(b, y)
    return sorted(out + [(a, b)])


def _agree_or_raise(facts: dict, failure: Exception | None, group, timeout: float, what: str) -> None:
    """Agree with the peers; a rank whose own set-up failed tells them why, then raises its own error."""
    if failure is None:
        agree(facts, group, timeout, what)
        return
    try:
        agree(facts, group, timeout, what)
    except (RanksDisagree, RankTimeout):
        pass  # the peers were told (or are gone); this rank's own error is the one to see
    raise failure


def _call_signature(q, k, v, scale: float) -> tuple[str, ...]:
    """What a call must share with every rank's: shapes but the local rows (chunks differ in size), dtypes,
    device type, scale."""
    def tensor(t):
        shape = list(t.shape)
        shape[2] = "local"
        return f"[{', '.join(map(str, shape))}] {str(t.dtype).removeprefix('torch.')}"

    return tensor(q), tensor(k), tensor(v), q.device.type, repr(scale)


def _attention(spec, mask: str):
    from maskdsl.api import resolve

    return resolve(spec, mask)[2]


def _peer(rank: int, group) -> int:
    """The global rank of `rank` of `group` (P2POp takes global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def _tag(step: int, piece: int, kind: int) -> int:
    """One tag per (step, piece, K/V/dK/dV): gloo matches by tag; NCCL ignores it."""
    return (step * 1024 + piece) * 4 + kind


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, runner: ContextParallelAttention, scale: float):
        out, lse = runner.forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.runner, ctx.scale = runner, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.runner.backward(q, k, v, out, lse, dout.contiguous(), ctx.scale)
        return dq, dk, dv, None, None
