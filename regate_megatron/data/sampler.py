"""Deterministic global batches: which samples step t trains on, on every rank.

The order is a pure function of the seed: epoch e is a permutation of the dataset
drawn from `seed + e`, and the epochs are concatenated into one stream. A global batch
is the next `global_batch_size` entries after the `consumed_samples` already trained
(`batch_positions`); step t of a run whose global batch never changed starts at
t x global_batch_size (`global_batch_positions`). Every rank can therefore name the whole
global batch (the scorer's exchange needs it), and a resumed run continues at exactly the
next unseen sample whatever its data-parallel size (the global batch and consumed samples
are the run's, stored in the checkpoint).

Data-parallel rank r takes the r-th contiguous slice of the global batch and
splits it into micro-batches in order, so the global batch is "all ranks'
micro-batches in data-parallel rank order".
"""

from __future__ import annotations

from typing import List

import numpy as np

__all__ = ["batch_positions", "global_batch_positions", "local_microbatch_positions"]


def _epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(seed + epoch).permutation(num_samples)


def batch_positions(consumed_samples: int, num_samples: int, global_batch_size: int,
                    seed: int) -> List[int]:
    """Dataset positions (not sample ids) of the global batch after `consumed_samples`."""
    if num_samples < 1:
        raise ValueError("the training dataset has no usable samples")
    start = consumed_samples
    out: List[int] = []
    while len(out) < global_batch_size:
        epoch, offset = divmod(start + len(out), num_samples)
        order = _epoch_order(num_samples, seed, epoch)
        take = min(global_batch_size - len(out), num_samples - offset)
        out.extend(int(i) for i in order[offset:offset + take])
    return out


def global_batch_positions(step: int, num_samples: int, global_batch_size: int,
                           seed: int) -> List[int]:
    """Dataset positions of step `step`'s global batch (a constant global batch size)."""
    return batch_positions(step * global_batch_size, num_samples, global_batch_size, seed)


def local_microbatch_positions(
    global_positions: List[int], dp_rank: int, dp_size: int, micro_batch_size: int
) -> List[List[int]]:
    """This data-parallel rank's micro-batches (lists of dataset positions)."""
    per_rank = len(global_positions) // dp_size
    mine = global_positions[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
