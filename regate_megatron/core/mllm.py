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

Building one from the command-line flags is the trainer's job
(`regate_megatron.training.model_provider`).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.models.multimodal.llava_model import LLaVAModel

from regate_megatron.config import ReGateConfig
from regate_megatron.core.model import ReGateGPTModel
from regate_megatron.core.selection import TokenSelection
from regate_megatron.data.llava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Batch

__all__ = ["ReGateLLaVAModel", "llava_inputs"]


class ReGateLLaVAModel(LLaVAModel):
    """`LLaVAModel` whose language model routes a `TokenSelection`."""

    def __init__(self, *args, regate_config: Optional[ReGateConfig] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.language_model is not None:
            ReGateGPTModel.adopt(self.language_model, regate_config)

    def forward(self, *args, token_selection: Optional[TokenSelection] = None, **kwargs):
        # No selection given: a caller's `language_model.selecting(...)` around this call
        # (`ReGateForwardBackward`) stays in force.
        routing = (
            self.language_model.selecting(token_selection)
            if self.language_model is not None and token_selection is not None
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
