"""The text-only teacher's view of a batch, and its per-target reference losses.

The teacher is a plain language model with the student's tokenizer. It never
sees images; the batch's image slots (``IMAGE_TOKEN_INDEX`` positions) are
handled in one of two ways (``--regate-teacher-visual``, recorded in the
reference-loss store's metadata):

* ``pad`` (the paper's choice): each image slot becomes the pad token and is
  masked from attention as a key, so no text token sees it; position ids are
  unchanged, so text positions line up with the student's sequence. A slot may
  still attend to itself, so no attention row is empty.
* ``drop``: image slots are removed; each sample's text is left-aligned,
  padded at the end to the batch's longest, and renumbered 0, 1, ...; plain
  causal attention.

Both keep the same target tokens (``loss_mask == 1``) in the same order, so
`reference_losses` returns, per sample, one loss per target in position order:
the layout of the reference-loss store.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from regate_megatron.config import TEACHER_VISUAL_MODES
from regate_megatron.data.llava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Batch

__all__ = ["teacher_inputs", "reference_losses"]


def teacher_inputs(batch: Batch, *, pad_id: int, mode: str) -> Dict[str, Optional[torch.Tensor]]:
    """Inputs of a Megatron ``GPTModel`` forward for the teacher.

    Returns a dict with ``input_ids`` [b, s'], ``position_ids`` [b, s'], ``attention_mask``
    (bool [b, 1, s', s'], True = masked, causality included; ``None`` = plain causal),
    ``labels`` [b, s'] and ``loss_mask`` [b, s']. ``pad``: s' = s; ``drop``: s' = the
    longest sample after removing its image slots.
    """
    if mode not in TEACHER_VISUAL_MODES:
        raise ValueError(
            f"teacher visual mode must be one of {TEACHER_VISUAL_MODES}, got {mode!r}"
        )
    tokens, labels, loss_mask = batch.tokens, batch.labels, batch.loss_mask  # [b, s] each
    visual = tokens == IMAGE_TOKEN_INDEX  # [b, s]
    if bool((visual & (loss_mask > 0)).any()):
        raise ValueError(
            "a target position (loss_mask == 1) holds an image slot; the data must put text "
            "context (\"ASSISTANT: \") before every answer"
        )
    b, s = tokens.shape

    if mode == "pad":
        input_ids = tokens.masked_fill(visual, pad_id)
        position_ids = torch.arange(s, device=tokens.device).expand(b, s)
        causal_future = torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu(1)  # [s, s]
        eye = torch.eye(s, dtype=torch.bool, device=tokens.device)  # [s, s]
        # key j masked for query i if j > i, or if j is an image slot other than i itself.
        # [1, 1, s, s] | ([b, 1, 1, s] & ~[1, 1, s, s]) -> [b, 1, s, s]
        attention_mask = causal_future[None, None] | (visual[:, None, None, :] & ~eye[None, None])
        return dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                    labels=labels.clone(), loss_mask=loss_mask.clone())

    keep = ~visual  # [b, s]
    lengths = keep.sum(dim=1)  # [b]
    s_out = int(lengths.max())
    # Stable sort puts kept positions first, in their original order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :s_out]  # [b, s']
    valid = torch.arange(s_out, device=tokens.device)[None, :] < lengths[:, None]  # [b, s']
    input_ids = tokens.gather(1, order).masked_fill(~valid, pad_id)
    out_labels = labels.gather(1, order).masked_fill(~valid, IGNORE_INDEX)
    out_loss_mask = loss_mask.gather(1, order).masked_fill(~valid, 0.0)
    position_ids = torch.arange(s_out, device=tokens.device).expand(b, s_out)
    return dict(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                labels=out_labels, loss_mask=out_loss_mask)


def reference_losses(per_token_loss: torch.Tensor, view: dict, batch: Batch) -> List[np.ndarray]:
    """Per sample, the teacher's losses at its targets: float32 [n_targets], position order.

    ``per_token_loss`` [b, s'] is the teacher's loss on ``view`` (from `teacher_inputs`).
    """
    mask = view["loss_mask"] > 0  # [b, s']
    if tuple(per_token_loss.shape) != tuple(mask.shape):
        raise ValueError(
            f"per_token_loss has shape {tuple(per_token_loss.shape)} but the teacher view is "
            f"{tuple(mask.shape)}"
        )
    expected = (batch.loss_mask > 0).sum(dim=1)  # [b]
    got = mask.sum(dim=1)
    if not torch.equal(expected.cpu(), got.cpu()):
        raise ValueError("the teacher view does not keep the batch's target tokens")
    losses = per_token_loss.detach().float().cpu()
    mask = mask.cpu()
    return [losses[i][mask[i]].numpy().astype(np.float32) for i in range(losses.shape[0])]
