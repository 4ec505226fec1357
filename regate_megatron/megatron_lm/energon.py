"""Stable sample ids and target counts for Megatron-Energon data (``examples/multimodal``).

An Energon batch (the dict a task encoder's ``encode_batch`` returns) has no sample ids, but
it has ``__restore_key__``: Energon's recipe for reading the batch again, a flat tuple whose
tuple-valued entries are its samples' own keys, e.g. ``('MapDataset', 7, 'BlendDataset', 1,
'MapDataset', 3, 'Webdataset', 42)``. Two entries of a sample's key do not depend on the
epoch, the rank, the loader worker or a resume:

- after ``BlendDataset`` (training) or ``ConcatDataset`` (one pass), the position ``d`` of
  the sample's dataset in the data path's split (absent for a single dataset: ``d = 0``);
- after ``Webdataset``, the sample's index ``i`` in that dataset's split (Energon's global
  sample index over the split's shards; jsonl and joined datasets use the same marker).

The stable id is ``offsets[d] + i``, ``offsets`` the exclusive cumulative lengths of the
split's datasets in order (`EnergonIds`). The target counts that size the EMA table without
a reference store come from one pass over the split, in order, through the script's own
task encoder, each rank reading a share (`shared_target_counts`).

Needs ``megatron-energon`` (imported when a dataset is opened).
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from regate_megatron.megatron_lm.batch import TextBatch, multimodal_train_view
from regate_megatron.megatron_lm.sample_ids import targets_per_sample

__all__ = ["EnergonIds", "EnergonView", "shared_target_counts", "random_state_kept"]

DATASET_MARKERS = ("BlendDataset", "ConcatDataset")
SAMPLE_MARKER = "Webdataset"


class EnergonIds:
    """Sample keys -> stable integer ids, for the datasets of one split (``lengths`` in the
    split's order)."""

    def __init__(self, lengths: Sequence[int], source: str = "the Energon data path"):
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if self.lengths.size == 0 or bool((self.lengths < 0).any()):
            raise ValueError(f"{source}: dataset lengths must be >= 0, got {self.lengths}")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.source = source

    @classmethod
    def load(cls, path: str, split_part: str = "train") -> "EnergonIds":
        """The split's datasets as Energon lists them (the order the blend indexes)."""
        from megatron.energon import WorkerConfig, load_dataset

        single = WorkerConfig(rank=0, world_size=1, num_workers=0)
        listed = load_dataset(path).get_datasets(training=False, split_part=split_part,
                                                 worker_config=single)
        return cls([len(entry.dataset) for entry in listed.datasets],
                   source=f"{path} (split {split_part!r})")

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])

    def sample_id(self, key: Sequence) -> int:
        """The stable id of one sample's restore key."""
        datasets = [key[p + 1] for p in range(len(key) - 1) if key[p] in DATASET_MARKERS]
        indices = [key[p + 1] for p in range(len(key) - 1) if key[p] == SAMPLE_MARKER]
        if len(indices) != 1 or len(datasets) > 1:
            raise ValueError(
                f"sample restore key {tuple(key)} of {self.source}: expected one "
                f"'{SAMPLE_MARKER}' index and at most one dataset position "
                f"({'/'.join(DATASET_MARKERS)}); nested blends and packed samples have no "
                f"stable id here (flatten the metadataset, do not pack)")
        dataset = int(datasets[0]) if datasets else 0
        index = int(indices[0])
        if not 0 <= dataset < self.lengths.size or not 0 <= index < self.lengths[dataset]:
            raise ValueError(
                f"sample restore key {tuple(key)} is outside {self.source}: dataset "
                f"{dataset} of {self.lengths.size}, index {index} (lengths "
                f"{self.lengths.tolist()[:8]}); the loader reads another data path or split")
        return int(self.offsets[dataset]) + index

    def batch_ids(self, batch: dict, rows: int) -> torch.Tensor:
        """int64 [rows]: the ids of a batch dict's samples, in row order."""
        key = batch.get("__restore_key__")
        samples = [k for k in (key or ()) if isinstance(k, (tuple, list))]
        if len(samples) != rows:
            raise ValueError(
                f"the batch's __restore_key__ holds {len(samples)} sample keys for {rows} "
                f"rows: give each row a stable integer 'sample_ids' in the task encoder's "
                f"batch instead (packed rows hold several samples and are refused)")
        return torch.tensor([self.sample_id(k) for k in samples], dtype=torch.long)


class EnergonView:
    """The batch view of ``examples/multimodal/train.py`` on Energon data: its
    `multimodal_train_view` (padding is not trained, as the script's loss mask) with the ids
    from the samples' restore keys, and the pass over the split that counts targets.

    ``data_path``, ``pad_token``, ``image_token``: values or zero-argument callables
    (resolved at first use, e.g. from Megatron-LM's args, tokenizer and model;
    ``image_token`` as in `multimodal_train_view`). ``task_encoder``: a zero-argument factory
    of the script's task encoder. ``dataset_kwargs``: what the script passes to Energon's
    dataset builders besides the task encoder (``image_decode``, ``handler``, ...).
    """

    def __init__(self, task_encoder: Callable, data_path: Union[str, Callable],
                 pad_token: Union[int, None, Callable] = None,
                 image_token: Union[int, None, Callable] = None, split_part: str = "train",
                 **dataset_kwargs):
        self.task_encoder = task_encoder
        self._given = {"data_path": data_path, "pad_token": pad_token,
                       "image_token": image_token}
        self._resolved: dict = {}
        self.split_part = split_part
        self.dataset_kwargs = dataset_kwargs
        self._ids: Optional[EnergonIds] = None

    def _value(self, name: str):
        if name not in self._resolved:
            given = self._given[name]
            self._resolved[name] = given() if callable(given) else given
        return self._resolved[name]

    @property
    def data_path(self) -> str:
        path = self._value("data_path")
        return path[0] if isinstance(path, (list, tuple)) else path

    @property
    def pad_token(self) -> Optional[int]:
        return self._value("pad_token")

    @property
    def image_token(self) -> Optional[int]:
        return self._value("image_token")

    @property
    def ids(self) -> EnergonIds:
        if self._ids is None:
            self._ids = EnergonIds.load(self.data_path, self.split_part)
        return self._ids

    def __call__(self, batch: dict) -> TextBatch:
        if "sample_ids" not in batch:
            rows = int(torch.as_tensor(batch["tokens"]).shape[0])
            batch = dict(batch, sample_ids=self.ids.batch_ids(batch, rows))
        return multimodal_train_view(batch, pad_token=self.pad_token,
                                     image_token=self.image_token)

    def text_batches(self, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                     batch_size: int = 1, skip: Optional[np.ndarray] = None):
        """This rank's share of one in-order pass over the split, as `TextBatch` es of up to
        ``batch_size`` samples through the script's task encoder: Energon deals the split's
        samples to ``world_size`` ranks, and each rank's to its ``num_workers`` loader
        processes. ``skip`` (bool [num_samples]): samples left out of the batches (still
        read: Energon has no random access). Task encoders draw prompts from the global
        generators: run the pass in `random_state_kept` to leave the run's random state as
        it was."""
        from megatron.energon import WorkerConfig, get_loader, get_val_dataset

        share = WorkerConfig(rank=rank, world_size=world_size, num_workers=num_workers)
        dataset = get_val_dataset(self.data_path, split_part=self.split_part,
                                  worker_config=share, batch_size=batch_size,
                                  task_encoder=self.task_encoder(), **self.dataset_kwargs)
        for batch in get_loader(dataset):
            text = self(batch)
            if skip is not None:
                keep = torch.from_numpy(~skip[text.sample_ids.cpu().numpy()])
                if not bool(keep.any()):
                    continue
                if not bool(keep.all()):
                    text = text.rows(keep)
            yield text

    def count_targets(self, img_seq_len: int, max_length: int, rank: int = 0,
                      world_size: int = 1, num_workers: int = 0
                      ) -> Tuple[np.ndarray, np.ndarray]:
        """(targets, reads), int64 [num_samples] each, over this rank's share of
        `text_batches`: each sample's target count in the combined sequence and how often it
        was read (0 for a sample the error handler skipped). The caller's random state is
        kept."""
        counts = np.zeros(self.ids.num_samples, dtype=np.int64)
        reads = np.zeros(self.ids.num_samples, dtype=np.int64)
        with random_state_kept():
            for text in self.text_batches(rank, world_size, num_workers):
                for sample_id, count in targets_per_sample(text, img_seq_len, max_length):
                    counts[sample_id] = count
                    reads[sample_id] += 1
        return counts, reads

    def fingerprint(self, img_seq_len: int, max_length: int) -> dict:
        """What a reference store built from this split must match: the data path, the
        split, its datasets' lengths and the combined layout."""
        return dict(data=str(self.data_path), split=self.split_part,
                    lengths=self.ids.lengths.tolist(), img_seq_len=int(img_seq_len),
                    max_length=int(max_length))


@contextlib.contextmanager
def random_state_kept():
    """Python's, NumPy's and torch's global random states are as they were afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def shared_target_counts(view: EnergonView, img_seq_len: int, max_length: int,
                         group=None, log: Callable[[str], None] = print,
                         num_workers: int = 0) -> np.ndarray:
    """Every sample's target count, int64 [num_samples], identical on every rank of
    ``group`` (collective; one all-reduce): each rank counts the share Energon deals it,
    with ``num_workers`` loader processes (the script's ``--num-workers``).
    Raises when a sample was read twice (the shares overlap); samples read by no rank (the
    script's error handler skipped them) count 0 targets and are reported."""
    import torch.distributed as dist

    from regate_megatron.training.parallel import summed

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    start = time.perf_counter()
    counts, reads = view.count_targets(img_seq_len, max_length, rank, world, num_workers)
    both = torch.from_numpy(np.stack([counts, reads]))
    counts, reads = (summed(both, group) if distributed else both).numpy()  # sync point
    twice = np.flatnonzero(reads > 1)
    if twice.size:
        raise RuntimeError(f"the target-count pass over {view.data_path} read samples "
                           f"{twice.tolist()[:8]} more than once over {world} ranks")
    unread = int((reads == 0).sum())
    if rank == 0:
        log(f"ReGATE: target counts of {counts.size} Energon samples ({view.data_path}) read "
            f"by {world} ranks in {time.perf_counter() - start:.1f} s"
            + (f"; {unread} unreadable samples count 0 targets" if unread else ""))
    return counts.astype(np.int64)
