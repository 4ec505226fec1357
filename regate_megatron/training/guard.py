"""Never train on, log or save a non-finite number (Megatron-LM's
`--check-for-nan-in-loss-and-grad`, on by default).

Once per step, after the forward/backward schedule and before anything consumes the
step (the ReGATE EMA update, the optimizer step, the metrics, a checkpoint), every rank
contributes to one all-reduce over the world: the loss ranks their loss sums and which
global-batch slots have a non-finite loss, every rank whether its gradient buffers hold a
non-finite value. Every rank therefore reaches the same verdict and stops at the same
step, whatever the TP x PP x DP layout. A checkpoint is written only when every parameter
is finite (`check_params_finite`), and the metrics file stays strict JSON
(`json_safe`: a non-finite float is written as null).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from regate_megatron.training.parallel import collective_device

__all__ = [
    "NonFiniteError",
    "check_step_finite",
    "check_grad_norm_finite",
    "check_params_finite",
    "json_safe",
]

_FIX = ("lower --lr (or raise --lr-warmup-iters / --clip-grad), check the named samples' data, "
        "then resume from the last checkpoint with --load")


class NonFiniteError(ValueError):
    """The run met a NaN/inf; the message names the step, loss, learning rate and samples.
    A ValueError, so the command-line tools report it as one line and exit 2."""


def _fmt(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def check_step_finite(
    step: int,
    records: Sequence[tuple],
    slot_offset: int,
    global_ids: Sequence[int],
    model_chunks: Sequence[torch.nn.Module],
    lr: float,
    contributes: bool,
    group: Optional[dist.ProcessGroup] = None,
) -> None:
    """Raise `NonFiniteError` on every rank if any rank saw a non-finite loss or gradient.

    records:     this rank's (per-token loss [b, s], computed mask [b, s]) per micro-batch,
                 in micro-batch order (`regate_loss`'s records; empty off the loss rank).
    slot_offset: index in `global_ids` of this rank's first sample (dp_rank x per-rank).
    contributes: whether this rank's losses count (last pipeline stage, TP rank 0), so every
                 loss is counted once.
    """
    # payload: [loss sum, computed targets, non-finite loss, non-finite grads, flag per slot];
    # a NaN loss sum stays in its own entry (an element-wise sum), the flags stay exact. It
    # lives on this rank's device (NCCL reduces device tensors); one host sync at the end.
    device = collective_device(group)
    payload = torch.zeros(4 + len(global_ids), dtype=torch.float64, device=device)
    if contributes:
        slot = slot_offset
        for loss, computed in records:
            mask = computed.bool()
            # [b, s] -> [b]: a row is bad if a computed target's loss is NaN/inf
            bad_rows = (~torch.isfinite(loss) & mask).any(dim=1)
            payload[0] += (loss.double() * mask).sum().to(device)
            payload[1] += mask.sum().to(device)
            payload[4 + slot:4 + slot + loss.shape[0]] = bad_rows.to(device, torch.float64)
            slot += loss.shape[0]
        payload[2] = (~torch.isfinite(payload[0])).to(torch.float64)
    for chunk in model_chunks:
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
            payload[3] = torch.maximum(
                payload[3], (~torch.isfinite(buffer.grad_data).all()).to(device, torch.float64))
    dist.all_reduce(payload, group=group)  # sync point: every rank reaches the same verdict
    payload = payload.cpu()
    bad_loss, bad_grad = float(payload[2]) > 0, float(payload[3]) > 0
    bad_slots = [int(global_ids[i]) for i in range(len(global_ids)) if float(payload[4 + i]) > 0]
    if not (bad_loss or bad_grad or bad_slots):
        return
    loss = float(payload[0]) / max(float(payload[1]), 1.0)
    what = f"loss {_fmt(loss)}" if (bad_loss or bad_slots) else f"finite loss {_fmt(loss)} but"
    grads = (" and" if bad_loss or bad_slots else "") + " non-finite gradients" if bad_grad else ""
    samples = (f" on samples {bad_slots}" if bad_slots
               else f" (global batch: samples {list(map(int, global_ids))})")
    raise NonFiniteError(
        f"step {step}: {what}{grads}{samples} at lr {_fmt(lr)}; stopped before the optimizer "
        f"step, nothing of step {step} was saved; {_FIX}"
    )


def check_grad_norm_finite(step: int, grad_norm: Optional[float], lr: float, loss: float) -> None:
    """The optimizer's gradient norm (identical on every rank) must be finite."""
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        raise NonFiniteError(
            f"step {step}: gradient norm {grad_norm} (loss {_fmt(loss)}, lr {_fmt(lr)}); "
            f"stopped before logging or saving step {step}; {_FIX}"
        )


def check_params_finite(model_chunks: Sequence[torch.nn.Module], iteration: int,
                        group: Optional[dist.ProcessGroup] = None) -> None:
    """Refuse (on every rank) to checkpoint parameters that hold a NaN/inf."""
    named = [(name, p) for chunk in model_chunks for name, p in chunk.named_parameters()]
    device = collective_device(group)
    not_finite = [(~torch.isfinite(p.detach()).all()).to(device) for _, p in named]
    flag = (torch.stack(not_finite).sum() if not_finite
            else torch.zeros((), device=device)).to(torch.float64).reshape(1)
    dist.all_reduce(flag, group=group)  # sync point: all ranks save or none does
    flag = flag.cpu()
    if float(flag[0]) > 0:
        bad: List[str] = [name for (name, _), nf in zip(named, not_finite, strict=True) if bool(nf)]
        example = f" (e.g. {bad[0]})" if bad else ""
        raise NonFiniteError(
            f"iteration {iteration}: {int(flag[0])} parameter tensor(s) hold NaN/inf{example}; "
            f"refusing to save them (the latest checkpoint is left as it was); {_FIX}"
        )


def json_safe(value):
    """`value` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
