"""Small builders shared by the scoring and selector tests: an in-memory reference-loss
store, a ReGATE config with test defaults, and a float tensor from rows."""

import numpy as np
import torch

from regate_megatron.config import ReGateConfig

__all__ = ["MemoryRefStore", "make_cfg", "tensor"]


class MemoryRefStore:
    """In-memory stand-in for the reference-loss store: ragged offsets + float16 values."""

    def __init__(self, per_sample):
        self.offsets = np.cumsum([0] + [len(v) for v in per_sample]).astype(np.int64)
        self._values = np.concatenate(
            [np.asarray(v, dtype=np.float16) for v in per_sample] + [np.zeros(0, np.float16)]
        )

    def __getitem__(self, sample_id):
        return self._values[self.offsets[sample_id]:self.offsets[sample_id + 1]]


def make_cfg(**fields):
    base = dict(enabled=True, schedule="constant", keep_ratio=0.5, ema_decay=0.5)
    base.update(fields)
    return ReGateConfig(**base)


def tensor(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)
