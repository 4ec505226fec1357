"""Megatron-Core configs from `regate-train`'s flags (the namespace `arguments.parse_args` returns).

    language_config(args)    TransformerConfig of the language model (student or teacher)
    vision_config(args)      ... of the CLIP-style ViT encoder
    projection_config(args)  ... of the MLP projector (vision hidden -> language hidden)
    optimizer_config(args)   OptimizerConfig (Adam)
    spec_backend(args)       the layer-spec backend --transformer-impl asks for
    model_args_dict(args)    the architecture flags saved with every checkpoint

The flags themselves (definition, defaults, validation) live in `arguments`.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

__all__ = [
    "MODEL_ARG_NAMES",
    "language_config",
    "model_args_dict",
    "optimizer_config",
    "projection_config",
    "spec_backend",
    "vision_config",
]

# Architecture flags: saved with every checkpoint so a consumer (the teacher in
# `regate-precompute-ref`, a resumed run) rebuilds the same model.
MODEL_ARG_NAMES = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "group_query_attention", "num_query_groups", "seq_length", "max_position_embeddings",
    "position_embedding_type", "rotary_base", "normalization", "norm_epsilon", "swiglu",
    "untie_embeddings_and_output_weights", "init_method_std", "vocab_size",
    "text_only", "img_h", "img_w", "patch_dim", "vision_num_layers", "vision_hidden_size",
    "vision_num_attention_heads", "vision_ffn_hidden_size",
)


def model_args_dict(args: argparse.Namespace) -> dict:
    """The architecture flags, saved in checkpoints (JSON-safe)."""
    return {name: getattr(args, name, None) for name in MODEL_ARG_NAMES}


def _dtype(args) -> torch.dtype:
    """Parameter dtype: bf16 with --bf16, else fp32."""
    return torch.bfloat16 if getattr(args, "bf16", False) else torch.float32


def language_config(args: argparse.Namespace):
    """TransformerConfig of the language model (student or teacher)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = _dtype(args)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        bias_activation_fusion=False,
        add_bias_linear=not args.swiglu,
        init_method_std=args.init_method_std,
        hidden_dropout=getattr(args, "hidden_dropout", 0.0),
        attention_dropout=getattr(args, "attention_dropout", 0.0),
        tensor_model_parallel_size=getattr(args, "tensor_model_parallel_size", 1),
        pipeline_model_parallel_size=getattr(args, "pipeline_model_parallel_size", 1),
        sequence_parallel=getattr(args, "sequence_parallel", False),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        calculate_per_token_loss=True,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        variable_seq_lengths=False,
        **_recompute(args),
    )


_NO_RECOMPUTE = dict(recompute_granularity=None, recompute_method=None,
                     recompute_num_layers=None)


def _recompute(args, vision: bool = False) -> dict:
    """The recomputation fields of a TransformerConfig from --recompute-* (none where the
    namespace has no such flags, as a teacher's saved architecture). The vision encoder
    recomputes only with --recompute-vision, then all of its layers, as Megatron-LM's
    multimodal model does; the projector never."""
    granularity = getattr(args, "recompute_granularity", None)
    if granularity is None or (vision and not getattr(args, "recompute_vision", False)):
        return dict(_NO_RECOMPUTE)
    if granularity == "selective":
        return dict(_NO_RECOMPUTE, recompute_granularity=granularity,
                    recompute_modules=args.recompute_modules)
    return dict(recompute_granularity=granularity, recompute_method=args.recompute_method,
                recompute_num_layers=args.vision_num_layers if vision
                else args.recompute_num_layers)


def vision_config(args: argparse.Namespace):
    """TransformerConfig of the CLIP-style ViT encoder."""
    base = language_config(args)
    config = dataclasses.replace(
        base,
        num_layers=args.vision_num_layers,
        hidden_size=args.vision_hidden_size,
        ffn_hidden_size=args.vision_ffn_hidden_size,
        num_attention_heads=args.vision_num_attention_heads,
        num_query_groups=args.vision_num_attention_heads,
        normalization="LayerNorm",
        gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu,
        add_bias_linear=True,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        **_recompute(args, vision=True),
    )
    config.vision_model_type = "clip"  # read by LLaVAModel; not a TransformerConfig field
    return config


def projection_config(args: argparse.Namespace):
    """TransformerConfig of the 2-layer MLP projector (vision hidden -> language hidden)."""
    base = language_config(args)
    return dataclasses.replace(
        base,
        num_layers=1,
        ffn_hidden_size=args.hidden_size,
        gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu,
        add_bias_linear=True,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        **_NO_RECOMPUTE,
    )


def optimizer_config(args: argparse.Namespace):
    """Megatron-Core OptimizerConfig (Adam) of --lr, --weight-decay, --adam-*, --clip-grad."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=_dtype(args),
        use_distributed_optimizer=args.use_distributed_optimizer,
    )


def spec_backend(args: argparse.Namespace) -> str:
    """`get_regate_decoder_block_spec` backend name of --transformer-impl."""
    return {"local": "local", "transformer_engine": "te", "auto": "auto"}[args.transformer_impl]
