"""What the step needs from a Megatron-LM batch: sample ids and the targets in the combined
(image-expanded) sequence.

Megatron-LM's multimodal batches carry *one* placeholder token (``IMAGE_TOKEN_INDEX``) per
image; `LLaVAModel` expands each into ``num_tiles * img_seq_len`` embeddings. Selections are
in those combined coordinates, so the selection source rebuilds, per micro-batch, the labels
and loss mask LLaVA will build (`expand_targets`: LLaVA's rule, the inverse of
`regate_megatron.core.mllm.llava_inputs`).

A *batch view* turns one script's batch into a `TextBatch`; `pretrain_vlm_view` and
`multimodal_train_view` are the two scripts' views, `expanded_view` is ``regate-train``'s
(its `regate_megatron.data.llava.Batch` is already in the combined layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from regate_megatron.data.llava import IGNORE_INDEX, IMAGE_TOKEN_INDEX

__all__ = [
    "TextBatch",
    "BatchView",
    "expand_targets",
    "expand_tokens",
    "combined_lengths",
    "pretrain_vlm_view",
    "multimodal_train_view",
    "expanded_view",
]


@dataclass
class TextBatch:
    """One micro-batch as the script feeds LLaVA (one placeholder per image).

    sample_ids:      [b] int64, stable ids (`regate_megatron.megatron_lm.sample_ids`).
    input_ids:       [b, t] int64, ``IMAGE_TOKEN_INDEX`` at each image's placeholder.
    labels:          [b, t] int64, LLaVA's convention (label at t is the target of t).
    loss_mask:       [b, t] float.
    num_image_tiles: [num_images] int, tiles per image in order (None: one tile each).
    expanded:        the batch is already in the combined layout (one position per image
                     embedding slot, labels at their combined positions): `expand_targets`
                     takes its labels and loss mask as they are.
    """

    sample_ids: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    num_image_tiles: Optional[torch.Tensor] = None
    expanded: bool = False

    def rows(self, keep: torch.Tensor) -> "TextBatch":
        """The samples where ``keep`` [b] (bool) is set, their images' tiles with them."""
        keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
        tiles = self.num_image_tiles
        if tiles is not None:
            tiles = torch.as_tensor(tiles)
            images = (self.input_ids == IMAGE_TOKEN_INDEX).sum(1).cpu()  # [b]
            owner = torch.repeat_interleave(torch.arange(keep.numel()), images)  # [num_images]
            tiles = tiles[keep[owner].to(tiles.device)]
        index = keep.nonzero().flatten()
        return TextBatch(*(t[index.to(t.device)] for t in (self.sample_ids, self.input_ids,
                                                            self.labels, self.loss_mask)),
                         num_image_tiles=tiles, expanded=self.expanded)


BatchView = Callable[[dict], TextBatch]


def _sample_ids(batch: dict) -> torch.Tensor:
    if "sample_ids" not in batch:
        raise KeyError(
            "the batch has no 'sample_ids': wrap the training dataset with "
            "regate_megatron.megatron_lm.with_sample_ids (or give each item a stable integer "
            "'sample_ids' entry) so ReGATE can find each sample's EMA"
        )
    return torch.as_tensor(batch["sample_ids"]).long().reshape(-1)


def pretrain_vlm_view(batch: dict) -> TextBatch:
    """Megatron-LM's ``pretrain_vlm.py`` (MultimodalDataset items: ``tokens``, ``labels``,
    ``loss_mask``, ``image``; one tile per image)."""
    return TextBatch(_sample_ids(batch), batch["tokens"].long(), batch["labels"].long(),
                     batch["loss_mask"].float())


def multimodal_train_view(batch: dict, pad_token: Optional[int] = None,
                          image_token: Optional[int] = None) -> TextBatch:
    """Megatron-LM's ``examples/multimodal/train.py``: ``labels`` are one longer than
    ``tokens`` (the script drops the first), the loss mask is where a label is trained
    (``!= IGNORE_INDEX`` and, given ``pad_token``, not padding), ``num_tiles`` per image.
    ``image_token``: the id the script's tokenizer gives ``<image>`` (its LLaVA model's
    ``image_token_index``), when it is not ``IMAGE_TOKEN_INDEX``."""
    tokens = batch["tokens"].long()
    if image_token is not None and image_token != IMAGE_TOKEN_INDEX:
        tokens = tokens.masked_fill(tokens == image_token, IMAGE_TOKEN_INDEX)
    text_length = tokens.shape[1]
    labels = batch["labels"].long()[:, 1:text_length + 1]
    loss_mask = (labels != IGNORE_INDEX).float()
    if pad_token is not None:
        loss_mask = loss_mask * (labels != pad_token).float()
    tiles = batch.get("num_tiles")
    return TextBatch(_sample_ids(batch), tokens, labels, loss_mask,
                     None if tiles is None else torch.as_tensor(tiles).reshape(-1))


def expanded_view(batch) -> TextBatch:
    """``regate-train``'s `regate_megatron.data.llava.Batch`: already expanded, with ids."""
    return TextBatch(batch.sample_ids, batch.tokens, batch.labels, batch.loss_mask,
                     expanded=True)


def _slots(text: TextBatch, img_seq_len: int):
    """(is_image [b, t], last_slot [b, t], seq_lens [b]) of ``text`` in the combined
    sequence: every image placeholder takes ``tiles * img_seq_len`` slots, a text token one;
    ``last_slot`` is each token's last combined position (LLaVA's expansion)."""
    input_ids = text.input_ids  # [b, t]
    b, t = input_ids.shape
    is_image = (input_ids == IMAGE_TOKEN_INDEX).cpu()  # [b, t]
    num_images = int(is_image.sum())
    tiles = (torch.ones(num_images, dtype=torch.long) if text.num_image_tiles is None
             else torch.as_tensor(text.num_image_tiles).long().cpu())
    if tiles.numel() != num_images:
        raise ValueError(f"num_image_tiles has {tiles.numel()} entries for {num_images} image "
                         f"placeholders in the batch")
    width = torch.ones(b, t, dtype=torch.long)
    width[is_image] = tiles * img_seq_len
    last_slot = width.cumsum(1) - 1  # [b, t]
    return is_image, last_slot, last_slot[:, -1] + 1


def expand_targets(
    text: TextBatch,
    img_seq_len: int,
    max_length: int,
    pad_to_max_length: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Labels and loss mask [b, L] of the combined sequence, exactly as `LLaVAModel` builds
    them from ``text``: every image placeholder becomes ``tiles * img_seq_len`` slots (loss
    0), a text token keeps its loss mask, a label moves to the slot just before the next
    text token (the sample's last label to its last slot), the position just before an
    image is not trained, and L = the longest combined sample (``max_length`` when
    ``pad_to_max_length``, as LLaVA pads under pipeline parallelism), cut to ``max_length``.
    """
    if text.expanded:  # [b, L] already
        return text.labels[:, :max_length], text.loss_mask[:, :max_length]
    b = text.input_ids.shape[0]
    is_image, last_slot, seq_lens = _slots(text, img_seq_len)
    length = int(seq_lens.max())
    if pad_to_max_length:
        length = max(length, max_length)
    out_labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    out_mask = torch.zeros(b, length, dtype=torch.float32)
    labels, loss_mask = text.labels.cpu(), text.loss_mask.cpu().float()
    for i in range(b):
        text_pos = (~is_image[i]).nonzero().flatten()  # [n] text indices
        slot = last_slot[i, text_pos]  # [n] their combined positions
        out_mask[i, slot] = loss_mask[i, text_pos]
        shifted = text_pos >= 1
        out_labels[i, slot[shifted] - 1] = labels[i, text_pos[shifted] - 1]
        out_labels[i, int(seq_lens[i]) - 1] = labels[i, -1]
        before_image = is_image[i].nonzero().flatten() - 1
        before_image = before_image[before_image >= 0]
        out_mask[i, last_slot[i, before_image]] = 0.0
    return out_labels[:, :max_length], out_mask[:, :max_length]


def combined_lengths(text: TextBatch, img_seq_len: int, max_length: int) -> torch.Tensor:
    """int64 [b]: each sample's length in the combined sequence, cut to ``max_length``."""
    if text.expanded:
        return torch.full((text.input_ids.shape[0],), min(text.input_ids.shape[1], max_length))
    return _slots(text, img_seq_len)[2].clamp(max=max_length)


def expand_tokens(text: TextBatch, img_seq_len: int, max_length: int,
                  pad_id: int) -> torch.Tensor:
    """int64 [b, L]: the combined sequence's input ids, as `expand_targets` lays out the
    targets (L the same): ``IMAGE_TOKEN_INDEX`` in every image slot, each text token at its
    slot, ``pad_id`` after a sample's end, cut to ``max_length``."""
    if text.expanded:
        return text.input_ids[:, :max_length].long()
    b = text.input_ids.shape[0]
    is_image, last_slot, seq_lens = _slots(text, img_seq_len)
    out = torch.full((b, int(seq_lens.max())), pad_id, dtype=torch.long)
    input_ids = text.input_ids.cpu().long()
    for i in range(b):
        out[i, :int(seq_lens[i])] = IMAGE_TOKEN_INDEX
        text_pos = (~is_image[i]).nonzero().flatten()
        out[i, last_slot[i, text_pos]] = input_ids[i, text_pos]
    return out[:, :max_length]
