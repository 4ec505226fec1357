"""The student MLLM: Megatron-Core's `LLaVAModel` with a routable language model.

`LLaVAModel` builds its `GPTModel` itself; we give it the ReGATE layer spec and
adopt that language model as a `ReGateGPTModel` (no parameter changes), so with
no selection the model *is* stock LLaVA. `ReGateLLaVAModel.forward` takes
`token_selection=` in the combined (image-expanded) sequence's coordinates.

Data arrives in the expanded layout (`regate_megatron.data.llava`: every visual slot
holds `IMAGE_TOKEN_INDEX`, so positions equal the combined sequence's).
`llava_inputs` compresses each image's run of slots to the single placeholder
LLaVA expects; LLaVA re-expands it to exactly the same layout (the combined
length is pinned to `--seq-length`).

`build_model` makes one pipeline stage's model from the Megatron-style flags:
the LLaVA student or, with `--text-only`, a GPT (the teacher).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.enums import ModelType
from megatron.core.models.multimodal.llava_model import LLaVAModel

from regate_megatron.config import ReGateConfig
from regate_megatron.core.model import ReGateGPTModel
from regate_megatron.core.selection import TokenSelection
from regate_megatron.core.spec import get_regate_decoder_block_spec, resolve_backend
from regate_megatron.data.llava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Batch
from regate_megatron.training.arguments import (
    language_config,
    projection_config,
    spec_backend,
    vision_config,
)

__all__ = ["ReGateLLaVAModel", "build_model", "llava_inputs", "llava_kwargs", "num_image_tokens"]


def num_image_tokens(args: argparse.Namespace) -> int:
    """Tokens one image becomes in the combined sequence (class token dropped)."""
    return (args.img_h // args.patch_dim) * (args.img_w // args.patch_dim)


class ReGateLLaVAModel(LLaVAModel):
    """`LLaVAModel` whose language model routes a `TokenSelection`."""

    def __init__(self, *args, regate_config: Optional[ReGateConfig] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.language_model is not None:
            ReGateGPTModel.adopt(self.language_model, regate_config)

    def forward(self, *args, token_selection: Optional[TokenSelection] = None, **kwargs):
        routing = (
            self.language_model.selecting(token_selection)
            if self.language_model is not None
            else contextlib.nullcontext()
        )
        with routing:
            return super().forward(*args, **kwargs)


def llava_inputs(batch: Batch, image_tokens: int, dtype: torch.dtype = torch.float32) -> dict:
    """Expanded batch -> LLaVA's inputs (one placeholder per image).

    Every image's `image_tokens` slots collapse to one `IMAGE_TOKEN_INDEX`; the
    text length is `s - min_images * (image_tokens - 1)` so that after LLaVA
    re-expands, every sample's combined sequence is exactly the expanded layout
    and the longest is cut to `s` only in padding.
    """
    tokens, labels, loss_mask = batch.tokens, batch.labels, batch.loss_mask  # [b, s] each
    b, s = tokens.shape
    visual = tokens == IMAGE_TOKEN_INDEX  # [b, s]
    # Index of each slot inside its run of consecutive slots; adjacent images ("<image><image>")
    # form one run of several images, so an image starts at every multiple of image_tokens.
    count = visual.long().cumsum(1)  # [b, s]
    run_start = torch.where(visual, torch.zeros_like(count), count).cummax(1).values
    first = visual & ((count - run_start - 1) % image_tokens == 0)
    keep = ~visual | first
    text_len = s - int(batch.num_images.min()) * (image_tokens - 1)
    device = tokens.device  # the batch's: `Batch.to` put it on the model's device
    input_ids = torch.zeros(b, text_len, dtype=tokens.dtype, device=device)
    text_labels = torch.full((b, text_len), IGNORE_INDEX, dtype=labels.dtype, device=device)
    text_mask = torch.zeros(b, text_len, dtype=loss_mask.dtype, device=device)
    for i in range(b):
        row = keep[i].nonzero().squeeze(1)[:text_len]  # [n_i] kept positions
        n = row.numel()
        input_ids[i, :n] = tokens[i, row]
        text_mask[i, :n] = loss_mask[i, row]
        # LLaVA shifts labels: the label stored at a text position is the target of the
        # position just before the next text token, i.e. of that token's last slot.
        nxt = torch.cat([row[1:], row.new_tensor([s])]) - 1  # [n_i]
        text_labels[i, :n] = labels[i, nxt]
    position_ids = torch.arange(text_len, device=device).unsqueeze(0).expand(b, -1)
    return dict(
        images=batch.images.to(dtype),  # the vision encoder's parameter dtype (--bf16)
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=None,
        labels=text_labels,
        loss_mask=text_mask,
        num_image_tiles=torch.ones(batch.images.shape[0], dtype=torch.int, device=device),
    )


def _vision_layer_spec(backend: str):
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
    """One pipeline stage of the student (`ReGateLLaVAModel`) or, with `--text-only`, of a
    `ReGateGPTModel`. Both equal stock Megatron-Core when no selection is routed."""
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
    if args.text_only:
        return ReGateGPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=args.max_position_embeddings,
            position_embedding_type=args.position_embedding_type,
            rotary_base=args.rotary_base,
            regate_config=regate_config,
            **common,
        )
    model = ReGateLLaVAModel(**llava_kwargs(args, vocab_size, config, layer_spec, backend, common),
                             regate_config=regate_config)
    # The schedules read model_type; the vision encoder lives on the first pipeline stage.
    model.model_type = ModelType.encoder_or_decoder
    if args.freeze_ViT or args.freeze_LM:
        model.freeze(
            freeze_language_model=args.freeze_LM,
            freeze_vision_model=args.freeze_ViT,
            freeze_vision_projection=False,
        )
    return model
