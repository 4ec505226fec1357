"""regate-megatron: ReGATE (Reference-Guided Adaptive Token Elision) for Megatron-Core."""

from regate_megatron.config import ReGateConfig, add_regate_args
from regate_megatron.core.selection import (
    TokenSelection,
    broadcast_selections,
    keep_count,
    select_top_targets,
)

__all__ = [
    "ReGateConfig",
    "add_regate_args",
    "TokenSelection",
    "broadcast_selections",
    "keep_count",
    "select_top_targets",
]
