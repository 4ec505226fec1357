"""Spec factories: ReGATE layers/blocks for Megatron-Core's `GPTModel`.

Pairs in Megatron's style: `get_regate_layer_submodules()` -> `get_regate_layer_spec()`
and `get_regate_decoder_block_spec()`. Backends:

- ``local``: Megatron-Core's own linears/MLP, core attention through torch SDPA
  (`TorchSDPACoreAttention`: flash kernels on GPU, the same code on CPU) and
  norms that accept sequence parallelism.
- ``te``: Megatron-Core's Transformer Engine modules (TE attention, fused norms).
- ``auto``: ``te`` when Transformer Engine is importable, else ``local``.
"""

from __future__ import annotations

import copy
from typing import Optional, Type

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from regate_megatron.core.layer import ReGateTransformerLayer
from regate_megatron.core.local_modules import SequenceParallelTorchNorm, TorchSDPACoreAttention

__all__ = [
    "have_transformer_engine",
    "resolve_backend",
    "get_regate_layer_submodules",
    "get_regate_layer_spec",
    "get_regate_decoder_block_spec",
]


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "te" if have_transformer_engine() else "local"
    if backend not in ("local", "te"):
        raise ValueError(f"spec backend must be 'local', 'te' or 'auto', got {backend!r}")
    if backend == "te" and not have_transformer_engine():
        raise ValueError("spec backend 'te' needs Transformer Engine; install regate-megatron[te]")
    return backend


def get_regate_layer_submodules(
    backend: str = "auto", normalization: str = "LayerNorm", qk_layernorm: bool = False
) -> TransformerLayerSubmodules:
    """Submodules of a GPT decoder layer for `backend` (see module docstring)."""
    if resolve_backend(backend) == "te":
        return copy.deepcopy(
            get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm).submodules
        )
    subs = copy.deepcopy(
        get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm).submodules
    )
    # Megatron's local DotProductAttention needs CUDA buffers and WrappedTorchNorm refuses
    # sequence parallelism: use torch SDPA and an SP-capable torch norm instead.
    subs.self_attention.submodules.core_attention = TorchSDPACoreAttention
    subs.input_layernorm = SequenceParallelTorchNorm
    subs.pre_mlp_layernorm = SequenceParallelTorchNorm
    return subs


def get_regate_layer_spec(
    backend: str = "auto",
    normalization: str = "LayerNorm",
    qk_layernorm: bool = False,
    layer_module: Type = ReGateTransformerLayer,
) -> ModuleSpec:
    """A decoder layer spec whose layers ReGATE can route."""
    return ModuleSpec(
        module=layer_module,
        submodules=get_regate_layer_submodules(backend, normalization, qk_layernorm),
    )


def get_regate_decoder_block_spec(
    config: TransformerConfig,
    backend: str = "auto",
    qk_layernorm: bool = False,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
    layer_module: Type = ReGateTransformerLayer,
) -> ModuleSpec:
    """The decoder block spec of one (virtual) pipeline stage for `GPTModel`.

    `layer_module=TransformerLayer` gives the identical stock Megatron-Core block
    (same submodules), which is what ReGATE must equal at keep ratio 1.
    """
    backend = resolve_backend(backend)
    layer_spec = get_regate_layer_spec(backend, config.normalization, qk_layernorm, layer_module)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = SequenceParallelTorchNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[layer_spec] * num_layers, layer_norm=final_norm
        ),
    )
