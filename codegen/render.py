"""Render a KernelPlan through the jinja2 template; cache the source on disk by content hash.

The cache key is (mask content hash, config, triton version, template hash): a spec edit, a
new config, a Triton upgrade or a template change each gives a new file, and nothing stale
is ever loaded. Loading goes through a real file so that Triton's JIT can read the source.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import jinja2

from maskdsl.codegen.plan import KernelPlan
from maskdsl.codegen.context import static_context
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
    # the backward templates print a bound for named row/group/extent variables: `{{ expr | tri('rows', 'g', 'n') }}`
    env.filters["tri"] = lambda expr, i, g, n: to_triton(expr, {"i": i, "g": g, "n": n})
    return env


# What shapes a kernel's text besides the template file it names: a change to any of these is a new kernel.
_SOURCES = [*sorted(TEMPLATES.glob("*.jinja")),
            *(Path(__file__).parent / f for f in ("backward.py", "bounds.py", "context.py", "plan.py", "printer.py"))]


@lru_cache(maxsize=None)
def template_hash(name: str = TEMPLATE) -> str:
    digest = hashlib.sha256((TEMPLATES / name).read_bytes())
    for path in _SOURCES:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def render_template(name: str, **context) -> str:
    return _env().get_template(name).render(**context)


def render(plan: KernelPlan) -> str:
    """The kernel module's source: readable Python/Triton, with a header naming mask and config."""
    return _env().get_template(TEMPLATE).render(**static_context(plan))


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
