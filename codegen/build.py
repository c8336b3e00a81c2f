"""Which compiled kernel a mask becomes: the static kernel (codegen.compiled) or the top-k one (codegen.topk.forward).

Its own module because the top-k kernel builds on the static one (it subclasses CompiledAttention and
shares its launch and registry), so the choice between them cannot live beside the base class without
an import circle.
"""

from __future__ import annotations

from maskdsl.codegen.compiled import CompiledAttention
from maskdsl.codegen.config import BackwardConfig, KernelConfig, default_config
from maskdsl.codegen.plan import build_plan
from maskdsl.codegen.render import load_kernel
from maskdsl.codegen.topk.forward import CompiledTopKAttention, topk_config
from maskdsl.spec import ir


def untuned_config(mask: ir.MaskDef, head_dim: int = 128) -> KernelConfig:
    """What a kernel uses when nobody chose a config: the default config (top-k picks its own tile)."""
    if mask.dynamic:
        return topk_config(mask, None)
    return default_config(mask, head_dim)


def compile_attention(spec: ir.Spec, mask: str, config: KernelConfig | None = None,
                      backward_config: BackwardConfig | None = None) -> CompiledAttention:
    """Render (or load from the cache) the kernel of `mask` for `config`, the untuned default if None.

    `backward_config` chooses the backward kernels' tiles (codegen.config.default_backward_config if
    None); they are rendered on the first gradient.

    Looking a tuned config up is the front door's job (maskdsl.api), not codegen's.
    """
    from maskdsl.lang.validate import validate_spec

    validate_spec(spec)  # public too: a Spec built in Python is checked before any of it is rendered
    mdef = spec.mask(mask)
    if mdef.documents:  # its kernels take the offsets at each call (codegen.documents); nothing is rendered
        from maskdsl.codegen.documents.compiled import CompiledDocumentAttention

        return CompiledDocumentAttention(mdef, config)
    attention = spec.attention_for(mask)
    if config is None:
        config = untuned_config(mdef, attention.head_dim if attention else 128)
    if mdef.dynamic:
        return CompiledTopKAttention(mdef, config)
    plan = build_plan(mdef, config)
    module, path = load_kernel(mdef.content_hash(), plan)
    if backward_config is not None:
        backward_config.validate(len(mdef.layout.shape))
    return CompiledAttention(mdef, plan, module, path, backward_config)
