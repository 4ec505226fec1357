"""The ReGATE loss of one micro-batch: per-token losses summed over the *computed* targets
(kept by the selection), with Megatron-LM's ``loss_func`` return form, recorded for the EMA.

Elided targets get no loss and no gradient; the count is the computed targets, so
Megatron-LM's reduction (sum of losses / sum of counts over micro-batches and DP ranks)
normalises per computed token, as ``regate-train`` does.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from regate_megatron.core.selection import TokenSelection

__all__ = ["regate_loss", "KEPT_KEY"]

KEPT_KEY = "regate kept fraction"
"""The loss dict's [computed targets, targets] of a micro-batch: Megatron-LM reduces such a
pair over the micro-batches and DP ranks of a step into the step's kept fraction, printed in
its iteration log line and written to TensorBoard under this name."""


def regate_loss(selection: TokenSelection, records: Optional[List], output_tensor: torch.Tensor,
                check: Optional[Callable[[torch.Tensor], None]] = None):
    """Megatron loss function: ``(loss_sum, computed_count, {"lm loss": [sum, count],
    KEPT_KEY: [computed count, target count]})``.

    ``output_tensor`` is the model's per-token loss [b, L] in the combined sequence;
    ``records`` (a list, or None) receives ``(per_token_loss, computed_mask)`` for the EMA;
    ``check`` (or None) is called with the loss sum (Megatron-LM: its NaN/inf/spike checks).
    """
    computed = selection.computed_loss_mask()  # [b, L] bool: kept targets
    if tuple(output_tensor.shape) != tuple(computed.shape):
        raise ValueError(
            f"the model's per-token loss is {tuple(output_tensor.shape)} but the selection is "
            f"for [batch, seq] {tuple(computed.shape)}: the combined length differs from "
            f"expand_targets' (check --decoder-seq-length and the image token count)"
        )
    computed = computed.to(output_tensor.device)
    loss_sum = (output_tensor.float() * computed).sum()
    count = computed.sum()
    if check is not None:
        check(loss_sum)
    if records is not None:
        records.append((output_tensor.detach().float(), computed))
    report = torch.stack([loss_sum.detach(), count.float()])
    targets = selection.target_mask.to(output_tensor.device).sum()
    kept = torch.stack([count.float(), targets.float()])
    return loss_sum, count.int(), {"lm loss": report, KEPT_KEY: kept}
