"""maskdsl: attention masks as a small language, compiled to Triton kernels.

The package root is the language layer (parse, IR, errors) and stays light: `import maskdsl;
maskdsl.parse(...)` loads neither torch nor triton. The reference semantics (torch), the front door
`compile` and the modules above (nn, metrics, topk) load on first use, so nothing at the bottom of
the import graph pulls in the top.
"""

from maskdsl.errors import SpecError
from maskdsl.ir import Spec
from maskdsl.parser import load, parse
from maskdsl.version import __version__

__all__ = ["SpecError", "Spec", "parse", "load", "reference_mask", "reference_attention", "compile"]

_LAZY_FUNCTIONS = {"reference_mask": "maskdsl.reference", "reference_attention": "maskdsl.reference",
                   "compile": "maskdsl.api"}
_LAZY_MODULES = ("nn", "metrics", "topk", "api")


def __getattr__(name):
    import importlib

    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(_LAZY_FUNCTIONS[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"maskdsl.{name}")
    raise AttributeError(f"module 'maskdsl' has no attribute {name!r}")
