"""The student-loss EMA per (sample, target), sharded over data-parallel ranks, plus the
replicated per-vocabulary-id EMA, and their Megatron ``sharded_state_dict``.

The EMA has the reference-loss store's ragged layout (``offsets`` np.int64 [N+1] over sample
ids 0..N-1), flat over F = ``offsets[-1]`` values, float32 with NaN = never observed;
data-parallel rank r owns the contiguous range ``[r*F//dp, (r+1)*F//dp)`` like the
distributed optimizer owns its state. The per-vocabulary EMA [V] is replicated.

Exchange, per optimizer step, on every rank of the process group: `EmaTable.lookup`, one
all-reduce that reads the EMA of every target of the global batch, and `EmaTable.update`,
one all-reduce of the computed targets' losses, after which every rank updates the range it
owns and the replicated vocabulary EMA. Both all-reduces are laid out over the global
batch's targets (`BatchLayout`: sample ids of all DP ranks, in DP-rank order, known to
every rank from the deterministic sampler), so every rank ends with identical values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["SampleIds", "BatchLayout", "EmaTable"]

SampleIds = Union[torch.Tensor, np.ndarray, Sequence[int]]


def _ema_step(ema: torch.Tensor, observed: torch.Tensor, decay: float) -> torch.Tensor:
    """e <- observed on the first observation (e is NaN), else decay*e + (1-decay)*observed."""
    return torch.where(torch.isnan(ema), observed, decay * ema + (1.0 - decay) * observed)



@dataclass(frozen=True)
class BatchLayout:
    """The flat layout of a global batch's targets that both exchanges use.

    Slot ``slot_start[i] + j`` holds target ``j`` of the batch's ``i``-th sample, whose
    value lives at ``flat_index[slot]`` of the EMA table.
    """

    sample_ids: torch.Tensor   # [n] int64, all DP ranks' micro-batches in DP-rank order
    num_targets: torch.Tensor  # [n] int64
    slot_start: torch.Tensor   # [n] int64, exclusive cumulative sum of num_targets
    flat_index: torch.Tensor   # [G] int64

    @property
    def num_slots(self) -> int:
        return self.flat_index.numel()


class EmaTable:
    """Student-loss EMA per (sample, target), sharded over data-parallel ranks, plus the
    replicated per-vocabulary-id EMA; exchanged with one all-reduce per lookup/update.

    Args:
        offsets: np.int64 [N+1], the reference-loss store's ragged layout.
        vocab_size: V, size of the per-vocabulary EMA.
        decay: beta of ``e <- beta*e + (1-beta)*loss``.
        group: process group of every rank taking part (all TP/PP/DP ranks that call
            `lookup`/`update`); None = a single process, no communication.
        dp_rank, dp_size: this rank's data-parallel coordinates; they pick the owned range.
        lookup_source: this rank contributes its owned values to lookups (exactly one
            rank per DP rank in ``group``, e.g. TP rank 0 of the first pipeline stage).
        loss_source: this rank contributes the losses it computed to updates (e.g. TP
            rank 0 of the last pipeline stage).
    """

    def __init__(
        self,
        offsets: np.ndarray,
        vocab_size: int,
        decay: float,
        *,
        group: Optional[dist.ProcessGroup] = None,
        dp_rank: int = 0,
        dp_size: int = 1,
        lookup_source: bool = True,
        loss_source: bool = True,
    ):
        offsets = np.asarray(offsets)
        if offsets.ndim != 1 or offsets.size < 1 or offsets.dtype.kind not in "iu":
            raise ValueError(
                f"ref store offsets must be a 1-D integer array [num_samples + 1], got "
                f"dtype {offsets.dtype} shape {offsets.shape}"
            )
        if offsets[0] != 0 or bool((np.diff(offsets) < 0).any()):
            raise ValueError("ref store offsets must start at 0 and never decrease")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--regate-ema-decay must be in [0, 1), got {decay!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        if group is None and dp_size > 1:
            raise ValueError(
                f"EmaTable: dp_size={dp_size} needs the process group of the ranks that "
                f"exchange (pass group=...)"
            )
        self.offsets = offsets.astype(np.int64)
        self.vocab_size = int(vocab_size)
        self.decay = float(decay)
        self.group = group
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.lookup_source, self.loss_source = lookup_source, loss_source
        self.skipped_updates = 0  # steps left out for a non-finite loss (`update`)
        num_values = int(self.offsets[-1])
        self.owned_range: Tuple[int, int] = (
            dp_rank * num_values // dp_size, (dp_rank + 1) * num_values // dp_size
        )
        lo, hi = self.owned_range
        self.values = torch.full((hi - lo,), float("nan"), dtype=torch.float32)  # owned shard
        self.vocab_ema = torch.full((self.vocab_size,), float("nan"), dtype=torch.float32)

    @property
    def num_samples(self) -> int:
        return self.offsets.size - 1

    @property
    def num_values(self) -> int:
        """F, the total number of (sample, target) entries."""
        return int(self.offsets[-1])

    # ------------------------------------------------------------------ layout
    def layout(self, sample_ids: SampleIds) -> BatchLayout:
        """The flat target layout of a global batch (no communication)."""
        ids = np.asarray(
            sample_ids.cpu().numpy() if isinstance(sample_ids, torch.Tensor) else sample_ids,
            dtype=np.int64,
        ).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.num_samples)]
        if bad.size:
            raise ValueError(
                f"sample ids {bad.tolist()[:8]} are outside the reference-loss store's "
                f"[0, {self.num_samples}); the store was built for other data"
            )
        starts = self.offsets[ids]
        counts = self.offsets[ids + 1] - starts
        slot_start = np.cumsum(counts) - counts  # exclusive cumulative sum
        total = int(counts.sum())
        # flat_index[slot_start[i] + j] = offsets[id_i] + j
        flat = np.repeat(starts - slot_start, counts) + np.arange(total, dtype=np.int64)
        return BatchLayout(
            torch.from_numpy(ids.copy()), torch.from_numpy(counts), torch.from_numpy(slot_start),
            torch.from_numpy(flat),
        )

    def _owned(self, flat_index: torch.Tensor) -> torch.Tensor:
        lo, hi = self.owned_range
        return (flat_index >= lo) & (flat_index < hi)

    def _all_reduce(self, payload: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return payload
        from regate_megatron.training.parallel import summed

        return summed(payload, self.group)

    # ------------------------------------------------------------------ exchange
    def lookup(self, layout: BatchLayout) -> torch.Tensor:
        """EMA of every slot of the global batch, [G] float32, NaN = never observed.

        Collective over ``group``: every rank must call it, with the same layout.
        """
        flat = layout.flat_index
        payload = torch.zeros(3, layout.num_slots, dtype=torch.float32)  # value, observed, owner
        if self.lookup_source:
            owned = self._owned(flat)
            values = self.values[flat[owned] - self.owned_range[0]]
            observed = ~torch.isnan(values)
            payload[0, owned] = torch.where(observed, values, torch.zeros_like(values))
            payload[1, owned] = observed.float()
            payload[2, owned] = 1.0
        # Sync point: one all-reduce; each slot has exactly one contributing owner.
        payload = self._all_reduce(payload)
        owners = payload[2]
        if not bool((owners == 1).all()):
            wrong = int((owners != 1).sum())
            raise ValueError(
                f"EMA lookup: {wrong} of {layout.num_slots} targets have "
                f"{sorted(set(owners[owners != 1].long().tolist()))} owners instead of 1; "
                f"exactly one rank per data-parallel rank may pass lookup_source=True, and "
                f"all ranks of the group must agree on dp_size"
            )
        return torch.where(payload[1] > 0, payload[0], torch.full_like(payload[0], float("nan")))

    def update(
        self,
        layout: BatchLayout,
        slot_loss: Optional[torch.Tensor] = None,
        slot_computed: Optional[torch.Tensor] = None,
        slot_label: Optional[torch.Tensor] = None,
    ) -> bool:
        """Fold one step's computed losses into the EMA.

        ``slot_loss`` [G] float, ``slot_computed`` [G] bool, ``slot_label`` [G] int64: the
        losses this rank computed (slots it did not compute are False); ranks that are not
        ``loss_source`` pass nothing. Collective over ``group``. A slot's observation is
        its loss; a sample present twice in the batch gets the mean of its two losses
        as one observation; a vocabulary id gets the mean loss of all its computed
        targets in the global batch as one observation.

        A NaN/inf loss at any computed slot of any rank leaves the whole step out, on every
        rank alike (a count in the same all-reduce): the EMA never holds a non-finite value,
        and nothing of a step that the training loop may discard or re-run is kept. Returns
        whether the EMA was updated.
        """
        g, v = layout.num_slots, self.vocab_size
        if slot_computed is not None and not self.loss_source:
            raise ValueError(
                "EmaTable.update: losses passed on a rank built with loss_source=False; they "
                "would be dropped (pass nothing, or make this rank the loss source)"
            )
        payload = torch.zeros(2 * g + 2 * v + 1, dtype=torch.float64)
        if slot_computed is not None:
            if slot_loss is None or slot_label is None:
                raise ValueError(
                    "EmaTable.update: pass slot_loss and slot_label with slot_computed"
                )
            computed = slot_computed.bool()
            losses = slot_loss.to(torch.float64)[computed]
            labels = slot_label.long()[computed]
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= v):
                raise ValueError(
                    f"labels of computed targets must be in [0, vocab_size={v}); got ids in "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )
            slot_sum, slot_count, vocab_sum, vocab_count, bad = payload.split([g, g, v, v, 1])
            finite = torch.isfinite(losses)
            bad += float((~finite).sum())
            losses = torch.where(finite, losses, torch.zeros_like(losses))  # sums stay finite
            slot_sum[computed] = losses
            slot_count[computed] = 1.0
            vocab_sum.index_add_(0, labels, losses)
            vocab_count.index_add_(0, labels, torch.ones_like(losses))
        # Sync point: one all-reduce (float64: the sums of float32 losses are exact, so
        # the result does not depend on how the batch is split over ranks).
        payload = self._all_reduce(payload)
        slot_sum, slot_count, vocab_sum, vocab_count, bad = payload.split([g, g, v, v, 1])
        if bool((slot_count > 1).any()):
            raise ValueError(
                "EMA update: a target's loss came from more than one rank; exactly one rank "
                "per data-parallel rank may pass loss_source=True"
            )
        if float(bad) > 0:
            self.skipped_updates += 1
            return False

        # Owned entries: group the batch's slots by table entry (a sample may repeat).
        hit = (slot_count > 0) & self._owned(layout.flat_index)
        entries, inverse = torch.unique(layout.flat_index[hit], return_inverse=True)
        zeros = torch.zeros(entries.numel(), dtype=torch.float64)
        sums = zeros.clone().index_add_(0, inverse, slot_sum[hit])
        counts = zeros.index_add_(0, inverse, slot_count[hit])
        local = entries - self.owned_range[0]
        self.values[local] = _ema_step(self.values[local], (sums / counts).float(), self.decay)

        seen = vocab_count > 0
        self.vocab_ema[seen] = _ema_step(
            self.vocab_ema[seen], (vocab_sum[seen] / vocab_count[seen]).float(), self.decay
        )
        return True

    # ------------------------------------------------------------------ checkpoint
    def sharded_state_dict(self, prefix: str = "regate.") -> dict:
        """``{"ema_table", "vocab_ema"}`` as Megatron ``ShardedTensor``s.

        ``ema_table`` is the flat (F,) table, this rank's owned range as its local chunk
        (uneven ranges: no regular grid, so any DP size can load it); only
        ``lookup_source`` ranks write it. ``vocab_ema`` is replicated, written by rank 0
        of ``group``. Ranks that own nothing (F < dp) have no ``ema_table`` entry.
        """
        from megatron.core.dist_checkpointing import ShardedTensor

        lo, hi = self.owned_range
        state = {}
        if hi > lo:
            state["ema_table"] = ShardedTensor(
                key=f"{prefix}ema_table",
                data=self.values,
                dtype=self.values.dtype,
                local_shape=(hi - lo,),
                global_shape=(self.num_values,),
                global_offset=(lo,),
                axis_fragmentations=None,  # uneven flat ranges
                replica_id=0 if self.lookup_source else 1,
            )
        group_rank = dist.get_rank(self.group) if self.group is not None else 0
        state["vocab_ema"] = ShardedTensor.from_rank_offsets(
            f"{prefix}vocab_ema", self.vocab_ema, replica_id=0 if group_rank == 0 else 1
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load what ``dist_checkpointing.load(self.sharded_state_dict(...))`` returned."""
        lo, hi = self.owned_range
        if hi > lo:
            table = state["ema_table"]
            if tuple(table.shape) != (hi - lo,):
                raise ValueError(
                    f"ema_table chunk has shape {tuple(table.shape)}, expected ({hi - lo},) for "
                    f"the owned range [{lo}, {hi})"
                )
            self.values.copy_(table)
        vocab = state["vocab_ema"]
        if tuple(vocab.shape) != (self.vocab_size,):
            raise ValueError(
                f"vocab_ema has shape {tuple(vocab.shape)}, expected ({self.vocab_size},); "
                f"the checkpoint was written with another vocabulary"
            )
        self.vocab_ema.copy_(vocab)

