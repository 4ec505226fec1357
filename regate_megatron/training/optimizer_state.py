"""Distributed-optimizer state in `dist_checkpointing` checkpoints: the fixes Megatron-Core
needs to save and resume it correctly, on any device.

Megatron-Core picks its Adam at import (``megatron.core.optimizer``): Transformer Engine's
``FusedAdam`` if TE is installed, else Apex's ``FusedAdam``, else ``torch.optim.Adam(W)``.
The fused ones keep the iteration in the param groups (``group["step"]``, an int); torch
Adam keeps a ``step`` tensor per parameter, and ``DistributedOptimizer`` branches on that
(``HAVE_APEX_OR_TE``). Which fix matters where, read in ``distrib_optimizer.py`` of 0.16.1
and 0.19.2 (identical on these paths) and tested on CPU (``tests/test_optimizer_state.py``)
and CUDA (``tests/test_gpu.py``, torch Adam):

- `check_distrib_optim_sharding`: needed everywhere. The default sharding,
  ``fully_sharded_model_space``, cannot be saved by dist_checkpointing, whatever the
  device or optimizer.
- `distributed_optimizer_sharded_state_dict`: the sharding metadata, needed everywhere;
  allocating Adam state before a load is needed for torch Adam only (fused Adam's
  ``state_dict`` reads the step from the param groups; nothing to allocate).
- `load_distributed_optimizer_state`, ``KeyError: 'step'`` (``fully_reshardable``) and
  the stale step (``dp_reshardable``): torch Adam only, on CPU and CUDA; with fused Adam
  the per-parameter state has no ``step`` key.
- `load_distributed_optimizer_state`, the in-place copy into a leaf view
  (``dp_reshardable``): needed with fp32 parameters (no ``--bf16``) on any device and with
  any optimizer: the fp32 main parameter is then a view of the model parameter. With
  bf16 the main parameter is a detached fp32 copy and the copy is harmless.
- `fix_optimizer_step_after_load`, the one ``step`` tensor shared by every parameter:
  torch Adam only (``load_state_dict`` sets ``s["step"] = step`` for every state when
  ``not HAVE_APEX_OR_TE``), on CPU and CUDA alike; a no-op with fused Adam.

A GPU machine without TE and Apex (``benchmarks/gpu_check.sh``'s) runs torch Adam on
CUDA, so every fix applies there. Each one is a no-op where it is not needed.
"""

from typing import Any, Callable

import torch

__all__ = [
    "WORKING_DISTRIB_OPTIM_SHARDINGS",
    "check_distrib_optim_sharding",
    "distributed_optimizer_sharded_state_dict",
    "load_distributed_optimizer_state",
    "fix_optimizer_step_after_load",
]

# Distributed-optimizer sharding types that save and resume correctly (0.16.1 to 0.19.x).
WORKING_DISTRIB_OPTIM_SHARDINGS = ("dp_reshardable", "fully_reshardable")


def check_distrib_optim_sharding(sharding_type: str) -> None:
    """Refuse distributed-optimizer sharding types that cannot be checkpointed.

    ``fully_sharded_model_space`` (Megatron's default) fails at save time with
    "ShardedTensor.flattened_range is not supported" (0.16.1 to 0.19.x, any device and
    optimizer).
    """
    if sharding_type not in WORKING_DISTRIB_OPTIM_SHARDINGS:
        raise ValueError(
            f"distrib_optim_sharding_type={sharding_type!r} cannot be saved by "
            f"Megatron-Core's dist_checkpointing; use 'dp_reshardable' or "
            f"'fully_reshardable'."
        )


def distributed_optimizer_sharded_state_dict(
    optimizer: Any,
    model_sharded_state_dict: dict,
    sharding_type: str,
    is_loading: bool = False,
) -> dict:
    """``optimizer.sharded_state_dict(...)`` for a distributed optimizer, save or load side.

    Checks ``sharding_type`` (:func:`check_distrib_optim_sharding`) and passes
    it as ``metadata["distrib_optim_sharding_type"]``. For loading into an
    optimizer that has not stepped yet, it first allocates the torch Adam state
    (``step`` = 0 and zero moments, one tensor per parameter): without torch
    Adam state, ``DistributedOptimizer.state_dict()`` fails its ``len(steps) == 1``
    assertion (no TE/Apex FusedAdam, which keeps ``step`` in the param groups).
    The loaded values overwrite this state in :func:`load_distributed_optimizer_state`.
    """
    check_distrib_optim_sharding(sharding_type)
    if is_loading:
        for inner in _inner_torch_optimizers(optimizer):
            _allocate_adam_state(inner)
    return optimizer.sharded_state_dict(
        model_sharded_state_dict,
        is_loading=is_loading,
        metadata={"distrib_optim_sharding_type": sharding_type},
    )


def load_distributed_optimizer_state(optimizer: Any, state_dict: dict) -> None:
    """Load a distributed-optimizer state dict (from ``dist_checkpointing.load``) correctly.

    ``optimizer.load_state_dict(state_dict)`` with three fixes for torch Adam
    (no TE/Apex) in Megatron-Core 0.16.1 to 0.19.x:

    * ``step`` is restored from the param groups, but the per-parameter copy that
      follows indexes every destination state key: ``fully_reshardable`` has no
      ``step`` there -> ``KeyError: 'step'``; ``dp_reshardable`` has the *load
      side's* stale step (a ``LocalNonpersistentObject``) and would silently
      reset the step to it. The restored ``step`` is kept.
    * ``dp_reshardable``: the copy into the fp32 main parameter (a view of the
      model parameter, a leaf that requires grad) runs with grad enabled ->
      "a view of a leaf Variable that requires grad is being used in an in-place
      operation". The copy runs under ``torch.no_grad()``.
    * both: afterwards every parameter shares one ``step`` tensor, which Adam
      increments once per parameter (silently wrong bias correction);
      :func:`fix_optimizer_step_after_load` gives each its own.

    The first two are fixed by wrapping ``_set_main_param_and_optimizer_states``
    on the optimizer instances for the duration of this call only.
    """
    dist_optimizers = _distributed_optimizers(optimizer)
    for dist_opt in dist_optimizers:
        dist_opt._set_main_param_and_optimizer_states = _set_states_keeping_step(dist_opt)
    try:
        optimizer.load_state_dict(state_dict)
    finally:
        for dist_opt in dist_optimizers:
            del dist_opt._set_main_param_and_optimizer_states  # back to the class method
    fix_optimizer_step_after_load(optimizer)


def fix_optimizer_step_after_load(optimizer: Any) -> int:
    """Give every parameter its own torch Adam ``step`` tensor; returns how many were shared.

    ``DistributedOptimizer.load_state_dict`` assigns one ``step`` tensor to all
    parameters' states. torch Adam increments ``state["step"]`` in place once
    per parameter, so after one update the shared step has advanced by the
    number of parameters and the bias correction is wrong -- with no error.
    Call after any distributed-optimizer load (done by
    :func:`load_distributed_optimizer_state`); a no-op when nothing is shared.
    """
    fixed = 0
    seen: set[int] = set()
    for inner in _inner_torch_optimizers(optimizer):
        for state in inner.state.values():
            step = state.get("step")
            if not isinstance(step, torch.Tensor):
                continue
            if id(step) in seen:
                state["step"] = step.detach().clone()
                fixed += 1
            seen.add(id(state["step"]))
    return fixed


def _set_states_keeping_step(dist_opt: Any) -> Callable:
    """``dist_opt._set_main_param_and_optimizer_states`` without grad and keeping ``step``."""
    original = type(dist_opt)._set_main_param_and_optimizer_states.__get__(dist_opt)

    def set_states(model_param, tensors):
        current = dist_opt._get_main_param_and_optimizer_states(model_param)
        if "step" in current:
            # The step was restored from the param groups just before; the loaded
            # parameter state has none (fully_reshardable) or a stale local one
            # (dp_reshardable keeps `step` as a LocalNonpersistentObject).
            tensors = {**tensors, "step": current["step"]}
        with torch.no_grad():
            original(model_param, tensors)

    return set_states


def _allocate_adam_state(inner: torch.optim.Optimizer) -> None:
    """Allocate torch Adam/AdamW state (step 0, zero moments) where it is missing."""
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in inner.param_groups:
        for param in group["params"]:
            state = inner.state[param]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _distributed_optimizers(optimizer: Any) -> list:
    """The DistributedOptimizer instances inside a Megatron (chained) optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [sub for sub in subs if isinstance(sub, DistributedOptimizer)]


def _inner_torch_optimizers(optimizer: Any) -> list:
    """The torch.optim optimizers inside a Megatron (chained) optimizer."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    if hasattr(optimizer, "chained_optimizers"):
        return [
            inner for sub in optimizer.chained_optimizers for inner in _inner_torch_optimizers(sub)
        ]
    inner = getattr(optimizer, "optimizer", None)
    return [inner] if isinstance(inner, torch.optim.Optimizer) else []
