"""Decode against a KV cache (codegen.decode, docs/SERVING.md), through Triton's interpreter: every new
token's output and LSE against the float64 reference of the whole sequence (maskdsl.harness.reference),
taken at the new tokens' rows; caches poisoned past each length and in unused pages, outputs poisoned."""

from __future__ import annotations

import re

import pytest
import torch

import maskdsl
from maskdsl.codegen.decode import DecodeError, decoder
from maskdsl.harness.reference import reference_attention

NAN = float("nan")

SPECS = {
    # a causal window with sinks, made causal: the StreamingLLM mask at a small size
    "window_sinks": ("grid(192)", "(sliding_window(24, causal=true) | sink(3)) & causal"),
    "causal": ("grid(96)", "causal"),
    "dilated": ("grid(160)", "neighborhood(window=9, dilation=3, causal=true)"),
    "strided": ("grid(128)", "neighborhood(window=16, stride=4, causal=true)"),
    "union": ("grid(200)", "sliding_window(8, causal=true) | (neighborhood(window=12, dilation=5, causal=true) "
                           "& causal) | sink(2) & causal"),
    # rows past the sinks' reach see nothing: output 0, LSE -inf
    "empty_rows": ("grid(64)", "sliding_window(4, causal=true) & (sink(2) & causal)"),
    # an image decoded a row at a time: causal over rows, a window along each row
    "image_rows": ("grid(12, 8)", "neighborhood(window=(3, 5), causal=(true, false))"),
    # a video decoded a frame at a time: causal in time, a neighborhood in space
    "video_frames": ("grid(6, 4, 4)", "neighborhood(window=(2, 3, 3), causal=(true, false, false)) | sink(5) & causal"),
}


def spec_of(name: str):
    grid, expr = SPECS[name]
    return maskdsl.parse(f"layout g = {grid}\nmask m = {expr}\n"), "m"


def sequence(spec, heads: int, kv_heads: int, head_dim: int, batch: int, dtype, gen):
    tokens = spec.mask("m").layout.tokens
    q = torch.randn(batch, heads, tokens, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, tokens, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, tokens, head_dim, generator=gen).to(dtype)
    return q, k, v


def new_rows(t: torch.Tensor, lens: list[int], q_len: int) -> torch.Tensor:
    return torch.stack([t[b, :, n - q_len:n] for b, n in enumerate(lens)])


def contiguous_cache(k, v, lens, capacity):
    """[B, H_kv, capacity, D] holding each sequence's first lens[b] tokens, NaN past them."""
    kc = torch.full((*k.shape[:2], capacity, k.shape[3]), NAN, dtype=k.dtype)
    vc = kc.clone()
    for b, n in enumerate(lens):
        kc[b, :, :n], vc[b, :, :n] = k[b, :, :n], v[b, :, :n]
    return kc, vc


def paged_cache(k, v, lens, page_size, max_pages, gen):
    """A pool of shuffled pages (NaN where nothing is cached, a few spare pages) and the page table."""
    batch, kv_heads, _, dim = k.shape
    need = [-(-n // page_size) for n in lens]
    pool = sum(need) + 3
    order = torch.randperm(pool, generator=gen).tolist()
    kc = torch.full((pool, kv_heads, page_size, dim), NAN, dtype=k.dtype)
    vc = kc.clone()
    table = torch.full((batch, max_pages), 10**6, dtype=torch.int32)  # entries past a sequence's pages: junk
    for b, n in enumerate(lens):
        for j in range(need[b]):
            page = order.pop()
            table[b, j] = page
            rows = slice(j * page_size, min(n, (j + 1) * page_size))
            span = rows.stop - rows.start
            kc[page, :, :span] = k[b, :, rows]
            vc[page, :, :span] = v[b, :, rows]
    return kc, vc, table


def check(spec, q, k, v, lens, q_len, got, lse, atol):
    ref, ref_lse = reference_attention(q, k, v, spec, "m", return_lse=True)
    want, want_lse = new_rows(ref, lens, q_len), new_rows(ref_lse, lens, q_len)
    assert not got.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=atol, rtol=0)  # -inf where the reference has it


def random_lens(gen, batch, q_len, tokens, spec_name):
    """Lengths at which every new token's keys are in the cache: a multiple of the frame or row for
    the grids decoded a frame or a row at a time, anything from q_len for the 1-D masks."""
    step = {"image_rows": 8, "video_frames": 16}.get(spec_name, 1)
    lo = -(-q_len // step)
    return [int(x) * step for x in torch.randint(lo, tokens // step + 1, (batch,), generator=gen)]


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("paged", [0, 8, 64])  # page size (0: contiguous); 64 holds a whole key tile
def test_matches_the_reference_at_random_lengths(name, paged, gen):
    spec, _ = spec_of(name)
    tokens = spec.mask("m").layout.tokens
    q_len = {"image_rows": 8, "video_frames": 16}.get(name, 1 + int(torch.randint(0, 4, (1,), generator=gen)))
    heads, kv_heads = (6, 2) if paged else (3, 1)  # GQA with odd group and head counts
    q, k, v = sequence(spec, heads, kv_heads, 16, 3, torch.float32, gen)
    lens = random_lens(gen, 3, q_len, tokens, name)
    qn = new_rows(q, lens, q_len)
    fn = decoder(spec.mask("m"))
    if paged:
        kc, vc, table = paged_cache(k, v, lens, paged, -(-tokens // paged) + 1, gen)
    else:
        (kc, vc), table = contiguous_cache(k, v, lens, tokens + 5), None
    for splits in (1, 3):
        out = torch.full_like(qn, NAN)
        got, lse = fn(qn, kc, vc, torch.tensor(lens, dtype=torch.int32), table, num_splits=splits,
                      return_lse=True, out=out)
        assert got is out
        check(spec, q, k, v, lens, q_len, got, lse, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_with_gqa_packing_and_many_splits(dtype, gen):
    spec, _ = spec_of("window_sinks")
    q, k, v = sequence(spec, 8, 2, 32, 2, dtype, gen)
    lens = [190, 47]
    kc, vc, table = paged_cache(k, v, lens, 16, 13, gen)
    got, lse = decoder(spec.mask("m"))(new_rows(q, lens, 2), kc, vc, torch.tensor(lens, dtype=torch.int32), table,
                                       num_splits=5, return_lse=True)
    assert got.dtype == dtype
    check(spec, q, k, v, lens, 2, got, lse, 2e-2)


def test_empty_rows_give_zero_and_minus_infinity(gen):
    spec, _ = spec_of("empty_rows")
    q, k, v = sequence(spec, 2, 1, 16, 1, torch.float32, gen)
    kc, vc = contiguous_cache(k, v, [40], 64)
    got, lse = decoder(spec.mask("m"))(new_rows(q, [40], 2), kc, vc, torch.tensor([40], dtype=torch.int32),
                                       num_splits=2, return_lse=True)
    assert (got == 0).all() and (lse == float("-inf")).all()


def test_steps_decode_one_token_at_a_time(gen):
    """A generation loop: the cache grows by one token per step, every step matches the reference."""
    spec, _ = spec_of("window_sinks")
    q, k, v = sequence(spec, 4, 2, 16, 2, torch.float32, gen)
    ref = reference_attention(q, k, v, spec, "m")
    fn = decoder(spec.mask("m"))
    start = [20, 29]
    kc, vc = contiguous_cache(k, v, [192, 192], 192)
    for step in range(4):
        lens = [n + step for n in start]
        got = fn(new_rows(q, lens, 1), kc, vc, torch.tensor(lens, dtype=torch.int32), num_splits=2)
        torch.testing.assert_close(got.double(), new_rows(ref, lens, 1), atol=1e-5, rtol=0)


def test_lengths_change_no_launch_argument(monkeypatch):
    """What the kernels are specialised on (grid, constexprs, integer and float arguments) is the same at
    every length: growing caches never recompile, and a captured graph replays at new lengths."""
    from maskdsl.codegen.decode import kernel

    seen: dict[str, set] = {"decode_split": set(), "decode_merge": set()}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                numbers = tuple(a for a in args if isinstance(a, (int, float)))
                seen[self.name].add((grid, numbers, tuple(sorted((k, repr(v)) for k, v in kwargs.items()))))
            return launch

    for name in seen:
        monkeypatch.setattr(kernel, name, Recorder(name))
    spec, _ = spec_of("window_sinks")
    fn = decoder(spec.mask("m"))
    q = torch.zeros(2, 4, 1, 16)
    kc = torch.zeros(2, 2, 192, 16)
    plans = len(fn._plans)
    for lens in ([1, 1], [16, 17], [32, 191], [64, 128], [192, 100]):
        fn(q, kc, kc, torch.tensor(lens, dtype=torch.int32), num_splits=2)
    assert len(seen["decode_split"]) == 1 and len(seen["decode_merge"]) == 1, seen
    assert len(fn._plans) <= plans + 1  # one checked plan serves every length


def _call(fn, **over):
    args = dict(q=torch.zeros(2, 4, 1, 16), k_cache=torch.zeros(2, 2, 32, 16), v_cache=torch.zeros(2, 2, 32, 16),
                cache_seqlens=torch.tensor([5, 6], dtype=torch.int32), page_table=None)
    args.update(over)
    return fn(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("cache_seqlens"),
              args.pop("page_table"), **args)


@pytest.mark.parametrize("over, words", [
    ({"q": torch.zeros(2, 4, 1, 16, dtype=torch.float64)}, "q.dtype is torch.float64"),
    ({"k_cache": torch.zeros(2, 2, 32, 16, dtype=torch.float16)}, "k_cache.dtype is torch.float16"),
    ({"q": torch.zeros(2, 4, 17, 16)}, "decode takes 1 to 16"),
    ({"q": torch.zeros(2, 4, 1, 32)}, "head_dim mismatch"),
    ({"q": torch.zeros(2, 4, 1, 24), "k_cache": torch.zeros(2, 2, 32, 24), "v_cache": torch.zeros(2, 2, 32, 24)},
     "head_dim 24 is not supported"),
    ({"q": torch.zeros(2, 3, 1, 16)}, "kv heads must divide"),
    ({"cache_seqlens": torch.tensor([5, 6])}, "use torch.int32"),
    ({"cache_seqlens": torch.tensor([5], dtype=torch.int32)}, "has 1 entries"),
    ({"cache_seqlens": torch.tensor([5, 0, 6], dtype=torch.int32)[::2]}, "cache_seqlens must be contiguous"),
    ({"v_cache": torch.zeros(2, 2, 31, 16)}, "must have the same shape"),
    ({"k_cache": torch.zeros(3, 2, 32, 16), "v_cache": torch.zeros(3, 2, 32, 16)}, "holds 3 sequences"),
    ({"page_table": torch.zeros(2, 4, dtype=torch.int64)}, "page_table.dtype"),
    ({"page_table": torch.zeros(3, 4, dtype=torch.int32)}, "has 3 rows"),
    ({"k_cache": torch.zeros(8, 2, 6, 16), "v_cache": torch.zeros(8, 2, 6, 16),
      "page_table": torch.zeros(2, 4, dtype=torch.int32)}, "not a power of two"),
    ({"cache_seqlens": torch.tensor([5, 0], dtype=torch.int32)}, "cache_seqlens[1] = 0 is shorter"),
    ({"cache_seqlens": torch.tensor([33, 6], dtype=torch.int32)}, "cache_seqlens[0] = 33 is past the 32"),
    ({"k_cache": torch.zeros(8, 2, 4, 16), "v_cache": torch.zeros(8, 2, 4, 16),
      "page_table": torch.tensor([[0, 1, 2, 3], [4, 8, 0, 0]], dtype=torch.int32)}, "page_table[1, 1] = 8"),
    ({"scale": float("inf")}, "scale must be a finite number"),
    ({"num_splits": 0}, "num_splits must be"),
])
def test_bad_inputs_are_refused_before_any_kernel_runs(over, words, monkeypatch):
    from maskdsl.codegen.decode import kernel

    monkeypatch.setattr(kernel, "decode_split", _Refuse())
    spec, _ = spec_of("window_sinks")
    with pytest.raises(DecodeError, match=_escaped(words)):
        _call(decoder(spec.mask("m")), **over)


class _Refuse:
    """Stands for a kernel: launching it fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a kernel ran")


def _escaped(words: str) -> str:
    return re.escape(words)


def test_a_new_token_that_sees_a_key_not_yet_cached_is_refused():
    """An image decoded a few tokens at a time: position 19 is (row 2, column 3), its window of 5 along the
    row is columns 1..5, so it sees key 2 * 8 + 5 = 21 while the cache holds 21 tokens (0..20)."""
    spec, _ = spec_of("image_rows")
    fn = decoder(spec.mask("m"))
    q = torch.zeros(1, 2, 3, 16)
    kc = torch.zeros(1, 2, 96, 16)
    with pytest.raises(DecodeError, match=r"position 19 sees key 21, which is not in the cache"):
        fn(q, kc, kc, torch.tensor([21], dtype=torch.int32))


@pytest.mark.parametrize("grid, expr, words", [
    ("grid(64)", "sliding_window(4, causal=true) | sink(2)", "position 0 see key 63, 63 tokens later"),
    ("grid(64)", "full", "63 tokens later"),
    ("grid(8, 8)", "neighborhood(window=(3, 5))", "tokens later"),
    ("grid(64)", "topk(k=2, block=16) | sliding_window(4, causal=true)", "63 tokens later"),  # R is everything
])
def test_masks_that_look_ahead_are_refused(grid, expr, words):
    spec = maskdsl.parse(f"layout g = {grid}\nmask m = {expr}\n")
    with pytest.raises(DecodeError, match=_escaped(words)):
        decoder(spec.mask("m"))


def test_compiled_attention_exposes_decode(gen):
    """`maskdsl.compile(...).decode` is the same path."""
    spec, _ = spec_of("causal")
    fn = maskdsl.compile(spec, "m")
    q, k, v = sequence(spec, 2, 2, 16, 1, torch.float32, gen)
    kc, vc = contiguous_cache(k, v, [50], 96)
    got = fn.decode(new_rows(q, [50], 1), kc, vc, torch.tensor([50], dtype=torch.int32))
    torch.testing.assert_close(got.double(), new_rows(reference_attention(q, k, v, spec, "m"), [50], 1),
                               atol=1e-5, rtol=0)


def test_the_serving_example_prefills_then_decodes_against_the_reference():
    """examples/serve_decode.py on the CPU: it exits non-zero when a step leaves the reference's tolerance."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(root / "examples" / "serve_decode.py"), "--device", "cpu", "--paged",
                          "--q-len", "2", "--steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("relative error vs float64 reference") == 3  # the prefill and two steps


def test_the_value_check_kernel_and_its_messages_agree(gen):
    """`value_problem` detects with one kernel (codegen.decode.kernel.decode_check) and `value_message`
    explains in torch: over random lengths and page tables, one refuses exactly when the other does."""
    from maskdsl.codegen.decode.checks import check_decode, value_message, value_problem

    spec, _ = spec_of("image_rows")  # lengths can be short, past the cache, or see past it
    fn = decoder(spec.mask("m"))
    _, last = fn.tables("cpu")
    refused = 0
    for trial in range(40):
        q_len = int(torch.randint(1, 9, (1,), generator=gen))
        q = torch.zeros(3, 2, q_len, 16)
        pool = torch.zeros(13, 2, 8, 16)
        table = None
        if trial % 2:
            table = torch.stack([torch.randperm(13, generator=gen)[:12] for _ in range(3)]).to(torch.int32)
            if int(torch.randint(0, 3, (1,), generator=gen)) == 0:  # a page outside the pool
                table[int(torch.randint(0, 3, (1,), generator=gen)), int(torch.randint(0, 12, (1,), generator=gen))] = -1
        lens = (torch.randint(1, 12, (3,), generator=gen) * 8).to(torch.int32)  # whole rows: fit
        if int(torch.randint(0, 3, (1,), generator=gen)) == 0:  # shorter than q_len, past the cache or mid-row
            lens[int(torch.randint(0, 3, (1,), generator=gen))] += int(torch.randint(-10, 10, (1,), generator=gen))
        caches = (pool, pool) if table is not None else (torch.zeros(3, 2, 90, 16),) * 2
        shape = check_decode(q, *caches, lens, table, fn.tokens)
        problem = value_problem(shape, lens, table, last, fn.tokens)
        assert (problem is None) == (value_message(shape, lens, table, last, fn.tokens) is None), (lens, table)
        refused += problem is not None
    assert 5 < refused < 40  # both outcomes were exercised


def test_splits_fill_the_gpu_from_shapes_only(monkeypatch):
    """One sequence at a long context splits its keys over the GPU; a batch that fills it alone does not
    split; a short reach caps the splits (each keeps MIN_TILES_PER_SPLIT key tiles)."""
    from maskdsl.codegen import dispatch
    from maskdsl.codegen.decode import attention
    from maskdsl.codegen.decode.checks import CacheShape

    monkeypatch.setattr(dispatch, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    causal = decoder(maskdsl.parse("layout s = grid(131072)\nmask m = causal\n").mask("m"))
    window = decoder(maskdsl.parse("layout s = grid(131072)\nmask m = sliding_window(256, causal=true)\n").mask("m"))

    def splits(fn, batch, q_len=1):
        shape = CacheShape(batch, 64, 8, q_len, 128, 131072)
        block_m, block_n, _, _ = fn.tiles(shape)
        return fn.num_splits(shape, cuda, block_m, block_n), block_n

    one, _ = splits(causal, 1)
    assert 8 * one >= 132  # at least a program per multiprocessor
    assert splits(causal, 256)[0] == 1  # 2048 programs: whole waves already
    short, block_n = splits(window, 1)
    assert 1 < short <= (-(-257 // block_n) + 1) // attention.MIN_TILES_PER_SPLIT
    assert all(1 <= splits(causal, b, q)[0] <= attention.MAX_SPLITS for b in (1, 3, 8, 64) for q in (1, 5, 16))


def test_torch_compile_sees_one_op_and_matches_eager(gen):
    """Under torch.compile (fullgraph: no graph break) decode is the opaque `maskdsl::decode` op."""
    spec, _ = spec_of("window_sinks")
    fn = maskdsl.compile(spec, "m")
    q, k, v = sequence(spec, 4, 2, 16, 2, torch.float32, gen)
    lens = [100, 37]
    kc, vc = contiguous_cache(k, v, lens, 192)
    seqlens = torch.tensor(lens, dtype=torch.int32)

    def step(q, kc, vc, seqlens):
        return fn.decode(q, kc, vc, seqlens, return_lse=True, check_values=False)[0] * 2.0

    want = 2.0 * new_rows(reference_attention(q, k, v, spec, "m"), lens, 1)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(new_rows(q, lens, 1), kc, vc, seqlens)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    direct = decoder(spec.mask("m"))  # the decode path used on its own compiles the same way
    got = torch.compile(lambda *a: direct(*a, check_values=False) * 2.0, backend="aot_eager", fullgraph=True)(
        new_rows(q, lens, 1), kc, vc, seqlens)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_the_decode_op_passes_opcheck(gen):
    spec, _ = spec_of("window_sinks")
    fn = decoder(spec.mask("m"))
    q, k, v = sequence(spec, 4, 2, 16, 1, torch.float32, gen)
    kc, vc = contiguous_cache(k, v, [50], 192)
    torch.library.opcheck(torch.ops.maskdsl.decode.default,
                          (new_rows(q, [50], 2), kc, vc, torch.tensor([50], dtype=torch.int32), None, fn.key, None,
                           True, 0, None, None), test_utils=("test_schema", "test_faketensor"))
