"""Which target tokens matter now: reference loss + student difficulty -> scores -> selections.

For each target token i of a sample (loss_mask = 1, in ascending position order):

- reference loss ``r_i``: read from the reference-loss store, one float16 per target
  (duck type: ``store.offsets`` np.int64 [N+1] over sample ids 0..N-1 and
  ``store[sample_id]`` -> np.ndarray [n_targets]);
- student difficulty ``d_i``: the student-loss EMA of (sample, target) if it was ever
  observed, else the per-vocabulary-id EMA of the token's label if that was, else ``r_i``;
- score ``s_i = lambda * N(r)_i + (1 - lambda) * N(d)_i`` (`fuse_scores`), ``N`` taken
  over the selection scope's targets (one sample, or the whole micro-batch for
  ``--regate-select-scope batch``);
- selection: top ``keep_count(rho_t, |T|)`` targets by score, ties to the lower position,
  plus every context token (`regate_megatron.selection`).

State (`EmaTable`): the EMA has the store's ragged layout, flat over
F = ``offsets[-1]`` values, float32 with NaN = never observed; data-parallel rank r
owns the contiguous range ``[r*F//dp, (r+1)*F//dp)`` like the distributed optimizer
owns its state. The per-vocabulary EMA [V] is replicated.

Exchange, per optimizer step, on every rank of the process group, in this order
(`ReGateScorer`): ``begin_step`` -> one all-reduce that looks up the EMA of every
target of the global batch; ``select`` / ``record`` per local micro-batch (no
communication); ``end_step`` -> one all-reduce of the computed targets' losses, after
which every rank updates the range it owns and the replicated vocabulary EMA. Both
all-reduces are laid out over the global batch's targets (sample ids of all DP ranks,
in DP-rank order, known to every rank from the deterministic sampler), so every rank
ends with identical values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from regate_megatron.config import CHOICES, ReGateConfig
from regate_megatron.schedule import keep_ratio_at
from regate_megatron.selection import TokenSelection, select_top_targets

__all__ = [
    "normalize_scores",
    "fuse_scores",
    "difficulty_of",
    "BatchLayout",
    "EmaTable",
    "ReGateScorer",
]

SampleIds = Union[torch.Tensor, np.ndarray, Sequence[int]]


# ======================================================================================
# Scores
# ======================================================================================


def normalize_scores(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Normalise one scope's scores ``x`` [n] (float32 result).

    - ``rank``: the 0-based rank in ascending order, ties get their average rank, divided
      by ``n - 1`` -> [0, 1] (smallest 0, largest 1). A single value, or all values
      equal, map to 0.5.
    - ``zscore``: ``(x - mean) / std`` with the population std; all values equal -> 0.
    - ``none``: ``x`` unchanged.
    """
    if mode not in CHOICES["score_norm"]:
        raise ValueError(
            f"--regate-score-norm must be one of {', '.join(CHOICES['score_norm'])}; got {mode!r}"
        )
    if x.dim() != 1:
        raise ValueError(f"normalize_scores expects a 1-D tensor [n], got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("normalize_scores: scores contain NaN or inf")
    if mode == "none" or x.numel() == 0:
        return x.to(torch.float32)
    x64 = x.to(torch.float64)
    if mode == "rank":
        n = x64.numel()
        if n == 1:
            return torch.full((1,), 0.5)
        ordered = x64.sort().values
        first = torch.searchsorted(ordered, x64, right=False)  # elements strictly below
        past = torch.searchsorted(ordered, x64, right=True)    # elements below or equal
        average_rank = (first + past - 1).to(torch.float64) / 2
        return (average_rank / (n - 1)).to(torch.float32)
    # zscore
    if bool(x64.max() == x64.min()):
        return torch.zeros_like(x, dtype=torch.float32)
    return ((x64 - x64.mean()) / x64.std(unbiased=False)).to(torch.float32)


def fuse_scores(
    ref: torch.Tensor, difficulty: torch.Tensor, lambda_: float, norm: str
) -> torch.Tensor:
    """Importance ``lambda * N(ref) + (1 - lambda) * N(difficulty)`` of one scope's targets [n]."""
    if ref.shape != difficulty.shape:
        raise ValueError(
            f"fuse_scores: ref {tuple(ref.shape)} and difficulty {tuple(difficulty.shape)} differ"
        )
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"--regate-lambda must be in [0, 1], got {lambda_!r}")
    return lambda_ * normalize_scores(ref, norm) + (1.0 - lambda_) * normalize_scores(difficulty, norm)


def difficulty_of(
    ema: torch.Tensor, vocab_ema_of_label: torch.Tensor, ref: torch.Tensor
) -> torch.Tensor:
    """Student difficulty per target: its EMA if observed, else its label's vocabulary
    EMA if observed, else the reference loss (NaN = unobserved)."""
    fallback = torch.where(torch.isnan(vocab_ema_of_label), ref, vocab_ema_of_label)
    return torch.where(torch.isnan(ema), fallback, ema)


def _ema_step(ema: torch.Tensor, observed: torch.Tensor, decay: float) -> torch.Tensor:
    """e <- observed on the first observation (e is NaN), else decay*e + (1-decay)*observed."""
    return torch.where(torch.isnan(ema), observed, decay * ema + (1.0 - decay) * observed)


# ======================================================================================
# EMA table
# ======================================================================================


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
        from regate_megatron.parallel import collective_device

        buffer = payload.to(collective_device(self.group))
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return buffer.cpu()

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
    ) -> None:
        """Fold one step's computed losses into the EMA.

        ``slot_loss`` [G] float, ``slot_computed`` [G] bool, ``slot_label`` [G] int64: the
        losses this rank computed (slots it did not compute are False); ranks that are not
        ``loss_source`` pass nothing. Collective over ``group``. A slot's observation is
        its loss; a sample present twice in the batch gets the mean of its two losses
        as one observation; a vocabulary id gets the mean loss of all its computed
        targets in the global batch as one observation.
        """
        g, v = layout.num_slots, self.vocab_size
        if slot_computed is not None and not self.loss_source:
            raise ValueError(
                "EmaTable.update: losses passed on a rank built with loss_source=False; they "
                "would be dropped (pass nothing, or make this rank the loss source)"
            )
        payload = torch.zeros(2 * g + 2 * v, dtype=torch.float64)
        if slot_computed is not None:
            if slot_loss is None or slot_label is None:
                raise ValueError("EmaTable.update: pass slot_loss and slot_label with slot_computed")
            computed = slot_computed.bool()
            losses = slot_loss.to(torch.float64)[computed]
            labels = slot_label.long()[computed]
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= v):
                raise ValueError(
                    f"labels of computed targets must be in [0, vocab_size={v}); got ids in "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )
            slot_sum, slot_count, vocab_sum, vocab_count = payload.split([g, g, v, v])
            slot_sum[computed] = losses
            slot_count[computed] = 1.0
            vocab_sum.index_add_(0, labels, losses)
            vocab_count.index_add_(0, labels, torch.ones_like(losses))
        # Sync point: one all-reduce (float64: the sums of float32 losses are exact, so
        # the result does not depend on how the batch is split over ranks).
        payload = self._all_reduce(payload)
        slot_sum, slot_count, vocab_sum, vocab_count = payload.split([g, g, v, v])
        if bool((slot_count > 1).any()):
            raise ValueError(
                "EMA update: a target's loss came from more than one rank; exactly one rank "
                "per data-parallel rank may pass loss_source=True"
            )

        # Owned entries: group the batch's slots by table entry (a sample may repeat).
        hit = (slot_count > 0) & self._owned(layout.flat_index)
        entries, inverse = torch.unique(layout.flat_index[hit], return_inverse=True)
        sums = torch.zeros(entries.numel(), dtype=torch.float64).index_add_(0, inverse, slot_sum[hit])
        counts = torch.zeros(entries.numel(), dtype=torch.float64).index_add_(0, inverse, slot_count[hit])
        local = entries - self.owned_range[0]
        self.values[local] = _ema_step(self.values[local], (sums / counts).float(), self.decay)

        seen = vocab_count > 0
        self.vocab_ema[seen] = _ema_step(
            self.vocab_ema[seen], (vocab_sum[seen] / vocab_count[seen]).float(), self.decay
        )

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


# ======================================================================================
# Scorer
# ======================================================================================


class ReGateScorer:
    """Per-step token selection for ReGATE: schedule, EMA exchange, scores, top-k.

    One optimizer step, on every rank of ``group``, in this order::

        rho = scorer.begin_step(step, global_sample_ids)      # lookup all-reduce
        for each local micro-batch:
            selection = scorer.select(sample_ids, labels, loss_mask)
            ... forward/backward ...
            scorer.record(sample_ids, labels, loss_mask, per_token_loss,
                          selection.computed_loss_mask())     # loss_source ranks only
        scorer.end_step()                                     # update all-reduce

    With ReGATE disabled every call is a no-op without communication and `select`
    returns dense selections. See `EmaTable` for ``group``, ``dp_rank``, ``dp_size``,
    ``lookup_source`` and ``loss_source``.
    """

    def __init__(
        self,
        config: ReGateConfig,
        ref_store,
        vocab_size: int,
        *,
        group: Optional[dist.ProcessGroup] = None,
        dp_rank: int = 0,
        dp_size: int = 1,
        lookup_source: bool = True,
        loss_source: bool = True,
    ):
        self.config = config
        self.ref_store = ref_store
        self.ema = EmaTable(
            ref_store.offsets, vocab_size, config.ema_decay, group=group, dp_rank=dp_rank,
            dp_size=dp_size, lookup_source=lookup_source, loss_source=loss_source,
        )
        self._step: Optional[int] = None
        self._keep_ratio = 1.0
        self._reset()

    def _reset(self) -> None:
        self._layout: Optional[BatchLayout] = None
        self._slot_ema: Optional[torch.Tensor] = None
        self._first_index: dict = {}
        self._local = slice(0, 0)
        self._cursor = 0
        self._slot_loss = self._slot_computed = self._slot_label = None

    @property
    def keep_ratio(self) -> float:
        """rho_t of the current step (1.0 before the first `begin_step`)."""
        return self._keep_ratio

    @property
    def step(self) -> Optional[int]:
        return self._step

    # ------------------------------------------------------------------ step
    def begin_step(
        self, step: int, global_sample_ids: SampleIds, local_slice: Optional[slice] = None
    ) -> float:
        """Start optimizer step ``step``: set rho_t and look up the global batch's EMA.

        ``global_sample_ids``: every DP rank's micro-batches of this step, in DP-rank
        order. ``local_slice``: this DP rank's part of them (default: the ``dp_rank``-th
        of ``dp_size`` equal parts). Collective over the group. Returns rho_t.
        """
        if self._layout is not None:
            raise RuntimeError(
                f"begin_step({step}): step {self._step} was not finished; call end_step() "
                f"once per step"
            )
        self._step = step
        self._keep_ratio = keep_ratio_at(step, self.config)
        if not self.config.enabled:
            return self._keep_ratio
        layout = self.ema.layout(global_sample_ids)
        n = layout.sample_ids.numel()
        if local_slice is None:
            if n % self.ema.dp_size:
                raise ValueError(
                    f"begin_step: {n} global sample ids do not split evenly over dp_size="
                    f"{self.ema.dp_size}; pass local_slice"
                )
            share = n // self.ema.dp_size
            local_slice = slice(self.ema.dp_rank * share, (self.ema.dp_rank + 1) * share)
        start, stop, stride = local_slice.indices(n)
        if stride != 1:
            raise ValueError(f"begin_step: local_slice must be contiguous, got {local_slice}")
        self._slot_ema = self.ema.lookup(layout)
        self._layout = layout
        self._local = slice(start, stop)
        self._first_index = {}
        for i, sample_id in enumerate(layout.sample_ids.tolist()):
            self._first_index.setdefault(sample_id, i)
        g = layout.num_slots
        self._slot_loss = torch.zeros(g, dtype=torch.float64)
        self._slot_computed = torch.zeros(g, dtype=torch.bool)
        self._slot_label = torch.zeros(g, dtype=torch.long)
        return self._keep_ratio

    def end_step(self) -> None:
        """Finish the step: fold the recorded losses into the EMA. Collective over the group."""
        if not self.config.enabled:
            return
        if self._layout is None:
            raise RuntimeError("end_step() without begin_step()")
        local = self._local.stop - self._local.start
        if self.ema.loss_source and self._cursor != local:
            raise RuntimeError(
                f"end_step: {self._cursor} of this rank's {local} samples were recorded; a "
                f"loss_source rank must record() every local micro-batch"
            )
        if self.ema.loss_source:
            self.ema.update(self._layout, self._slot_loss, self._slot_computed, self._slot_label)
        else:
            self.ema.update(self._layout)
        self._reset()

    # ------------------------------------------------------------------ scores
    def _sample_targets(self, sample_ids, loss_mask) -> Tuple[List[int], torch.Tensor]:
        ids = [int(i) for i in (sample_ids.tolist() if hasattr(sample_ids, "tolist") else sample_ids)]
        target_mask = loss_mask > 0
        if target_mask.dim() != 2 or target_mask.shape[0] != len(ids):
            raise ValueError(
                f"loss_mask must be [b, s] with b = len(sample_ids) = {len(ids)}, got "
                f"{tuple(loss_mask.shape)}"
            )
        return ids, target_mask

    def reference(self, sample_ids: SampleIds, loss_mask: torch.Tensor) -> List[torch.Tensor]:
        """Reference loss of each sample's targets, float32 [n_i] per sample."""
        ids, target_mask = self._sample_targets(sample_ids, loss_mask)
        out = []
        for sample_id, targets in zip(ids, target_mask.sum(dim=1).tolist()):
            ref = torch.from_numpy(np.asarray(self.ref_store[sample_id], dtype=np.float32))
            if ref.numel() != targets:
                raise ValueError(
                    f"sample {sample_id}: loss_mask has {targets} target tokens but the "
                    f"reference-loss store has {ref.numel()}; the store was built for other "
                    f"data or another tokenizer, rebuild it (regate-precompute-ref)"
                )
            if not bool(torch.isfinite(ref).all()):
                raise ValueError(f"sample {sample_id}: the reference-loss store holds NaN/inf")
            out.append(ref)
        return out

    def difficulty(
        self, sample_ids: SampleIds, labels: torch.Tensor, loss_mask: torch.Tensor
    ) -> List[torch.Tensor]:
        """Student difficulty of each sample's targets (EMA -> vocabulary EMA -> reference)."""
        return self._reference_and_difficulty(sample_ids, labels, loss_mask)[1]

    def _reference_and_difficulty(self, sample_ids, labels, loss_mask):
        if self._layout is None:
            raise RuntimeError("difficulty()/select() before begin_step() of this step")
        ids, target_mask = self._sample_targets(sample_ids, loss_mask)
        target_mask, labels = target_mask.cpu(), labels.cpu().long()
        refs = self.reference(ids, loss_mask)
        difficulties = []
        for row, (sample_id, ref) in enumerate(zip(ids, refs)):
            index = self._first_index.get(sample_id)
            if index is None:
                raise ValueError(
                    f"sample {sample_id} is not in this step's global batch; pass every "
                    f"micro-batch's sample ids to begin_step()"
                )
            start = int(self._layout.slot_start[index])
            ema = self._slot_ema[start:start + ref.numel()]
            label = labels[row][target_mask[row]]
            if label.numel() and (int(label.min()) < 0 or int(label.max()) >= self.ema.vocab_size):
                raise ValueError(
                    f"sample {sample_id}: target labels must be in [0, vocab_size="
                    f"{self.ema.vocab_size}), got ids in [{int(label.min())}, {int(label.max())}]"
                )
            difficulties.append(difficulty_of(ema, self.ema.vocab_ema[label], ref))
        return refs, difficulties

    def scores(
        self, sample_ids: SampleIds, labels: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor:
        """Fused importance [b, s] float32 at target positions (0 elsewhere), normalised
        per sample (``select_scope=sample``) or over the micro-batch (``batch``)."""
        refs, difficulties = self._reference_and_difficulty(sample_ids, labels, loss_mask)
        lambda_, norm = self.config.lambda_, self.config.score_norm
        if self.config.select_scope == "batch":
            fused = fuse_scores(torch.cat(refs), torch.cat(difficulties), lambda_, norm)
        else:
            fused = torch.cat([fuse_scores(r, d, lambda_, norm) for r, d in zip(refs, difficulties)])
        target_mask = (loss_mask > 0).cpu()
        scores = torch.zeros(target_mask.shape, dtype=torch.float32)
        scores[target_mask] = fused  # row-major = samples in order, positions ascending
        return scores

    def select(
        self, sample_ids: SampleIds, labels: torch.Tensor, loss_mask: torch.Tensor
    ) -> TokenSelection:
        """Kept positions of one micro-batch (``sample_ids`` [b], ``labels``/``loss_mask`` [b, s]).

        Every context token is kept. ``select_scope=sample``: per sample the top
        ``keep_count(rho_t, |T_i|)`` targets. ``batch``: the top ``keep_count(rho_t, sum |T_i|)``
        targets of the micro-batch jointly (ties: lower sample, then lower position); a
        sample with no context token and no chosen target keeps its best target.
        Dense when rho_t = 1 or ReGATE is disabled.
        """
        ids, target_mask = self._sample_targets(sample_ids, loss_mask)
        target_mask = target_mask.cpu()
        if not self.config.enabled:
            return TokenSelection.dense(target_mask)
        if self._layout is None:
            raise RuntimeError("select() before begin_step() of this step")
        if self._keep_ratio >= 1.0:
            return TokenSelection.dense(target_mask)
        scores = self.scores(ids, labels, loss_mask)
        if self.config.select_scope == "sample":
            return select_top_targets(scores, target_mask, self._keep_ratio)
        b, s = target_mask.shape
        # [b, s] -> [1, b*s]: one joint top-k; the stable sort breaks ties row-major.
        joint = select_top_targets(scores.reshape(1, -1), target_mask.reshape(1, -1), self._keep_ratio)
        keep = joint.keep_mask().reshape(b, s)
        empty = ~keep.any(dim=1)
        if bool(empty.any()):
            best = scores.masked_fill(~target_mask, float("-inf")).argmax(dim=1)  # first max
            rows = empty.nonzero().flatten()
            keep[rows, best[rows]] = True
        return TokenSelection.from_keep_mask(keep, target_mask)

    # ------------------------------------------------------------------ losses
    def record(
        self,
        sample_ids: SampleIds,
        labels: torch.Tensor,
        loss_mask: torch.Tensor,
        per_token_loss: torch.Tensor,
        computed_mask: torch.Tensor,
    ) -> None:
        """Keep one local micro-batch's computed losses for `end_step` (no communication).

        ``per_token_loss`` [b, s] is read where ``computed_mask`` [b, s] (kept targets,
        ``TokenSelection.computed_loss_mask()``) is set. Micro-batches are recorded in
        order, on ``loss_source`` ranks only.
        """
        if not self.config.enabled:
            return
        if not self.ema.loss_source:
            raise RuntimeError("record(): this scorer was built with loss_source=False")
        if self._layout is None:
            raise RuntimeError("record() before begin_step() of this step")
        ids, target_mask = self._sample_targets(sample_ids, loss_mask)
        target_mask = target_mask.cpu()
        first = self._local.start + self._cursor
        expected = self._layout.sample_ids[first:first + len(ids)].tolist()
        if first + len(ids) > self._local.stop or expected != ids:
            raise ValueError(
                f"record(): sample ids {ids} are not the next ones of this rank's part of the "
                f"global batch (expected {expected}); record local micro-batches in order"
            )
        for name, tensor in (("labels", labels), ("per_token_loss", per_token_loss),
                             ("computed_mask", computed_mask)):
            if tuple(tensor.shape) != tuple(target_mask.shape):
                raise ValueError(
                    f"record(): {name} has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(target_mask.shape)} like loss_mask"
                )
        computed_mask = computed_mask.bool().cpu()
        if bool((computed_mask & ~target_mask).any()):
            raise ValueError("record(): computed_mask is set at positions that are not targets")
        counts = target_mask.sum(dim=1)
        expected_counts = self._layout.num_targets[first:first + len(ids)]
        if not torch.equal(counts, expected_counts):
            raise ValueError(
                f"record(): target counts {counts.tolist()} of samples {ids} differ from the "
                f"reference-loss store's {expected_counts.tolist()}"
            )
        losses = per_token_loss.detach().cpu().to(torch.float64)
        if not bool(torch.isfinite(losses[computed_mask]).all()):
            raise ValueError(f"record(): per_token_loss is NaN/inf at computed targets of {ids}")
        # The micro-batch's targets, row-major, fill consecutive slots of the layout.
        base = int(self._layout.slot_start[first]) if ids else 0
        slots = slice(base, base + int(counts.sum()))
        self._slot_loss[slots] = losses[target_mask]
        self._slot_computed[slots] = computed_mask[target_mask]
        self._slot_label[slots] = labels.cpu().long()[target_mask]
        self._cursor += len(ids)

    # ------------------------------------------------------------------ checkpoint
    def sharded_state_dict(self, prefix: str = "regate.") -> dict:
        """The EMA state as Megatron ``ShardedTensor``s (see `EmaTable.sharded_state_dict`)."""
        return self.ema.sharded_state_dict(prefix)

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
