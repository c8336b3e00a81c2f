"""maskdsl: attention masks as a small language, compiled to Triton kernels.

The package is the bottom of the import graph (language, IR, analysis, reference semantics);
`compile` and the CLI reach into codegen/simulator/autotune lazily so nothing here imports them.
"""

from maskdsl.errors import SpecError
from maskdsl.ir import Spec
from maskdsl.parser import load, parse
from maskdsl.reference import reference_attention, reference_mask

__all__ = ["SpecError", "Spec", "parse", "load", "reference_mask", "reference_attention", "compile"]
__version__ = "0.1.0"


def compile(spec, mask, config=None):  # noqa: A001 - the name users expect
    """Compile `mask` of `spec` into a callable attention kernel (see codegen.compiled)."""
    from codegen.compiled import compile_attention

    return compile_attention(spec, mask, config)


def __getattr__(name):
    """`maskdsl.nn`, `maskdsl.metrics` and `maskdsl.topk` load on first use (they pull in more of torch)."""
    if name in ("nn", "metrics", "topk"):
        import importlib

        return importlib.import_module(f"maskdsl.{name}")
    raise AttributeError(f"module 'maskdsl' has no attribute {name!r}")
