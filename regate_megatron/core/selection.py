"""Which tokens of a micro-batch the routed layers compute.

A `TokenSelection` is the per-micro-batch contract between the scorer and the
model: for each sample the ascending positions it keeps (every context token
plus the chosen targets) and which positions are targets (trained labels).
It is computed once, on one rank, and shipped to every rank of the
model-parallel group with `broadcast_selections`; ranks never re-derive it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["TokenSelection", "select_top_targets", "keep_count", "broadcast_selections"]

PAD = -1  # fill value of `keep_index` after a sample's last kept position


def keep_count(keep_ratio: float, num_targets: int) -> int:
    """k = max(1, ceil(rho * |T|)) targets kept (0 when the sample has no target).

    The product is rounded to 9 decimals first so that e.g. 0.3 * 10 keeps 3, not 4.
    """
    if num_targets == 0:
        return 0
    return max(1, math.ceil(round(keep_ratio * num_targets, 9)))


@dataclass
class TokenSelection:
    """Kept positions of one micro-batch.

    keep_index:  [b, L] int64, per sample its kept positions in ascending order, then
                 `-1` padding; L is the largest kept count of the micro-batch.
    target_mask: [b, s] bool, positions whose label is trained (loss_mask == 1).
    """

    keep_index: torch.Tensor
    target_mask: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        ki, tm = self.keep_index, self.target_mask
        if not isinstance(ki, torch.Tensor) or ki.dim() != 2 or ki.dtype != torch.long:
            raise ValueError(
                f"keep_index must be an int64 tensor [batch, kept]; got "
                f"{getattr(ki, 'dtype', type(ki))} of shape {tuple(getattr(ki, 'shape', ()))}"
            )
        if not isinstance(tm, torch.Tensor) or tm.dim() != 2 or tm.dtype != torch.bool:
            raise ValueError("target_mask must be a bool tensor [batch, seq]")
        if tm.shape[0] != ki.shape[0]:
            raise ValueError(
                f"keep_index has {ki.shape[0]} samples but target_mask has {tm.shape[0]}"
            )
        s = tm.shape[1]
        valid = ki != PAD
        counts = valid.sum(dim=1)
        if ki.shape[1] == 0 or bool((counts == 0).any()):
            bad = ((counts == 0).nonzero().flatten().tolist() if ki.shape[1]
                   else list(range(ki.shape[0])))
            raise ValueError(
                f"keep_index: sample(s) {bad} keep no token; every sample must keep at "
                f"least one position (context tokens are always kept)"
            )
        # Padding only at the tail: valid entries are a prefix of each row.
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError("keep_index: -1 padding must follow a sample's kept positions")
        if bool(((ki < PAD) | (ki >= s)).any()):
            raise ValueError(
                f"keep_index has positions out of range [0, {s}) for seq length {s}"
            )
        steps = ki[:, 1:] - ki[:, :-1]
        if bool(((steps <= 0) & valid[:, 1:]).any()):
            raise ValueError(
                "keep_index must be strictly increasing per sample (sorted, no duplicates)"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_keep_mask(cls, keep_mask: torch.Tensor, target_mask: torch.Tensor) -> "TokenSelection":
        """From a [b, s] bool mask of kept positions."""
        if keep_mask.shape != target_mask.shape:
            raise ValueError(
                f"keep_mask {tuple(keep_mask.shape)} and target_mask "
                f"{tuple(target_mask.shape)} must have the same [batch, seq] shape"
            )
        keep_mask = keep_mask.bool()
        b, s = keep_mask.shape
        counts = keep_mask.sum(dim=1)
        width = int(counts.max()) if b else 0
        positions = torch.arange(s, device=keep_mask.device).expand(b, s)
        # Kept positions first (ascending), elided ones pushed past the end.
        order = torch.where(keep_mask, positions, positions + s).sort(dim=1).values[:, :width]
        keep_index = torch.where(order < s, order, torch.full_like(order, PAD))
        return cls(keep_index, target_mask.bool())

    @classmethod
    def dense(cls, target_mask: torch.Tensor) -> "TokenSelection":
        """Every position kept."""
        return cls.from_keep_mask(torch.ones_like(target_mask, dtype=torch.bool), target_mask)

    def to(self, device, non_blocking: bool = False) -> "TokenSelection":
        """The same selection on ``device``: the one way a selection reaches the model's
        device. Not re-validated (no host sync on a GPU); `is_dense` carries over."""
        device = torch.device(device)
        if self.keep_index.device == device and self.target_mask.device == device:
            return self
        moved = object.__new__(TokenSelection)
        moved.keep_index = self.keep_index.to(device, non_blocking=non_blocking)
        moved.target_mask = self.target_mask.to(device, non_blocking=non_blocking)
        moved._cache = {k: v for k, v in self._cache.items() if k == "is_dense"}
        return moved

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return self.keep_index.shape[0]

    @property
    def seq_length(self) -> int:
        return self.target_mask.shape[1]

    @property
    def num_kept(self) -> torch.Tensor:
        """[b] kept positions per sample."""
        return (self.keep_index != PAD).sum(dim=1)

    @property
    def is_dense(self) -> bool:
        """Every position of every sample is kept: the model runs stock Megatron."""
        return self._cached("is_dense", lambda: bool((self.num_kept == self.seq_length).all()))

    def keep_mask(self) -> torch.Tensor:
        """[b, s] bool, True at kept positions."""
        def build():
            mask = torch.zeros_like(self.target_mask)
            rows = torch.arange(self.batch_size, device=mask.device)[:, None].expand_as(
                self.keep_index)
            valid = self.keep_index != PAD
            mask[rows[valid], self.keep_index[valid]] = True
            return mask
        return self._cached("keep_mask", build)

    def computed_loss_mask(self) -> torch.Tensor:
        """[b, s] bool: targets that are kept, i.e. where the model computes a loss."""
        return self.target_mask & self.keep_mask()

    def num_targets(self) -> tuple:
        """(target tokens total, target tokens kept) of the micro-batch."""
        return int(self.target_mask.sum()), int(self.computed_loss_mask().sum())

    # ------------------------------------------------------------------ flat indices
    # The router works on hidden states flattened [s, b, h] -> [s * b, h]; row of
    # (position p, sample i) is p * b + i.
    def gather_layout(self, multiple: int = 1):
        """Flat row indices for the gathered `[L_pad, b, h]` layout.

        Returns (gather_rows [L_pad*b], valid_slots [n], scatter_rows [n], positions [L_pad, b]):
        slot j of sample i reads row gather_rows[j*b + i]; pad slots read the sample's
        first kept row (their outputs are discarded); valid_slots are the non-pad slots and
        scatter_rows where they go back.
        """
        def build():
            ki = self.keep_index
            b, width = ki.shape
            padded = -(-width // multiple) * multiple
            if padded > width:  # [b, L] -> [b, L_pad]
                ki = torch.cat([ki, ki.new_full((b, padded - width), PAD)], dim=1)
            valid = ki != PAD
            positions = torch.where(valid, ki, ki[:, :1].expand_as(ki))  # [b, L_pad]
            sample = torch.arange(b, device=ki.device)[:, None]
            rows = (positions * b + sample).t().reshape(-1)  # [L_pad, b] -> [L_pad*b]
            valid_slots = valid.t().reshape(-1).nonzero().flatten()
            return rows, valid_slots, rows[valid_slots], positions.t().contiguous()
        return self._cached(("gather", multiple), build)

    def output_rows(self, with_labels: bool) -> torch.Tensor:
        """Flat rows (ascending) where the output layer runs: kept targets when training
        with labels, every kept position otherwise."""
        def build():
            mask = self.computed_loss_mask() if with_labels else self.keep_mask()
            return mask.t().reshape(-1).nonzero().flatten()  # [b, s] -> [s*b] rows
        return self._cached(("output", with_labels), build)

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def select_top_targets(
    scores: torch.Tensor, target_mask: torch.Tensor, keep_ratio: float
) -> TokenSelection:
    """Keep every context token and, per sample, the top-k targets by score.

    k = `keep_count(keep_ratio, |T|)`; ties go to the lower position, so every rank
    that runs this on the same inputs picks the same set.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"--regate-keep-ratio must be in (0, 1], got {keep_ratio!r}")
    if scores.shape != target_mask.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and target_mask {tuple(target_mask.shape)} differ"
        )
    target_mask = target_mask.bool()
    if bool(torch.isnan(scores[target_mask]).any()):
        raise ValueError("scores contain NaN at target positions")
    b, s = scores.shape
    counts = target_mask.sum(dim=1).tolist()
    k = torch.tensor([keep_count(keep_ratio, n) for n in counts], device=scores.device)
    # Targets first, by descending score; a stable sort keeps lower positions first on ties.
    masked = scores.masked_fill(~target_mask, float("-inf"))
    order = masked.sort(dim=1, descending=True, stable=True).indices
    order = order.gather(
        1, (~target_mask).gather(1, order).to(torch.int8).sort(dim=1, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(s, device=scores.device).expand(b, s))
    keep = ~target_mask | (rank < k[:, None])
    return TokenSelection.from_keep_mask(keep, target_mask)


def broadcast_selections(
    selections: Optional[List[TokenSelection]], group=None, src_rank_in_group: int = 0,
    device=None,
) -> List[TokenSelection]:
    """Ship the selections of all micro-batches of a step from one rank to its group.

    Call it once per step, before the pipeline schedule runs (a collective inside
    forward_step would deadlock 1F1B: stages run a micro-batch at different times).
    The source rank passes its list; every other rank passes None. Three collectives.
    Every rank, the source included, gets selections on ``device`` (default: the
    collective's device, i.e. this rank's GPU with NCCL, the CPU with gloo).
    """
    from regate_megatron.training.parallel import collective_device

    rank = dist.get_rank(group)
    is_src = rank == src_rank_in_group
    if is_src == (selections is None):
        raise ValueError(
            "broadcast_selections: the source rank must pass its selections and the "
            "other ranks None"
        )
    comm = collective_device(group)
    device = comm if device is None else torch.device(device)
    src = dist.get_global_rank(group, src_rank_in_group) if group is not None else src_rank_in_group
    # Sync point: header (count, then b, s, L per micro-batch), then one flat payload.
    count = torch.tensor([len(selections) if is_src else 0], dtype=torch.long, device=comm)
    dist.broadcast(count, src, group=group)
    header = torch.zeros(int(count), 3, dtype=torch.long, device=comm)
    if is_src:
        header.copy_(torch.tensor(
            [[sel.batch_size, sel.seq_length, sel.keep_index.shape[1]] for sel in selections]
        ))
    dist.broadcast(header, src, group=group)
    sizes = [int(b * width + b * s) for b, s, width in header.tolist()]
    payload = torch.empty(sum(sizes), dtype=torch.long, device=comm)
    if is_src:
        payload.copy_(torch.cat([
            torch.cat([sel.keep_index.reshape(-1), sel.target_mask.long().reshape(-1)]).to(comm)
            for sel in selections
        ]) if selections else payload)
    dist.broadcast(payload, src, group=group)
    if is_src:
        return [sel.to(device) for sel in selections]
    out = []
    for (b, s, width), chunk in zip(header.tolist(), payload.split(sizes), strict=True):
        keep_index = chunk[: b * width].view(b, width)
        target_mask = chunk[b * width:].view(b, s).bool()
        out.append(TokenSelection(keep_index.clone(), target_mask.clone()).to(device))
    return out
