"""The ReGATE EMA inside the model's checkpoint state, so Megatron-LM's own
``save_checkpoint`` / ``load_checkpoint`` carry it.

`carry_regate_state(model, state)` extends the model the provider returns:

- ``sharded_state_dict()`` (``--ckpt-format torch_dist``) adds ``regate.ema_table`` (the
  table sharded over data-parallel ranks, reshardable to any DP size) and
  ``regate.vocab_ema`` as ``ShardedTensor``s;
- ``state_dict_for_save_checkpoint()`` (``--ckpt-format torch``, which Megatron-LM's
  multimodal scripts require) adds them as plain tensors. That format is written by
  data-parallel rank 0 only, so the table is *replicated* there (`ReGateState(replicated=
  True)`: every rank holds all of it; the update keeps the copies identical);
- ``load_state_dict()`` takes the ``regate.`` entries out before the model's own (strict)
  load and hands them to the scorer, or keeps them until the scorer is built.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["PREFIX", "ReGateState", "carry_regate_state"]

PREFIX = "regate."


class ReGateState:
    """The run's scorer (`ReGateScorer`, set once built) and its checkpoint entries."""

    def __init__(self, replicated: bool):
        self.replicated = replicated
        self.scorer = None
        self._pending: Optional[dict] = None

    def build_scorer(self, config, layout, vocab_size: int, seed: int = 0):
        """The run's `ReGateScorer` over the world, with this rank's roles (`core.roles`):
        the EMA sharded over data-parallel ranks, or whole on every rank when replicated.
        Collective only through what ``layout`` needed to be read."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from regate_megatron.core.roles import is_loss_rank, is_selection_source
        from regate_megatron.scoring.scorer import ReGateScorer

        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        return ReGateScorer(
            config, layout, vocab_size, group=dist.group.WORLD,
            dp_rank=0 if self.replicated else dp_rank, dp_size=1 if self.replicated else dp_size,
            lookup_source=is_selection_source() and (dp_rank == 0 or not self.replicated),
            loss_source=is_loss_rank(), seed=seed)

    def attach(self, scorer) -> None:
        """Use ``scorer`` from now on; a state loaded before it existed goes into it now."""
        if self.replicated and scorer.ema.dp_size != 1:
            raise ValueError(f"--ckpt-format torch needs the EMA table replicated (dp_size=1), "
                             f"got one sharded over dp_size={scorer.ema.dp_size}")
        self.scorer = scorer
        if self._pending is not None:
            scorer.load_state_dict(self._pending)
            self._pending = None

    def sharded_state_dict(self, prefix: str = "") -> dict:
        """``{prefix}regate.*`` ShardedTensors (empty before the scorer exists)."""
        if self.scorer is None:
            return {}
        entries = self.scorer.sharded_state_dict(prefix=f"{prefix}{PREFIX}")
        return {f"{prefix}{PREFIX}{name}": value for name, value in entries.items()}

    def state_dict(self, prefix: str = "") -> dict:
        """``{prefix}regate.*`` plain tensors for the ``torch`` format (the whole table)."""
        if self.scorer is None:
            return {}
        if not self.replicated:
            raise ValueError("--ckpt-format torch saves on data-parallel rank 0 only; the EMA "
                             "table must be replicated (ReGateState(replicated=True))")
        ema = self.scorer.ema
        return {f"{prefix}{PREFIX}ema_table": ema.values.clone(),
                f"{prefix}{PREFIX}vocab_ema": ema.vocab_ema.clone()}

    def load(self, entries: dict) -> None:
        """``{"ema_table", "vocab_ema"}`` from a checkpoint."""
        if self.scorer is None:
            self._pending = entries
        else:
            self.scorer.load_state_dict(entries)


class _CarriesReGateState:
    """Mixed in front of the model's class by `carry_regate_state`."""

    regate_state: ReGateState

    def sharded_state_dict(self, prefix: str = "", *args, **kwargs):
        state = super().sharded_state_dict(prefix, *args, **kwargs)
        state.update(self.regate_state.sharded_state_dict(prefix))
        return state

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict_for_save_checkpoint(prefix=prefix, keep_vars=keep_vars)
        state.update(self.regate_state.state_dict(prefix))
        return state

    def load_state_dict(self, state_dict, strict: bool = True, *args, **kwargs):
        ours = {k[len(PREFIX):]: state_dict[k] for k in list(state_dict) if k.startswith(PREFIX)}
        rest = {k: v for k, v in state_dict.items() if not k.startswith(PREFIX)}
        if ours:
            if isinstance(next(iter(ours.values())), torch.Tensor):
                self.regate_state.load(ours)
        return super().load_state_dict(rest, strict, *args, **kwargs)


_CLASSES: dict = {}


def carry_regate_state(model: torch.nn.Module, state: ReGateState) -> torch.nn.Module:
    """Make ``model`` (the unwrapped module the provider returns) save and load ``state``
    with its own parameters. Idempotent; returns ``model``."""
    cls = type(model)
    if not isinstance(model, _CarriesReGateState):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"{cls.__name__}WithReGateState", (_CarriesReGateState, cls), {})
        model.__class__ = _CLASSES[cls]
    model.regate_state = state
    return model
