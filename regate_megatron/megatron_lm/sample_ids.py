"""Stable sample ids through Megatron-LM batches, and the target counts the EMA table needs.

The contract: every training item is a dict with an integer ``sample_ids`` entry that is the
same for that sample in every epoch, on every rank and after a resume (Megatron-LM's default
collate stacks it to ``[b]``). The simplest source is the dataset index
(`with_sample_ids`); a dataset that reorders or blends must give its own stable id.

The EMA table is sized by each sample's number of target tokens *in the combined sequence*
(``TargetCounts``). With ``--regate-ref-store`` the store's offsets are that layout (it was
built from the same data); without one (``--regate-selector random``) `target_counts`
reads them off the dataset once, which is cheap for ``--mock-data`` and small sets.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from torch.utils.data import Dataset, default_collate

from regate_megatron.megatron_lm.batch import BatchView, TextBatch, expand_targets

__all__ = ["SampleIdDataset", "with_sample_ids", "target_counts", "targets_per_sample",
           "text_batches"]


class SampleIdDataset(Dataset):
    """``dataset[i]`` plus ``sample_ids = i``: the index is the stable id."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if not isinstance(item, dict):
            raise TypeError(f"with_sample_ids needs dict items, got {type(item).__name__}")
        if "sample_ids" in item:
            raise ValueError("the dataset already gives 'sample_ids'; do not wrap it twice")
        return dict(item, sample_ids=int(index))

    def __getattr__(self, name):  # the wrapped dataset's attributes (config, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def with_sample_ids(dataset):
    """`SampleIdDataset` around ``dataset`` (None stays None: ranks that build no dataset)."""
    return None if dataset is None else SampleIdDataset(dataset)


def targets_per_sample(text: TextBatch, img_seq_len: int, max_length: int):
    """(sample id, target count in the combined sequence) of each row of ``text``."""
    _, mask = expand_targets(text, img_seq_len, max_length)
    return zip(text.sample_ids.tolist(), (mask > 0).sum(dim=1).tolist(), strict=True)


def text_batches(dataset, view: BatchView, indices, batch_size: int = 1,
                 collate: Callable = default_collate):
    """The items ``indices`` of a map-style dataset, in order, as `TextBatch` es of up to
    ``batch_size`` items (``view`` of their collated batch)."""
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        yield view(collate([dataset[i] for i in indices[start:start + batch_size]]))


def target_counts(dataset, view: BatchView, img_seq_len: int, max_length: int,
                  collate: Callable = default_collate, indices=None) -> np.ndarray:
    """int64 [len(dataset)]: target tokens of every sample in the combined sequence, indexed
    by sample id (reads each item once); with ``indices``, only those items are read and the
    other entries stay 0 (one rank's share, see `hooks`)."""
    counts = np.zeros(len(dataset), dtype=np.int64)
    indices = range(len(dataset)) if indices is None else indices
    for text in text_batches(dataset, view, indices, collate=collate):
        for sample_id, count in targets_per_sample(text, img_seq_len, max_length):
            if not 0 <= sample_id < len(dataset):
                raise ValueError(f"sample id {sample_id} is outside [0, {len(dataset)}); ids "
                                 f"must index the dataset")
            counts[sample_id] = count
    return counts
