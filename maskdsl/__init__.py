"""maskdsl: attention masks as a small language, compiled to Triton kernels.

The package root is the language layer (parse, IR, errors) and stays light: `import maskdsl;
maskdsl.parse(...)` loads neither torch nor triton. The reference semantics (torch), the front door
`compile` and the modules above (nn, metrics, topk) load on first use, so nothing at the bottom of
the import graph pulls in the top.
"""

from pathlib import Path as _Path


def _source_checkout_path() -> list[str]:
    """In a source checkout the subpackages are the folders beside this one (the layout the user asked
    for); pyproject.toml maps them into maskdsl on install. Adding the checkout's root to this package's
    search path gives the same names when the tree is used without installing it (a git worktree, a copy
    sent to a GPU machine). An installed maskdsl holds its subpackages itself and skips this."""
    here = _Path(__file__).resolve().parent
    root = here.parent
    if (here / "codegen").is_dir() or not (root / "pyproject.toml").is_file():
        return []
    return [str(root)] if (root / "codegen" / "__init__.py").is_file() else []


__path__ += _source_checkout_path()  # noqa: F821 - a package's __path__

from maskdsl.spec.errors import SpecError  # noqa: E402
from maskdsl.spec.ir import Spec  # noqa: E402
from maskdsl.lang.parser import load, parse  # noqa: E402
from maskdsl.version import __version__  # noqa: E402

__all__ = ["SpecError", "Spec", "parse", "load", "reference_mask", "reference_attention", "compile"]

_LAZY_FUNCTIONS = {"reference_mask": "maskdsl.harness.reference", "reference_attention": "maskdsl.harness.reference",
                   "compile": "maskdsl.api"}
_LAZY_MODULES = {"nn": "maskdsl.nn", "metrics": "maskdsl.harness.metrics", "topk": "maskdsl.harness.topk",
                 "api": "maskdsl.api"}


def __getattr__(name):
    import importlib

    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(_LAZY_FUNCTIONS[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(_LAZY_MODULES[name])
    raise AttributeError(f"module 'maskdsl' has no attribute {name!r}")
