"""The model provider: one pipeline stage of `regate-train`'s model from its flags.

In the spirit of Megatron-LM's `model_provider`: `build_model(args, vocab_size)` turns the
namespace of `regate_megatron.training.arguments` into the student (`ReGateLLaVAModel`) or,
with `--text-only`, a `ReGateGPTModel` (the teacher), using the configs of
`regate_megatron.training.model_config`. Megatron-Core's own `LLaVAModel` / `GPTModel` is
built with the ReGATE decoder block spec and made routable by
`regate_megatron.megatron_lm.adopt_llava`, exactly as a patched Megatron-LM provider does.
"""

from __future__ import annotations

import argparse
from typing import Optional

from megatron.core import parallel_state as ps
from megatron.core.enums import ModelType
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.models.multimodal.llava_model import LLaVAModel

from regate_megatron.config import ReGateConfig
from regate_megatron.core.spec import get_regate_decoder_block_spec, resolve_backend
from regate_megatron.megatron_lm.model import adopt_llava
from regate_megatron.training.model_config import (
    language_config,
    projection_config,
    spec_backend,
    vision_config,
)

__all__ = ["build_model", "llava_kwargs"]


def _vision_layer_spec(backend: str):
    """The ViT layer spec: Transformer Engine's, or the local one with torch SDPA attention."""
    if backend == "te":
        from megatron.core.models.vision.vit_layer_specs import (
            get_vit_layer_with_transformer_engine_spec,
        )

        return get_vit_layer_with_transformer_engine_spec()
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec

    from regate_megatron.core.local_modules import TorchSDPACoreAttention

    spec = get_vit_layer_with_local_spec()
    spec.submodules.self_attention.submodules.core_attention = TorchSDPACoreAttention
    return spec


def llava_kwargs(args: argparse.Namespace, vocab_size: int, config, layer_spec, backend: str,
                 common: dict) -> dict:
    """Constructor arguments of Megatron-Core's `LLaVAModel` for these flags."""
    from regate_megatron.core.mcore_compat import mlp_submodules

    return dict(
        language_transformer_config=config,
        language_transformer_layer_spec=layer_spec,
        language_vocab_size=vocab_size,
        language_max_sequence_length=args.seq_length,
        vision_transformer_config=vision_config(args),
        vision_transformer_layer_spec=_vision_layer_spec(backend),
        drop_vision_class_token=True,
        vision_projection_config=projection_config(args),
        vision_projection_layer_spec=mlp_submodules(use_te=backend == "te"),
        language_position_embedding_type=args.position_embedding_type,
        language_rotary_base=args.rotary_base,
        add_encoder=common["pre_process"],
        add_decoder=True,
        img_h=args.img_h,
        img_w=args.img_w,
        patch_dim=args.patch_dim,
        **common,
    )


def build_model(
    args: argparse.Namespace,
    vocab_size: int,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    regate_config: Optional[ReGateConfig] = None,
):
    """One pipeline stage of the student (a `ReGateLLaVAModel`) or, with `--text-only`, of a
    `ReGateGPTModel`: Megatron-Core's model with the ReGATE block spec, adopted by
    `adopt_llava`. Both equal stock Megatron-Core when no selection is routed."""
    pre_process = ps.is_pipeline_first_stage() if pre_process is None else pre_process
    post_process = ps.is_pipeline_last_stage() if post_process is None else post_process
    backend = resolve_backend(spec_backend(args))
    config = language_config(args)
    layer_spec = get_regate_decoder_block_spec(config, backend=backend)
    common = dict(
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        pre_process=pre_process,
        post_process=post_process,
    )
    regate_config = regate_config or ReGateConfig()
    if args.text_only:
        return adopt_llava(GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=args.max_position_embeddings,
            position_embedding_type=args.position_embedding_type,
            rotary_base=args.rotary_base,
            **common,
        ), regate_config)
    model = adopt_llava(
        LLaVAModel(**llava_kwargs(args, vocab_size, config, layer_spec, backend, common)),
        regate_config)
    # The schedules read model_type; the vision encoder lives on the first pipeline stage.
    model.model_type = ModelType.encoder_or_decoder
    if args.freeze_ViT or args.freeze_LM:
        model.freeze(
            freeze_language_model=args.freeze_LM,
            freeze_vision_model=args.freeze_ViT,
            freeze_vision_projection=False,
        )
    return model
