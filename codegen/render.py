"""Render a KernelPlan through the jinja2 template; the kernel cache (codegen/cache.py) stores it.

The cache key is (mask content hash, config, triton version, template hash): a spec edit, a
new config, a Triton upgrade or a template change each gives a new file. The mask's *name* is
not rendered (a kernel file is the same whatever the user called the mask), and every text that
lands in a comment is escaped to one line of ASCII, so nothing a user wrote can become code.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import jinja2

from maskdsl.codegen.cache import cache_dir, load_module  # noqa: F401 - re-exported (the cache's old home)

from maskdsl.codegen.plan import KernelPlan
from maskdsl.codegen.printer import to_triton

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "attention_fwd.py.jinja"


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    env.filters["tri"] = lambda expr, i, g, n: to_triton(expr, {"i": i, "g": g, "n": n})
    return env


@lru_cache(maxsize=None)
def template_hash(name: str = TEMPLATE) -> str:
    return hashlib.sha256((TEMPLATES / name).read_bytes()).hexdigest()[:12]


def render_template(name: str, **context) -> str:
    return _env().get_template(name).render(**context)


@dataclass(frozen=True)
class _Dim:
    i: int
    extent: int
    stride: int
    dilation: int
    q_tile: int
    kv_tile: int
    q_tiles: int
    q_tiles_per_group: int
    q_inner: int
    kv_inner: int


def _context(plan: KernelPlan) -> dict:
    from maskdsl.version import __version__

    cfg = plan.config
    rank = plan.rank
    dims = []
    for d, dp in enumerate(plan.dims):
        q_inner = kv_inner = 1
        for k in range(d + 1, rank):
            q_inner *= cfg.q_tile[k]
            kv_inner *= cfg.kv_tile[k]
        dims.append(_Dim(d, dp.extent, dp.stride, dp.dilation, dp.q_tile, dp.kv_tile, dp.q_tiles,
                         dp.q_tiles_per_group, q_inner, kv_inner))
    terms = [{"i": t, "dims": list(term)} for t, term in enumerate(plan.terms)]
    slabs = []
    for d in range(rank):
        for side in ("left", "right"):
            origin, size = [], []
            for k in range(rank):
                if k < d:
                    origin.append(f"fa_0_{k}")
                    size.append(f"nf_{k}")
                elif k > d:
                    origin.append(f"a_0_{k}")
                    size.append(f"nb_0_{k}")
                elif side == "left":
                    origin.append(f"a_0_{k}")
                    size.append(f"(fa_0_{k} - a_0_{k})")
                else:
                    origin.append(f"(fb_0_{k} + 1)")
                    size.append(f"(a_0_{k} + nb_0_{k} - 1 - fb_0_{k})")
            slabs.append({"name": f"partial tiles, {side} of the full box in dimension {d}",
                          "origin": origin, "size": size})
    return {
        "version": __version__, "plan": plan, "cfg": cfg, "dims": dims, "terms": terms, "slabs": slabs,
        "tokens": _tokens(plan.shape), "dilations": tuple(d.dilation for d in plan.dims),
        "fa_list": [f"fa_0_{d}" for d in range(rank)], "nf_list": [f"nf_{d}" for d in range(rank)],
        "cvars": [f"c_{d}" for d in range(rank)], "tma_ok": plan.tma_ok,
    }


def _tokens(shape) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


UNNAMED = "(any name)"  # what templates get for the mask's name: the file must not depend on it


def comment_safe(text: str) -> str:
    """One line of printable ASCII: newlines, form feeds, U+2028 and the like become escapes."""
    return str(text).encode("unicode_escape").decode("ascii")


def render(plan: KernelPlan) -> str:
    """The kernel module's source: readable Python/Triton, with a header stating the mask and config."""
    safe = dataclasses.replace(plan, mask_name=UNNAMED, mask_text=comment_safe(plan.mask_text))
    return _env().get_template(TEMPLATE).render(**_context(safe))


def kernel_key(mask_hash: str, config_key: str, template: str = TEMPLATE) -> str:
    import triton

    text = f"{mask_hash}|{config_key}|triton {triton.__version__}|template {template_hash(template)}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_kernel(mask_hash: str, plan: KernelPlan) -> tuple[ModuleType, Path]:
    """Render the kernel and load it through the verifying cache (codegen/cache.py)."""
    return load_module(kernel_key(mask_hash, plan.config.key()), lambda: render(plan))
