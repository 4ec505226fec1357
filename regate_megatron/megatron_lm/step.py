"""Once per optimizer step, around the ``forward_backward_func`` Megatron-LM's ``train_step``
calls: what must happen outside the 1F1B schedule.

    prefetch  this step's micro-batches from the data iterator (ranks that hold one)
    ids       the global batch's sample ids, in DP-rank order (one all-reduce)
    before    ``before_step(step)``, if given (``regate-train``: the online teacher's losses)
    score     rho_t and the EMA lookup (``begin_step``, collective); selections on the
              model-parallel source rank (`is_selection_source`) from the targets in the
              combined sequence (`expand_targets`)
    share     `broadcast_selections` to every TP x PP rank of the group
    schedule  the inner schedule over the prefetched batches; each micro-batch's forward runs
              with its selection (`ReGateGPTModel.selecting`) and its loss is `regate_loss`
    after     ``after_schedule(info)``, if given: it may raise to stop the step before the
              EMA changes (``regate-train``: the NaN/inf guard)
    ema       the loss rank records the computed targets' losses; ``end_step`` (collective)
              folds them in, unless a computed loss is NaN/inf on any rank or the step
              was folded in already (Megatron-LM's rerun state machine runs a step's
              forward-backward again when a result check fails)

Evaluation (``forward_only=True``) and runs without ``--regate`` go straight to the inner
schedule. ``regate-train``'s step is this object too (``regate_megatron.training.train``);
`StepInfo` (``last``) is what one step saw, for hooks and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, List, Optional

import torch
from megatron.core import parallel_state as ps

from regate_megatron.core.roles import is_logging_rank, is_loss_rank, is_selection_source
from regate_megatron.core.selection import broadcast_selections
from regate_megatron.megatron_lm.batch import BatchView, expand_targets
from regate_megatron.megatron_lm.loss import regate_loss
from regate_megatron.megatron_lm.model import language_model_of
from regate_megatron.megatron_lm.state import ReGateState

__all__ = ["ReGateForwardBackward", "StepInfo"]


@dataclass
class StepInfo:
    """One training step as this rank saw it (`ReGateForwardBackward.last`).

    step:        the optimizer step.
    global_ids:  [dp x local] int64, every DP rank's sample ids of the step, DP-rank order.
    local_slice: this DP rank's part of ``global_ids``.
    selections:  per micro-batch `TokenSelection` (identical on the model-parallel group).
    records:     per micro-batch ``(per_token_loss [b, L] float, computed_mask [b, L] bool)``
                 on the loss rank (`is_loss_rank`); empty elsewhere.
    ema_updated: whether the step's losses reached the EMA (set after the schedule).
    """

    step: int
    global_ids: torch.Tensor
    local_slice: slice
    selections: list
    records: List = field(default_factory=list)
    ema_updated: bool = False


class ReGateForwardBackward:
    """A ``forward_backward_func`` that runs ``inner`` with ReGATE token selection.

    Args:
        inner: Megatron-Core's schedule (``get_forward_backward_func()``).
        state: the run's `ReGateState`; ``state.scorer`` is built by ``build_scorer`` at
            the first training call when it does not exist yet (collective).
        view: the script's batch -> `TextBatch` (`pretrain_vlm_view`, ...).
        img_seq_len: combined-sequence slots per image tile.
        max_length: the language model's maximum (combined) sequence length.
        pad_to_max_length: LLaVA pads the combined sequence to ``max_length`` (pipeline
            parallel language model).
        step_of: the optimizer step about to run (Megatron-LM: ``args.curr_iteration``);
            default: a counter of training calls.
        build_scorer: builds the scorer when ``state`` has none yet (collective).
        before_step: called with the step on every rank before the EMA lookup (collective
            ``begin_step``): work the scorer needs first, e.g. waiting for an online
            teacher's reference losses.
        after_schedule: called with the step's `StepInfo` on every rank after the inner
            schedule and before the EMA record/update; raising stops the step with the EMA
            unchanged (e.g. a NaN/inf guard).
        check_loss: called with each micro-batch's ReGATE loss sum (the script's own loss
            function, which would check it, is replaced by `regate_loss`).
    """

    def __init__(self, inner: Callable, state: ReGateState, view: BatchView, *,
                 img_seq_len: int, max_length: int, pad_to_max_length: bool = False,
                 step_of: Optional[Callable[[], int]] = None,
                 build_scorer: Optional[Callable[[], object]] = None,
                 before_step: Optional[Callable[[int], None]] = None,
                 after_schedule: Optional[Callable[[StepInfo], None]] = None,
                 check_loss: Optional[Callable[[torch.Tensor], None]] = None):
        self.inner, self.state, self.view = inner, state, view
        self.img_seq_len, self.max_length = img_seq_len, max_length
        self.pad_to_max_length = pad_to_max_length
        self.step_of, self.build_scorer = step_of, build_scorer
        self.before_step, self.after_schedule = before_step, after_schedule
        self.check_loss = check_loss
        self.calls = 0
        self.folded_step: Optional[int] = None  # the last step whose losses reached the EMA
        self.last: Optional[StepInfo] = None  # the last training step (hooks, metrics)

    @property
    def last_selections(self) -> list:
        """This rank's selections of the last training step."""
        return [] if self.last is None else self.last.selections

    def __call__(self, *, forward_step_func, data_iterator, model, num_microbatches,
                 forward_only=False, **kwargs):
        if forward_only:
            return self.inner(forward_step_func=forward_step_func, data_iterator=data_iterator,
                              model=model, num_microbatches=num_microbatches,
                              forward_only=True, **kwargs)
        if isinstance(data_iterator, list) or (isinstance(model, list) and len(model) > 1):
            raise ValueError("ReGATE does not wrap the interleaved pipeline schedule; drop "
                             "--num-layers-per-virtual-pipeline-stage")
        scorer = self._scorer()
        step = self.step_of() if self.step_of is not None else self.calls
        self.calls += 1
        # prefetch: every rank that holds an iterator reads its micro-batches of this step
        batches = (None if data_iterator is None
                   else [next(data_iterator) for _ in range(num_microbatches)])
        texts = targets = None
        if batches is not None:
            texts = [self.view(batch) for batch in batches]
            targets = [expand_targets(text, self.img_seq_len, self.max_length,
                                      self.pad_to_max_length) for text in texts]
        source, loss_rank = is_selection_source(), is_loss_rank()
        for role, holds in (("selection source (TP rank 0, first stage)", source),
                            ("loss rank (TP rank 0, last stage)", loss_rank)):
            if holds and batches is None:
                raise RuntimeError(f"the {role} has no data iterator: ReGATE needs its batches")
        global_ids = self._global_ids(texts, num_microbatches * kwargs["micro_batch_size"])
        share = global_ids.numel() // ps.get_data_parallel_world_size()
        dp_rank = ps.get_data_parallel_rank()
        local = slice(dp_rank * share, (dp_rank + 1) * share)
        if self.before_step is not None:
            self.before_step(step)
        scorer.begin_step(step, global_ids, local)
        mine = None
        if source:
            mine = [scorer.select(text.sample_ids, labels, mask)
                    for text, (labels, mask) in zip(texts, targets, strict=True)]
        # Sync point: the model-parallel group receives its source rank's selections.
        selections = broadcast_selections(mine, ps.get_model_parallel_group(),
                                          device=_device_of(model))
        info = self.last = StepInfo(step, global_ids, local, selections)
        result = self.inner(
            forward_step_func=partial(_routed_forward_step, forward_step_func,
                                      iter(selections), info.records if loss_rank else None,
                                      self.check_loss),
            data_iterator=None if batches is None else iter(batches),
            model=model, num_microbatches=num_microbatches, forward_only=False, **kwargs)
        if self.after_schedule is not None:
            self.after_schedule(info)
        rerun = step == self.folded_step  # the same on every rank: no collective decides it
        if loss_rank and not rerun:
            for text, (labels, mask), (loss, computed) in zip(texts, targets, info.records,
                                                              strict=True):
                scorer.record(text.sample_ids, labels, mask, loss, computed)
        # collective (unless a rerun): the EMA update from the computed targets
        info.ema_updated = scorer.end_step(update=not rerun)
        if info.ema_updated:
            self.folded_step = step
        elif not rerun and scorer.config.enabled and is_logging_rank():
            print(f"ReGATE: step {step} was left out of the EMA: a computed target's loss was "
                  f"NaN/inf on some rank ({scorer.ema.skipped_updates} steps left out so far)",
                  flush=True)
        return result

    def _scorer(self):
        if self.state.scorer is None:
            if self.build_scorer is None:
                raise RuntimeError("ReGateForwardBackward: no scorer and no build_scorer")
            self.state.attach(self.build_scorer())
        return self.state.scorer

    @staticmethod
    def _global_ids(texts, local_count: int) -> torch.Tensor:
        """Every DP rank's sample ids of this step, in DP-rank order (each DP rank's
        selection source contributes its row)."""
        from regate_megatron.training.parallel import summed

        dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        rows = torch.zeros(dp_size, local_count, dtype=torch.long)
        if is_selection_source():
            ids = torch.cat([text.sample_ids.cpu() for text in texts])
            if ids.numel() != local_count:
                raise ValueError(f"the step's micro-batches hold {ids.numel()} samples, "
                                 f"expected {local_count} (num_microbatches x micro_batch_size)")
            rows[dp_rank] = ids
        return summed(rows).reshape(-1)  # sync point


def _device_of(model) -> torch.device:
    chunk = model[0] if isinstance(model, list) else model
    return next(chunk.parameters()).device


def _routed_forward_step(forward_step_func, selections, records, check_loss, data_iterator,
                         model, *rest):
    """The script's forward step under this micro-batch's selection, with the ReGATE loss."""
    selection = next(selections)
    lm = language_model_of(model)
    if lm is None:
        output, _ = forward_step_func(data_iterator, model, *rest)
    else:
        with lm.selecting(selection):
            output, _ = forward_step_func(data_iterator, model, *rest)
    return output, partial(regate_loss, selection, records, check=check_loss)
