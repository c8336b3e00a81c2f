"""How a tile pair's time grows with head_dim: the tensor cores' products and the softmax's exponentials.

Per attended (query, key) pair a forward tile does 4 * head_dim FLOPs of products (S = Q K^T, O += P V)
on the tensor cores and one exponential (plus the row max and sum) on the special-function units, whose
rate is far lower: the H100 SXM does 989 dense bf16 TFLOPS of products but 3.9 T exponentials a second
(16 per SM and clock; FlashAttention-3's numbers). At head_dim 128 a pair takes 0.52 ps of products and
0.26 ps of exponentials. The Triton template runs them one after the other within a warp, so halving
head_dim halves only the first: head_dim 64 costs 0.67 of 128's time per pair, not 0.5. The Gluon forward overlaps one
warpgroup's softmax with the other's products (ping-pong), so its pair costs the larger of the two.

`share` = the products' share of a template pair's time at head_dim 128, from the two spec rates in the
GPU's entry (`tensor_tflops`, `sfu_tflops`): counted, not fitted. Without them (older entries) 1.0: the
time is proportional to head_dim, the model before this term.
"""

from __future__ import annotations

from maskdsl.spec.limits import padded_head_dim

REFERENCE_HEAD_DIM = 128
PRODUCT_FLOPS = 4  # per pair and head_dim column: S = Q K^T and O += P V, 2 FLOPs each


def kernel_head_dim(head_dim: int) -> int:
    """The head_dim the kernels' tiles are for: the next power of two, at least 16, by the rule codegen
    pads with (maskdsl.spec.limits.padded_head_dim): head_dim 96 runs 128-column tiles, masked, so it
    costs 128's work.
    """
    return padded_head_dim(head_dim)


def product_share(tensor_tflops: float | None, sfu_tflops: float | None) -> float:
    """The products' share of a forward pair's time at head_dim 128 (1.0 without both rates)."""
    if not tensor_tflops or not sfu_tflops:
        return 1.0
    products = PRODUCT_FLOPS * REFERENCE_HEAD_DIM / tensor_tflops
    return products / (products + 1.0 / sfu_tflops)


def head_dim_scale(head_dim: int, share: float = 1.0, overlapped: bool = False) -> float:
    """A tile pair's time at the kernel's head_dim over its time at 128 (module docstring): the products
    scale with head_dim, the exponentials do not; summed (the template) or the larger (`overlapped`,
    the Gluon forward's ping-pong)."""
    h = kernel_head_dim(head_dim) / REFERENCE_HEAD_DIM
    if overlapped:
        return max(share * h, 1.0 - share) / max(share, 1.0 - share)
    return share * h + (1.0 - share)
