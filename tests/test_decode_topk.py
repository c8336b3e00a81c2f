"""Top-k masks at decode time (codegen.decode with codegen.decode.select) against the decode reference
(maskdsl.harness.decode), and that reference against the whole sequence's where they must agree."""

from __future__ import annotations

import pytest
import torch

import maskdsl
from maskdsl.codegen.decode import decoder
from maskdsl.harness.decode import decode_picks, decode_reference
from maskdsl.harness.reference import reference_attention
from test_decode import contiguous_cache, new_rows, paged_cache

SPECS = {
    "nsa_1d": ("grid(160)", "(topk(k=2, block=16) | sliding_window(8, causal=true) | sink(2)) & causal"),
    "pure_1d": ("grid(128)", "topk(k=3, block=16) & causal"),
    "video": ("grid(6, 2, 8)", "topk(k=2, block=(1, 1, 8)) & neighborhood(window=(3, 2, 8), causal=(true, false, false))"),
}


def spec_of(name):
    grid, expr = SPECS[name]
    return maskdsl.parse(f"layout g = {grid}\nmask m = {expr}\n")


def inputs(spec, heads, kv_heads, batch, gen, dim=16):
    n = spec.mask("m").layout.tokens
    return (torch.randn(batch, h, n, dim, generator=gen) for h in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("paged", [False, True])
def test_matches_the_decode_reference(name, paged, gen):
    spec = spec_of(name)
    n = spec.mask("m").layout.tokens
    q, k, v = inputs(spec, 6, 2, 3, gen)  # GQA: three heads of a group may pick different blocks
    if name == "video":
        q_len, lens = 16, [int(x) * 16 for x in torch.randint(1, n // 16 + 1, (3,), generator=gen)]
    else:
        q_len = 1 + int(torch.randint(0, 4, (1,), generator=gen))
        lens = [int(x) for x in torch.randint(q_len, n + 1, (3,), generator=gen)]
    qn = new_rows(q, lens, q_len)
    want, want_lse = decode_reference(qn, k, v, spec, "m", lens, return_lse=True)
    if paged:
        kc, vc, table = paged_cache(k, v, lens, 8, -(-n // 8), gen)
    else:
        (kc, vc), table = contiguous_cache(k, v, lens, n), None
    for splits in (1, 4):
        got, lse = decoder(spec.mask("m"))(qn, kc, vc, torch.tensor(lens, dtype=torch.int32), table,
                                           num_splits=splits, return_lse=True)
        assert not got.isnan().any()
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=0)


def test_the_heads_of_a_group_pick_different_blocks(gen):
    """The case that makes the kernel walk the group's union with a per-head test (else it proves little)."""
    spec = spec_of("nsa_1d")
    q, k, _ = inputs(spec, 6, 2, 1, gen)
    picks = decode_picks(q[0, :, 150:151], k[0], spec, "m", 151)
    assert not all(torch.equal(picks[0], picks[h]) for h in range(3))


@pytest.mark.parametrize("name, length", [("nsa_1d", 64), ("nsa_1d", 160), ("pure_1d", 112)])
def test_a_whole_query_block_decodes_as_the_whole_sequence_selects(name, length, gen):
    """New tokens that are exactly one query block, the cache ending with it: decode's selection is the
    whole sequence's (maskdsl.harness.topk), so the kernel matches the full reference's rows."""
    spec = spec_of(name)
    q, k, v = inputs(spec, 4, 2, 2, gen)
    full, full_lse = reference_attention(q, k, v, spec, "m", return_lse=True)
    lens = [length, length]
    kc, vc = contiguous_cache(k, v, lens, spec.mask("m").layout.tokens)
    got, lse = decoder(spec.mask("m"))(new_rows(q, lens, 16), kc, vc, torch.tensor(lens, dtype=torch.int32),
                                       num_splits=3, return_lse=True)
    torch.testing.assert_close(got.double(), new_rows(full, lens, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), new_rows(full_lse, lens, 16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["nsa_1d", "video"])
def test_block_means_kept_beside_the_cache_give_the_same_steps(name, gen):
    """A generation loop that keeps the block means (built once, then appended to each step) decodes as
    the reference does, and its means stay those of the cache."""
    spec = spec_of(name)
    n = spec.mask("m").layout.tokens
    q, k, v = inputs(spec, 6, 2, 2, gen)
    fn = decoder(spec.mask("m"))
    q_len = 16 if name == "video" else 3
    lens = [32, 48] if name == "video" else [40, 71]
    kc, vc = contiguous_cache(k, v, [n, n], n)  # the whole sequence written; lengths say what is cached
    seqlens = torch.tensor(lens, dtype=torch.int32)
    means = fn.block_means(kc, seqlens)
    for _ in range(3):
        seqlens += q_len
        lens = seqlens.tolist()
        means.append(torch.stack([k[b, :, m - q_len:m] for b, m in enumerate(lens)]), seqlens)
        qn = new_rows(q, lens, q_len)
        got = fn(qn, kc, vc, seqlens, num_splits=2, block_means=means)
        torch.testing.assert_close(got.double(), decode_reference(qn, k, v, spec, "m", lens), atol=1e-5, rtol=0)
    fresh = fn.block_means(kc, seqlens)
    torch.testing.assert_close(means.sums, fresh.sums, atol=1e-5, rtol=0)
    assert torch.equal(means.counts, fresh.counts)


def test_block_means_of_the_wrong_shape_are_refused(gen):
    from maskdsl.codegen.decode import DecodeError

    spec = spec_of("nsa_1d")
    fn = decoder(spec.mask("m"))
    kc = torch.zeros(2, 2, 160, 16)
    means = fn.block_means(kc[:1], torch.tensor([20], dtype=torch.int32))
    with pytest.raises(DecodeError, match=r"needs \[B, H_kv, blocks, D\] = \[2, 2, 10, 16\]"):
        fn(torch.zeros(2, 4, 1, 16), kc, kc, torch.tensor([20, 30], dtype=torch.int32), block_means=means)
