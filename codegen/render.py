"""Render a KernelPlan through the jinja2 template; the kernel cache (codegen/cache.py) stores it.

The cache key is (mask content hash, config, triton version, template hash): a spec edit, a
new config, a Triton upgrade or a template change each gives a new file. The mask's *name* is
not rendered (a kernel file is the same whatever the user called the mask), and every text that
lands in a comment is escaped to one line of ASCII, so nothing a user wrote can become code.
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import jinja2

from maskdsl.analysis import tile_table
from maskdsl.codegen.cache import load_module

from maskdsl.codegen.plan import KernelPlan
from maskdsl.codegen.context import _mul, notation, static_context

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "attention_fwd.py.jinja"


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    # `{{ 'q_frame0' | times(inner) }}`: a product that folds a factor of 1, as the printed text does
    env.filters["times"] = _mul
    env.globals["notation"] = notation
    return env


# What shapes a kernel's text besides the template file it names: a change to any of these is a new kernel.
_SOURCES = [*sorted(TEMPLATES.glob("*.jinja")),
            *(Path(__file__).parent / f for f in ("backward.py", "backward_text.py", "bounds.py", "context.py", "plan.py",
                                        "printer.py", "topk/backward_text.py")),
            Path(tile_table.__file__)]


@lru_cache(maxsize=None)
def template_hash(name: str = TEMPLATE) -> str:
    digest = hashlib.sha256((TEMPLATES / name).read_bytes())
    for path in _SOURCES:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def render_template(name: str, **context) -> str:
    return _env().get_template(name).render(**context)


UNNAMED = "(any name)"  # what templates get for the mask's name: the file must not depend on it


def comment_safe(text: str) -> str:
    """One line of printable ASCII: newlines, form feeds, U+2028 and the like become escapes."""
    return str(text).encode("unicode_escape").decode("ascii")


def render(plan: KernelPlan) -> str:
    """The kernel module's source: readable Python/Triton, with a header stating the mask and config.

    The mask's name is not rendered (the file is the same whatever the mask is called) and its text
    only as an escaped comment and a JSON string."""
    safe = dataclasses.replace(plan, mask_name=UNNAMED, mask_text=comment_safe(plan.mask_text))
    return _env().get_template(TEMPLATE).render(**static_context(safe))


def kernel_key(mask_hash: str, config_key: str, template: str = TEMPLATE) -> str:
    import triton

    text = f"{mask_hash}|{config_key}|triton {triton.__version__}|template {template_hash(template)}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_kernel(mask_hash: str, plan: KernelPlan) -> tuple[ModuleType, Path]:
    """Render the kernel and load it through the verifying cache (codegen/cache.py)."""
    return load_module(kernel_key(mask_hash, plan.config.key()), lambda: render(plan))
