"""Independent, scalar statements of the mask definitions, for checking the vectorized oracle.

Written from docs/DESIGN.md §3 and from NATTEN's CUDA reference formulation (window_left/right and
get_win_start in csrc/include/natten/cuda/reference/mask.hpp), deliberately in a different form
from maskdsl.harness.semantics so that a shared mistake is unlikely.
"""

import itertools


def design_rule(n, w, d, s, causal, i, j):
    """docs/DESIGN.md §3, one query/key pair at a time."""
    if i % d != j % d:
        return False
    g = i % d
    n_g = -(-(n - g) // d)
    i, j = i // d, j // d
    if causal:
        leader = min((i // s) * s + s - 1, n_g - 1)
        return j <= i and leader - j < w
    leader = min((i // s) * s + s // 2, n_g - 1)
    start = max(0, min(leader - w // 2, n_g - w))
    return start <= j < start + w


def natten_rule(n, w, d, s, causal, i, j):
    """NATTEN's CUDA reference form: left/right window halves, start fixed up at the right edge."""
    if i % d != j % d:
        return False
    g = i % d
    length = n // d + (1 if g < n % d else 0)  # NATTEN's dilation-group length
    i, j = i // d, j // d
    left = w // 2
    right = w // 2 + (w % 2 - 1)
    if causal:
        leader = min((i // s) * s + s - 1, length - 1)
        start = max(leader - left - right, 0)
        end = min(i + 1, length)
    else:
        leader = min((i // s) * s + s // 2, length - 1)
        start = max(leader - left, 0) + (length - right - leader - 1 if leader + right >= length else 0)
        end = start + w
    return start <= j < end


def product_mask(shape, params, rule=design_rule):
    """params: per dimension (w, d, s, causal). Returns a nested list [L][L] of bools, row-major."""
    coords = list(itertools.product(*[range(n) for n in shape]))
    return [[all(rule(n, *params[k], qi[k], kj[k]) for k, n in enumerate(shape)) for kj in coords] for qi in coords]
