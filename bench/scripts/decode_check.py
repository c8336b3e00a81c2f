"""Decode on a GPU at real sizes against the float64 reference, then graph capture and recompilation.

For each case: sequences at random lengths, contiguous and paged caches (shuffled pages, page sizes
16 and 256), caches NaN past every length and in unused pages, outputs poisoned with NaN; every new
row of the checked sequences against the float64 reference of the whole sequence
(maskdsl.harness.reference; a top-k mask: maskdsl.harness.decode), splits from the host's choice and
forced ones. Then one CUDA graph of a
decode step (check_values=False) captured once and replayed at new lengths (the cache's contents
changed in place), each replay checked; and the number of compiled kernel variants before and after
calls at many lengths (a recompile would add one). Writes $OUT/decode_check.json (the working
directory without OUT), prints a line per check, exits 1 when any fails.

    python bench/scripts/decode_check.py [--only window,video]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import maskdsl
from maskdsl.codegen.decode import decoder, kernel
from maskdsl.harness.measure import relative_error
from maskdsl.harness.decode import decode_reference
from maskdsl.harness.reference import reference_attention_block

# name -> (grid, mask, heads, kv_heads, head_dim, dtype, q_len, length step: whole frames or rows)
CASES = {
    "window_sinks_128k": ("grid(131072)", "(sliding_window(4096, causal=true) | sink(4)) & causal", 64, 8, 128,
                          torch.bfloat16, 1, 1),
    "window_sinks_128k_q8": ("grid(131072)", "(sliding_window(4096, causal=true) | sink(4)) & causal", 64, 8, 128,
                             torch.bfloat16, 8, 1),
    "causal_32k_d64_fp16": ("grid(32768)", "causal", 32, 8, 64, torch.float16, 5, 1),
    "causal_16k_d256_odd": ("grid(16384)", "causal", 12, 4, 256, torch.bfloat16, 3, 1),
    "dilated_union_8k": ("grid(8192)", "neighborhood(window=512, dilation=4, causal=true) | (sliding_window(128, "
                         "causal=true) | sink(16)) & causal", 16, 2, 128, torch.bfloat16, 2, 1),
    "video_frames": ("grid(16, 4, 4)", "neighborhood(window=(4, 3, 3), causal=(true, false, false)) | sink(16) & causal",
                     8, 8, 128, torch.bfloat16, 16, 16),
    "nsa_8k": ("grid(8192)", "(topk(k=8, block=64) | sliding_window(256, causal=true) | sink(4)) & causal", 16, 4,
               128, torch.bfloat16, 4, 1),
    "image_rows": ("grid(256, 16)", "neighborhood(window=(33, 9), causal=(true, false))", 32, 8, 128, torch.float16,
                   16, 16),
}
BATCH = 6
CHECKED = (0, 3, 5)


def case_inputs(name, gen):
    grid, expr, h, hk, d, dtype, q_len, step = CASES[name]
    spec = maskdsl.parse(f"layout g = {grid}\nmask m = {expr}\n")
    n = spec.mask("m").layout.tokens
    lo = -(-q_len // step)
    lens = (torch.randint(lo, n // step + 1, (BATCH,), generator=gen) * step).tolist()
    lens[0] = n  # one sequence at the grid's end
    k = torch.randn(BATCH, hk, n, d, generator=gen).to(dtype).cuda()
    v = torch.randn(BATCH, hk, n, d, generator=gen).to(dtype).cuda()
    q = torch.randn(BATCH, h, q_len, d, generator=gen).to(dtype).cuda()
    return spec, n, q, k, v, lens, q_len


def caches(k, v, lens, page_size, gen):
    """(contiguous k, v) or (pool k, pool v, page table) holding each sequence's first lens[b] tokens, NaN elsewhere."""
    b, hk, n, d = k.shape
    if not page_size:
        kc, vc = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
        for i, m in enumerate(lens):
            kc[i, :, :m], vc[i, :, :m] = k[i, :, :m], v[i, :, :m]
        return kc, vc, None
    pages = -(-n // page_size)
    need = [-(-m // page_size) for m in lens]
    pool = sum(need) + 7
    order = torch.randperm(pool, generator=gen).tolist()
    kc = torch.full((pool, hk, page_size, d), float("nan"), dtype=k.dtype, device=k.device)
    vc = torch.full_like(kc, float("nan"))
    table = torch.full((b, pages), 0, dtype=torch.int32)
    for i, m in enumerate(lens):
        for j in range(need[i]):
            page = order.pop()
            table[i, j] = page
            stop = min(m, (j + 1) * page_size)
            kc[page, :, :stop - j * page_size] = k[i, :, j * page_size:stop]
            vc[page, :, :stop - j * page_size] = v[i, :, j * page_size:stop]
    return kc, vc, table.cuda()


def reference(spec, q, k, v, lens, q_len, b):
    n = lens[b]
    if spec.mask("m").dynamic:  # top-k: the decode selection's reference (maskdsl.harness.decode), on the CPU
        out, lse = decode_reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], spec, "m", [n], return_lse=True)
        return out.to(q.device), lse.to(q.device)
    return reference_attention_block(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], spec, "m",
                                     torch.arange(n - q_len, n), torch.arange(n), return_lse=True)


def check_case(name, gen, tol) -> list[dict]:
    spec, n, q, k, v, lens, q_len = case_inputs(name, gen)
    fn = decoder(spec.mask("m"))
    refs = {b: reference(spec, q, k, v, lens, q_len, b) for b in CHECKED}
    rows = []
    for page_size in (0, 16, 256):
        kc, vc, table = caches(k, v, lens, page_size, gen)
        seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        means = fn.block_means(kc, seqlens, table) if fn.selection is not None else None
        for splits in (None, 1, 7, "means") if means is not None else (None, 1, 7):
            out = torch.full_like(q, float("nan"))
            got, lse = fn(q, kc, vc, seqlens, table, num_splits=None if splits == "means" else splits,
                          return_lse=True, out=out, block_means=means if splits == "means" else None)
            torch.cuda.synchronize()
            err = max(relative_error(got[b:b + 1], refs[b][0]) for b in CHECKED)
            lse_err = max((lse[b:b + 1].double() - refs[b][1]).abs().nan_to_num(0.0).max().item() for b in CHECKED)
            lse_inf = all(torch.equal(torch.isinf(lse[b:b + 1]), torch.isinf(refs[b][1])) for b in CHECKED)
            ok = (not got.isnan().any().item()) and err < tol and lse_err < 0.05 and lse_inf
            rows.append({"case": name, "page_size": page_size, "splits": splits, "lens": lens, "error": err,
                         "lse_error": lse_err, "ok": ok})
            print(f"{'ok  ' if ok else 'FAIL'} {name} page {page_size} splits {splits}: error {err:.2e}, "
                  f"lse {lse_err:.2e}", flush=True)
    return rows


def graph_replay(gen, tol) -> dict:
    """A step captured once, replayed at three other lengths; every replay against the reference."""
    spec, n, q, k, v, lens, q_len = case_inputs("window_sinks_128k_q8", gen)
    fn = decoder(spec.mask("m"))
    kc, vc, table = caches(k, v, [n] * BATCH, 256, gen)  # the whole sequence cached: lengths pick the prefix
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    fn(q, kc, vc, seqlens, table, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(q, kc, vc, seqlens, table, check_values=False, out=out)
    errors = []
    for _ in range(3):
        new = (torch.randint(q_len, n + 1, (BATCH,), generator=gen)).tolist()
        seqlens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        errors.append(max(relative_error(out[b:b + 1], reference(spec, q, k, v, new, q_len, b)[0]) for b in CHECKED))
    ok = all(e < tol for e in errors)
    print(f"{'ok  ' if ok else 'FAIL'} graph replay at new lengths: errors {[f'{e:.2e}' for e in errors]}", flush=True)
    return {"check": "graph_replay", "errors": errors, "ok": ok}


def no_recompile(gen) -> dict:
    spec, n, q, k, v, lens, q_len = case_inputs("window_sinks_128k", gen)
    fn = decoder(spec.mask("m"))
    kc, vc, _ = caches(k, v, [n] * BATCH, 0, gen)

    def variants():  # Triton's JIT keeps (kernel cache, key cache, target, backend, binder) per device
        return sum(len(entry[0]) for entry in kernel.decode_split.device_caches.values())

    fn(q, kc, vc, torch.tensor(lens, dtype=torch.int32, device="cuda"))
    before = variants()
    for length in (q_len, 16, 17, 4096, 4097, 65536, 99999, n):
        fn(q, kc, vc, torch.full((BATCH,), length, dtype=torch.int32, device="cuda"))
    torch.cuda.synchronize()
    after = variants()
    ok = after == before
    print(f"{'ok  ' if ok else 'FAIL'} compiled variants of decode_split before/after 8 lengths: {before}/{after}")
    return {"check": "no_recompile", "before": before, "after": after, "ok": ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="cases whose name contains any of these (comma-separated)")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(27)
    tol = 2e-2
    names = [c for c in CASES if not args.only or any(w in c for w in args.only.split(","))]
    rows = []
    for name in names:
        rows += check_case(name, gen, tol)
        torch.cuda.empty_cache()
    rows.append(graph_replay(gen, tol))
    rows.append(no_recompile(gen))
    path = Path(os.environ.get("OUT", ".")) / "decode_check.json"
    path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
