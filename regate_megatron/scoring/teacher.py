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

__all__ = ["teacher_inputs", "reference_losses", "losses_at_targets",
           "check_keeps_targets", "padded_at_end"]


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


def padded_at_end(view: dict, length: int, pad_id: int,
                  keys=("input_ids", "labels", "loss_mask")) -> dict:
    """The [b, s'] tensors ``keys`` of a teacher view padded at the end to [b, length]: pad
    tokens, ignored labels, no targets (``keep``: not kept). Causal attention, and the routed
    pad view, leave every earlier position as it was."""
    extra = length - view["input_ids"].shape[1]
    if extra < 0:
        raise ValueError(f"a teacher view of length {view['input_ids'].shape[1]} is longer "
                         f"than {length}")
    fill = dict(input_ids=pad_id, labels=IGNORE_INDEX, loss_mask=0.0, keep=False)
    return {name: torch.nn.functional.pad(view[name], (0, extra), value=fill[name])
            for name in keys}


def check_keeps_targets(view_loss_mask: torch.Tensor, batch_loss_mask: torch.Tensor) -> None:
    """A teacher view must keep each sample's target count ([b, s'] vs the batch's [b, s])."""
    expected = (batch_loss_mask > 0).sum(dim=1)  # [b]
    got = (view_loss_mask > 0).sum(dim=1)
    if not torch.equal(expected.cpu(), got.cpu()):
        raise ValueError("the teacher view does not keep the batch's target tokens")


def losses_at_targets(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> List[np.ndarray]:
    """Per sample, ``per_token_loss`` [b, s'] where ``loss_mask`` [b, s'] is set: float32
    [n_targets], position order."""
    mask = loss_mask > 0
    if tuple(per_token_loss.shape) != tuple(mask.shape):
        raise ValueError(
            f"per_token_loss has shape {tuple(per_token_loss.shape)} but the teacher view is "
            f"{tuple(mask.shape)}"
        )
    losses = per_token_loss.detach().float().cpu()
    mask = mask.cpu()
    return [losses[i][mask[i]].numpy().astype(np.float32) for i in range(losses.shape[0])]


def reference_losses(per_token_loss: torch.Tensor, view: dict, batch: Batch) -> List[np.ndarray]:
    """Per sample, the teacher's losses at its targets: float32 [n_targets], position order.

    ``per_token_loss`` [b, s'] is the teacher's loss on ``view`` (from `teacher_inputs`).
    """
    losses = losses_at_targets(per_token_loss, view["loss_mask"])
    check_keeps_targets(view["loss_mask"], batch.loss_mask)
    return losses
