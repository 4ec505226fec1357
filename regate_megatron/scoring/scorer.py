"""Which target tokens matter now: the per-step protocol of token selection (`ReGateScorer`).

Per optimizer step, on every rank of the process group, in this order: ``begin_step`` ->
rho_t from the schedule and one all-reduce that looks up the EMA of every target of the
global batch (`regate_megatron.scoring.ema_table`); ``select`` / ``record`` per local
micro-batch (no communication); ``end_step`` -> one all-reduce of the computed targets'
losses into the EMA.

``select`` scores each target with the configured selector (``--regate-selector``, see
`regate_megatron.scoring.scores`) and keeps, besides every context token, the top
``keep_count(rho_t, |T|)`` targets (`regate_megatron.core.selection`). The schedule, keep ratio and
routing are the same for every selector; only the kept targets differ.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from regate_megatron.config import ReGateConfig
from regate_megatron.core.selection import TokenSelection, select_top_targets
from regate_megatron.scoring.ema_table import BatchLayout, EmaTable, SampleIds
from regate_megatron.scoring.schedule import keep_ratio_at
from regate_megatron.scoring.scores import (
    difficulty_of,
    excess_scores,
    fuse_segments,
    random_scores,
)

__all__ = ["ReGateScorer", "TargetCounts", "open_reference"]


class TargetCounts:
    """The ragged target layout (``offsets`` np.int64 [N+1]) of a dataset without reference
    losses: all the ``random`` selector needs (it sizes the EMA table, which still records)."""

    def __init__(self, target_counts):
        counts = np.asarray(target_counts, dtype=np.int64).reshape(-1)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __getitem__(self, sample_id: int) -> np.ndarray:
        raise ValueError(
            "no reference-loss store was given (--regate-ref-store); only --regate-selector "
            "random runs without one"
        )


def open_reference(config: ReGateConfig, dataset, tokenizer=None):
    """What the scorer reads for ``dataset``: the reference-loss store ``--regate-ref-store``
    (checked against the dataset and tokenizer), or, for ``--regate-selector random`` without
    a store, the dataset's target layout (`TargetCounts`)."""
    if config.ref_store is not None:
        from regate_megatron.scoring.ref_store import RefLossStore

        return RefLossStore.open(config.ref_store, dataset=dataset, tokenizer=tokenizer)
    if config.selector == "random":
        return TargetCounts(dataset.target_counts())
    raise ValueError(
        f"--regate-selector {config.selector} needs --regate-ref-store (build it with "
        f"regate-precompute-ref)"
    )


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
    ``lookup_source`` and ``loss_source``. ``ref_store``: a reference-loss store, or a
    `TargetCounts` for the ``random`` selector. ``seed``: the run's seed (``--seed``), which
    with the step and the sample id seeds the ``random`` selector's draws.
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
        seed: int = 0,
    ):
        self.config = config
        self.ref_store = ref_store
        self.seed = int(seed)
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

    def end_step(self, update: bool = True) -> bool:
        """Finish the step: fold the recorded losses into the EMA. Collective over the group
        when ``update`` (every rank passes the same); ``update=False`` drops the step's
        records (e.g. a re-run of a step already folded in). Returns whether the EMA
        changed: False also when a computed loss was NaN/inf on any rank
        (`EmaTable.update`)."""
        if not self.config.enabled:
            return False
        if self._layout is None:
            raise RuntimeError("end_step() without begin_step()")
        if not update:
            self._reset()
            return False
        local = self._local.stop - self._local.start
        if self.ema.loss_source and self._cursor != local:
            raise RuntimeError(
                f"end_step: {self._cursor} of this rank's {local} samples were recorded; a "
                f"loss_source rank must record() every local micro-batch"
            )
        if self.ema.loss_source:
            updated = self.ema.update(self._layout, self._slot_loss, self._slot_computed,
                                      self._slot_label)
        else:
            updated = self.ema.update(self._layout)
        self._reset()
        return updated

    # ------------------------------------------------------------------ scores
    def _sample_targets(self, sample_ids, loss_mask) -> Tuple[List[int], torch.Tensor]:
        ids = sample_ids.tolist() if hasattr(sample_ids, "tolist") else sample_ids
        ids = [int(i) for i in ids]
        target_mask = loss_mask > 0
        if target_mask.dim() != 2 or target_mask.shape[0] != len(ids):
            raise ValueError(
                f"loss_mask must be [b, s] with b = len(sample_ids) = {len(ids)}, got "
                f"{tuple(loss_mask.shape)}"
            )
        return ids, target_mask

    def _count_error(self, sample_id: int, got: int, expected: int) -> ValueError:
        """A sample's targets differ from the layout the EMA table was sized by."""
        if isinstance(self.ref_store, TargetCounts):
            return ValueError(
                f"sample {sample_id}: loss_mask has {got} target tokens but {expected} were "
                f"counted at the start of the run; a sample's target count must not change "
                f"between epochs (a prompt drawn at random can move where "
                f"--decoder-seq-length / --seq-length cuts its answer: make it long enough "
                f"that no answer is cut)")
        return ValueError(
            f"sample {sample_id}: loss_mask has {got} target tokens but the reference-loss "
            f"store has {expected}; the store was built for other data or another tokenizer, "
            f"rebuild it (regate-precompute-ref)")

    def _checked_layout(self, ids: List[int], counts: List[int]):
        """(starts, stored counts) of the samples in the table's layout, np.int64 [n] each;
        raises when a sample's target count is not the layout's."""
        offsets = self.ema.offsets
        ids_np = np.asarray(ids, dtype=np.int64)
        starts = offsets[ids_np]
        stored = offsets[ids_np + 1] - starts
        wrong = np.flatnonzero(stored != np.asarray(counts, dtype=np.int64))
        if wrong.size:
            row = int(wrong[0])
            raise self._count_error(ids[row], counts[row], int(stored[row]))
        return starts, stored

    def _flat_reference(self, ids: List[int], counts: List[int]) -> torch.Tensor:
        """Reference losses of the samples' targets, concatenated: float32 [sum(counts)]."""
        starts, stored = self._checked_layout(ids, counts)
        flat_values = getattr(self.ref_store, "values", None)
        if flat_values is not None:  # one gather from the store's flat value array
            flat = np.repeat(starts - (np.cumsum(stored) - stored), stored) + np.arange(
                int(stored.sum()), dtype=np.int64)
            values = np.asarray(flat_values[flat])
        else:  # duck-typed store: store[sample_id] per sample
            values = np.concatenate([np.asarray(self.ref_store[i]) for i in ids]
                                    + [np.zeros(0, np.float32)])
        ref = torch.from_numpy(values.astype(np.float32))
        finite = torch.isfinite(ref)
        if not bool(finite.all()):
            row = _row_of(int((~finite).nonzero()[0]), counts)
            raise ValueError(f"sample {ids[row]}: the reference-loss store holds NaN/inf")
        return ref

    def _flat_difficulty(self, ids, counts, labels, target_mask, ref) -> torch.Tensor:
        """Student difficulty (EMA -> vocabulary EMA -> reference) of the samples' targets,
        concatenated like ``ref`` [n]."""
        index = []
        for sample_id in ids:
            i = self._first_index.get(sample_id)
            if i is None:
                raise ValueError(
                    f"sample {sample_id} is not in this step's global batch; pass every "
                    f"micro-batch's sample ids to begin_step()"
                )
            index.append(i)
        counts_np = np.asarray(counts, dtype=np.int64)
        # slot of target j of micro-batch sample r: slot_start[index[r]] + j (NumPy: tiny
        # arrays, no intra-op thread pool)
        base = self._layout.slot_start.numpy()[index] - (np.cumsum(counts_np) - counts_np)
        slots = torch.from_numpy(np.repeat(base, counts_np) + np.arange(ref.numel()))
        label = labels[target_mask]  # [b, s] -> [n], row-major = samples in order
        bad = (label < 0) | (label >= self.ema.vocab_size)
        if bool(bad.any()):
            row = _row_of(int(bad.nonzero()[0]), counts)
            got = labels[row][target_mask[row]]
            raise ValueError(
                f"sample {ids[row]}: target labels must be in [0, vocab_size="
                f"{self.ema.vocab_size}), got ids in [{int(got.min())}, {int(got.max())}]"
            )
        return difficulty_of(self._slot_ema[slots], self.ema.vocab_ema[label], ref)

    def _prepare(self, sample_ids, labels, loss_mask):
        if self._layout is None:
            raise RuntimeError("difficulty()/select() before begin_step() of this step")
        ids, target_mask = self._sample_targets(sample_ids, loss_mask)
        target_mask = target_mask.cpu()
        return ids, target_mask, target_mask.sum(dim=1).tolist(), labels.cpu().long()

    def reference(self, sample_ids: SampleIds, loss_mask: torch.Tensor) -> List[torch.Tensor]:
        """Reference loss of each sample's targets, float32 [n_i] per sample."""
        ids, target_mask = self._sample_targets(sample_ids, loss_mask)
        counts = target_mask.sum(dim=1).tolist()
        return list(self._flat_reference(ids, counts).split(counts))

    def difficulty(
        self, sample_ids: SampleIds, labels: torch.Tensor, loss_mask: torch.Tensor
    ) -> List[torch.Tensor]:
        """Student difficulty of each sample's targets (EMA -> vocabulary EMA -> reference)."""
        ids, target_mask, counts, labels = self._prepare(sample_ids, labels, loss_mask)
        ref = self._flat_reference(ids, counts)
        return list(self._flat_difficulty(ids, counts, labels, target_mask, ref).split(counts))

    def scores(
        self, sample_ids: SampleIds, labels: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor:
        """The selector's score [b, s] float32 at target positions (0 elsewhere).

        - ``regate``: ``lambda*N(ref) + (1-lambda)*N(difficulty)``, normalised per sample
          (``select_scope=sample``) or over the micro-batch (``batch``);
        - ``excess``: ``difficulty - ref`` (Rho-1's reducible loss), not normalised;
        - ``random``: uniform draws seeded by (seed, step, sample id); no store is read.
        """
        ids, target_mask, counts, labels = self._prepare(sample_ids, labels, loss_mask)
        selector = self.config.selector
        if selector == "random":
            self._checked_layout(ids, counts)  # before any compute, naming the cause
            flat = torch.cat([random_scores(self.seed, self._step, sample_id, n)
                              for sample_id, n in zip(ids, counts, strict=True)]
                             + [torch.zeros(0)])
        else:
            ref = self._flat_reference(ids, counts)
            difficulty = self._flat_difficulty(ids, counts, labels, target_mask, ref)
            if selector == "excess":
                flat = excess_scores(ref, difficulty)
            else:
                lambda_, norm = self.config.lambda_, self.config.score_norm
                segments = [ref.numel()] if self.config.select_scope == "batch" else counts
                flat = fuse_segments(ref, difficulty, torch.tensor(segments, dtype=torch.long),
                                     lambda_, norm)
        scores = torch.zeros(target_mask.shape, dtype=torch.float32)
        scores[target_mask] = flat  # row-major = samples in order, positions ascending
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
        joint = select_top_targets(scores.reshape(1, -1), target_mask.reshape(1, -1),
                                   self._keep_ratio)
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
            row = int((counts != expected_counts).nonzero()[0])
            raise self._count_error(ids[row], int(counts[row]), int(expected_counts[row]))
        # A NaN/inf here is kept: `end_step` then leaves the whole step out on every rank.
        losses = per_token_loss.detach().cpu().to(torch.float64)
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



def _row_of(flat_index: int, counts: List[int]) -> int:
    """The sample (row) of the ``flat_index``-th target when rows hold ``counts`` targets."""
    return int(np.searchsorted(np.cumsum(counts), flat_index, side="right"))
