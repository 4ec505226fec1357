"""Atomic `dist_checkpointing` checkpoints of a ReGATE run, in Megatron-LM's layout.

    <dir>/latest_checkpointed_iteration.txt   the "latest" pointer (moved last)
    <dir>/iter_0000100/                        one torch_dist checkpoint

A checkpoint holds the model, the optimizer (distributed or not), the LR
schedule, the training state (iteration, consumed samples, token counters), every
rank's RNG state and, inside the model's own sharded state, the ReGATE state (EMA shards,
vocabulary EMA: `regate_megatron.megatron_lm.carry_regate_state`, the path a Megatron-LM
run's checkpoint takes too); the model's
architecture flags are stored in its common state so a consumer (the teacher in
`regate-precompute-ref`) can rebuild it. A save goes to `iter_N.tmp` and is
renamed into place only when every rank has finished; the pointer moves after
that, so a crash at any point leaves the previous checkpoint intact. Parameters holding
NaN/inf are never written (`guard.check_params_finite`).

Processes: Megatron-Core 0.16.1's torch_dist save (`FileSystemWriterAsync`, also in its
synchronous mode) caches a results queue from a spawn-context `multiprocessing.Manager` (a
server process that lives as long as the trainer, re-imports the entry script and survives a
`kill -9` of it) and forks one writer process per file bucket for every save. For a
synchronous save that queue never leaves the trainer, so `_sync_save_without_orphans` gives
Megatron a plain in-process queue instead (no manager), and makes every process forked by
the trainer die with it (`PR_SET_PDEATHSIG`), so a killed trainer leaves no writer behind.
`prepare_save_dir` checks `--save` and removes stale `iter_*.tmp` directories at start-up.
"""

from __future__ import annotations

import ctypes
import glob
import os
import queue
import random
import shutil
import signal
import sys
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from regate_megatron.core.mcore_compat import align_saved_lr_schedule
from regate_megatron.megatron_lm.state import PREFIX as REGATE_PREFIX
from regate_megatron.training.guard import check_params_finite
from regate_megatron.training.optimizer_state import (
    distributed_optimizer_sharded_state_dict,
    fix_optimizer_step_after_load,
    load_distributed_optimizer_state,
)

__all__ = [
    "TRACKER",
    "iteration_dir",
    "latest_iteration",
    "has_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "load_module_weights",
    "read_common_state",
    "checkpoint_path",
    "prepare_save_dir",
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


def has_checkpoint(root: str) -> bool:
    """Whether `root` is, or holds, a finished checkpoint (False for a missing directory)."""
    return os.path.exists(os.path.join(root, "metadata.json")) or (
        os.path.isdir(root) and latest_iteration(root) is not None)


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


def checkpoint_path(root: str) -> str:
    """The torch_dist directory `--load root` resumes from (root itself, or its latest)."""
    return _checkpoint_dir(root)


def prepare_save_dir(root: str, is_rank0: bool) -> None:
    """Before step 1: `--save root` must be a writable directory (created if missing); rank 0
    removes what a killed earlier save left (`iter_*.tmp`, a half-moved pointer)."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"--save {root} is a file, not a directory; point --save at a "
                         f"directory (it is created if missing)")
    probe = os.path.join(root, f".write-test-{os.uname().nodename}-{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--save {root} is not writable ({err.strerror or err}); choose a "
                         f"directory this job can create and write") from None
    if is_rank0:
        for stale in sorted(glob.glob(os.path.join(root, "iter_*.tmp"))):
            shutil.rmtree(stale, ignore_errors=True)
            print(f"[regate-train] removed {stale}, left by an interrupted save", flush=True)
        if os.path.exists(os.path.join(root, TRACKER + ".tmp")):
            os.remove(os.path.join(root, TRACKER + ".tmp"))


_PR_SET_PDEATHSIG = 1


def _die_with_parent(prctl, parent_pid: int) -> None:
    """In a freshly forked child: be killed when the forking thread's process dies."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _sync_save_without_orphans() -> None:
    """Megatron-Core 0.16.1's save processes must not outlive the trainer (see the module
    docstring). Idempotent; applied from `save_checkpoint` only."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_regate_no_orphans", False):
        return
    if sys.platform.startswith("linux"):
        # Resolved here, not in the child: no dynamic loading between fork and exit.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        parent = {}
        os.register_at_fork(before=lambda: parent.__setitem__("pid", os.getpid()),
                            after_in_child=lambda: _die_with_parent(prctl, parent.get("pid", -1)))
    if filesystem_async._results_queue is None:
        # Synchronous saves put and get their results in this process: a thread queue does.
        filesystem_async._results_queue = queue.Queue()
    filesystem_async._regate_no_orphans = True


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


def _sharded_state(model: List[torch.nn.Module], optimizer, sharding_type: str,
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
    return state


def save_checkpoint(
    root: str,
    iteration: int,
    model: List[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    common: Optional[dict] = None,
    sharding_type: str = "fully_reshardable",
) -> str:
    """Write iteration `iteration` atomically and move the pointer; returns its directory.
    Refused (NonFiniteError, on every rank) when a parameter holds NaN/inf."""
    check_params_finite(model, iteration)
    _sync_save_without_orphans()
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        os.makedirs(tmp)
    dist.barrier()
    state = _sharded_state(model, optimizer, sharding_type, is_loading=False)
    state.update(common or {})
    state["iteration"] = iteration
    state.setdefault("world_size", dist.get_world_size())
    if optimizer is not None:
        state["distributed_optimizer"] = bool(
            getattr(optimizer.config, "use_distributed_optimizer", False))
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
    *,
    sharding_type: str = "fully_reshardable",
) -> Dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns the common state (iteration, ...)."""
    path = _checkpoint_dir(root)
    common = dist_checkpointing.load_common_state_dict(path)
    state = _sharded_state(model, optimizer, sharding_type, is_loading=True)
    carries_regate = any(key.startswith(REGATE_PREFIX) for key in state["model"])
    if carries_regate and "regate_state" not in common:
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
        # a new --lr/--min-lr (--override-opt_param-scheduler) must still find the saved groups
        align_saved_lr_schedule(optimizer, loaded["optimizer"])
        if getattr(optimizer.config, "use_distributed_optimizer", False):
            load_distributed_optimizer_state(optimizer, loaded["optimizer"])
        else:
            optimizer.load_state_dict(loaded["optimizer"])
            fix_optimizer_step_after_load(optimizer)
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
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
