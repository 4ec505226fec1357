"""Atomic `dist_checkpointing` checkpoints of a ReGATE run, in Megatron-LM's layout.

    <dir>/latest_checkpointed_iteration.txt   the "latest" pointer (moved last)
    <dir>/iter_0000100/                        one torch_dist checkpoint

A checkpoint holds the model, the optimizer (distributed or not), the LR
schedule, the training state (iteration, consumed samples, token counters), every
rank's RNG state and the ReGATE state (EMA shards, vocabulary EMA); the model's
architecture flags are stored in its common state so a consumer (the teacher in
`regate-precompute-ref`) can rebuild it. A save goes to `iter_N.tmp` and is
renamed into place only when every rank has finished; the pointer moves after
that, so a crash at any point leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from regate_megatron.optimizer_state import (
    distributed_optimizer_sharded_state_dict,
    fix_optimizer_step_after_load,
    load_distributed_optimizer_state,
)

__all__ = [
    "TRACKER",
    "iteration_dir",
    "latest_iteration",
    "save_checkpoint",
    "load_checkpoint",
    "load_module_weights",
    "read_common_state",
]

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    """The iteration the pointer names, or None when `root` holds no finished checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path} should hold an iteration number, found {text!r}") from None


def _checkpoint_dir(root: str) -> str:
    """`root` itself when it is one torch_dist checkpoint, else the latest iteration under it."""
    if os.path.exists(os.path.join(root, "metadata.json")):
        return root
    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(
            f"{root} holds no checkpoint ({TRACKER} missing); point --load at a directory "
            f"written by --save, or at one iter_* directory"
        )
    return iteration_dir(root, iteration)


def read_common_state(root: str) -> Dict[str, Any]:
    """The common (non-sharded) state of the latest checkpoint under `root`."""
    return dist_checkpointing.load_common_state_dict(_checkpoint_dir(root))


def _rng_state() -> ShardedObject:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper: checkpoints hold the bare model's keys, as Megatron-LM's."""
    return getattr(chunk, "module", chunk)


def _sharded_state(model: List[torch.nn.Module], optimizer, sharding_type: str, scorer,
                   is_loading: bool) -> dict:
    """The sharded part of a checkpoint (same layout for save and load)."""
    if len(model) != 1:
        raise ValueError("checkpoints support one model chunk per rank (no virtual pipeline)")
    model_sd = _unwrap(model[0]).sharded_state_dict()
    state = {"model": model_sd, "rng_state": _rng_state()}
    if optimizer is not None:
        if getattr(optimizer.config, "use_distributed_optimizer", False):
            state["optimizer"] = distributed_optimizer_sharded_state_dict(
                optimizer, model_sd, sharding_type, is_loading=is_loading
            )
        else:
            state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    if scorer is not None:
        state["regate"] = scorer.sharded_state_dict()
    return state


def save_checkpoint(
    root: str,
    iteration: int,
    model: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    scorer=None,
    *,
    common: Optional[dict] = None,
    sharding_type: str = "fully_reshardable",
) -> str:
    """Write iteration `iteration` atomically and move the pointer; returns its directory."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        os.makedirs(tmp)
    dist.barrier()
    state = _sharded_state(model, optimizer, sharding_type, scorer, is_loading=False)
    state.update(common or {})
    state["iteration"] = iteration
    state.setdefault("world_size", dist.get_world_size())
    if optimizer is not None:
        state["distributed_optimizer"] = bool(getattr(optimizer.config, "use_distributed_optimizer", False))
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, tmp)
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = os.path.join(root, TRACKER)
        with open(pointer + ".tmp", "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer + ".tmp", pointer)  # the pointer moves last
    dist.barrier()
    return final


def load_checkpoint(
    root: str,
    model: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    scorer=None,
    *,
    sharding_type: str = "fully_reshardable",
) -> Dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns the common state (iteration, ...)."""
    path = _checkpoint_dir(root)
    common = dist_checkpointing.load_common_state_dict(path)
    state = _sharded_state(model, optimizer, sharding_type, scorer, is_loading=True)
    if "regate" in state and "regate_state" not in common:
        raise ValueError(
            f"{path} was written by a run without --regate; resume it without --regate or "
            f"start a new --save directory"
        )
    saved_dist_opt = common.get("distributed_optimizer")
    if optimizer is not None and saved_dist_opt is not None and saved_dist_opt != getattr(
        optimizer.config, "use_distributed_optimizer", False
    ):
        flag = "with" if saved_dist_opt else "without"
        raise ValueError(
            f"{path} was saved {flag} --use-distributed-optimizer (another optimizer-state "
            f"layout); resume {flag} it"
        )
    if "rng_state" in state and common.get("world_size") != dist.get_world_size():
        state.pop("rng_state")  # RNG streams are per rank: they do not carry to another world size
    loaded = dist_checkpointing.load(state, path)
    _unwrap(model[0]).load_state_dict(loaded["model"])
    if optimizer is not None:
        if getattr(optimizer.config, "use_distributed_optimizer", False):
            load_distributed_optimizer_state(optimizer, loaded["optimizer"])
        else:
            optimizer.load_state_dict(loaded["optimizer"])
            fix_optimizer_step_after_load(optimizer)
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if scorer is not None:
        scorer.load_state_dict(loaded["regate"])
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return common


def load_module_weights(module: torch.nn.Module, root: str, prefixes=("",)) -> int:
    """Load only the weights of `module` from the latest checkpoint under `root`; returns
    its iteration. The checkpoint may hold `module` alone (a GPT for LLaVA's language model,
    a ViT, the teacher) or inside a larger model under one of `prefixes` (e.g. a LLaVA run's
    ``language_model.``). Every parameter of `module` must be found."""
    path = _checkpoint_dir(root)
    saved = dist_checkpointing.load_tensors_metadata(path)
    for prefix in prefixes:
        sharded = module.sharded_state_dict(prefix=prefix)
        keys = [t.key for t in nested_values(sharded) if isinstance(t, ShardedTensor)]
        if keys and all(k in saved for k in keys):
            break
    else:
        raise ValueError(
            f"{path} does not hold the weights of this {type(module).__name__} (alone or under "
            f"{[p for p in prefixes if p]}); is it a checkpoint of this architecture?"
        )
    loaded = dist_checkpointing.load({"model": sharded}, path)
    state = {k[len(prefix):]: v for k, v in loaded["model"].items()}
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} weights of {type(module).__name__}, "
                         f"e.g. {missing[:3]}; is it a checkpoint of this architecture?")
    return int(dist_checkpointing.load_common_state_dict(path).get("iteration", 0))
