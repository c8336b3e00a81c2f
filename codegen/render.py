"""Render a KernelPlan through the jinja2 template; cache the source on disk by content hash.

The cache key is (mask content hash, config, triton version, template hash): a spec edit, a
new config, a Triton upgrade or a template change each gives a new file, and nothing stale
is ever loaded. Loading goes through a real file so that Triton's JIT can read the source.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import jinja2

from maskdsl.codegen.plan import KernelPlan
from maskdsl.codegen.printer import to_triton

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "attention_fwd.py.jinja"


def cache_dir() -> Path:
    from maskdsl.cache import cache_root

    path = cache_root() / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def render(plan: KernelPlan) -> str:
    """The kernel module's source: readable Python/Triton, with a header naming mask and config."""
    return _env().get_template(TEMPLATE).render(**_context(plan))


def kernel_key(mask_hash: str, config_key: str, template: str = TEMPLATE) -> str:
    import triton

    text = f"{mask_hash}|{config_key}|triton {triton.__version__}|template {template_hash(template)}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


_LOADED: dict[str, ModuleType] = {}


def load_kernel(mask_hash: str, plan: KernelPlan) -> tuple[ModuleType, Path]:
    """Import the rendered module, rendering it only when the cache has no file for this key."""
    return load_module(kernel_key(mask_hash, plan.config.key()), lambda: render(plan))


def load_module(key: str, make_source) -> tuple[ModuleType, Path]:
    """Import the cached module `key`, calling `make_source()` only when no file holds it yet."""
    path = cache_dir() / f"attn_{key}.py"
    if str(path) in _LOADED and path.exists():
        return _LOADED[str(path)], path
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(make_source())
        os.replace(tmp, path)  # atomic: concurrent compiles never see half a file
    spec = importlib.util.spec_from_file_location(f"maskdsl_kernel_{key}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _LOADED[str(path)] = module
    return module, path
