"""The roles a rank plays in a ReGATE step, named once.

Megatron-Core's parallel state places each rank in a tensor-parallel (TP) group, a pipeline
stage (PP) and a data-parallel (DP) replica. Three roles follow from that placement:

- **selection source**: TP rank 0 of the first pipeline stage. It holds the micro-batch's
  tokens, looks the global batch up in the EMA table and chooses the kept tokens; the rest of
  its model-parallel (TP x PP) group receives them (`broadcast_selections`).
- **loss rank**: TP rank 0 of the last pipeline stage. Its per-token losses count once: they
  feed the EMA table, the NaN/inf guard and the logged loss (the other TP ranks hold copies).
- **logging rank**: global rank 0 of the job's default process group. It prints, writes
  metrics and marker files, and talks to the online teacher's channel.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps

__all__ = ["is_selection_source", "is_loss_rank", "is_logging_rank"]


def is_selection_source() -> bool:
    """TP rank 0 of the first pipeline stage: chooses the kept tokens for its TP x PP group."""
    return ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage()


def is_loss_rank() -> bool:
    """TP rank 0 of the last pipeline stage: the rank whose per-token losses count once."""
    return ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage()


def is_logging_rank() -> bool:
    """Global rank 0 (or a process with no distributed world yet)."""
    return not dist.is_initialized() or dist.get_rank() == 0
