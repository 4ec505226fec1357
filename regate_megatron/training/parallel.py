"""Bring up torch.distributed and Megatron-Core's parallel state: the one place that
does it, for the benchmark, the trainer and the tests.

Launchers are mapped here and nowhere else (`launch_env`):

    torchrun     RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    srun         SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is MASTER_ADDR or the
                 first host of SLURM_JOB_NODELIST, the port MASTER_PORT or one derived from
                 SLURM_JOB_ID (so two jobs sharing a node do not collide)
    neither      one process

Each rank's device is chosen once, from its local rank (`rank_device`): `cuda:<local rank>`
with CUDA (NCCL), else the CPU (gloo, with the CPU compatibility layer applied).
"""

from __future__ import annotations

import os
import re
import socket
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist

__all__ = [
    "LaunchEnv",
    "launch_env",
    "first_slurm_host",
    "rank_device",
    "summed",
    "collective_device",
    "initialize_parallel",
    "destroy_parallel",
    "run_tool",
]


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the launch: read once from the launcher's environment."""

    launcher: str            # "torchrun" | "slurm" | "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: ``gpu[003-010,12],cpu1`` -> ``gpu003``."""
    head = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    if not head or not head.group(1) and not head.group(2):
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a SLURM hostlist")
    prefix, ranges = head.group(1), head.group(3)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]  # zero padding is kept as written


def _slurm_port(job_id: str) -> int:
    """A port per job, so jobs sharing a node do not collide (Megatron-LM's scripts pick one
    per job too); in 20000..39999, below Linux's ephemeral range."""
    return 20000 + int(job_id) % 20000 if job_id.isdigit() else 29500


def launch_env(environ: Optional[Dict[str, str]] = None) -> LaunchEnv:
    """This process's rank, world, local rank and rendezvous, from torchrun or srun."""
    env = os.environ if environ is None else environ

    def need(name: str) -> int:
        try:
            return int(env[name])
        except (KeyError, ValueError):
            raise ValueError(f"{name}={env.get(name)!r}: the launcher must set it to an "
                             f"integer") from None

    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or a launcher exporting its names)
        return LaunchEnv("torchrun", need("RANK"), need("WORLD_SIZE"),
                         int(env.get("LOCAL_RANK", "0")), env.get("MASTER_ADDR", "127.0.0.1"),
                         int(env.get("MASTER_PORT", "29500")))
    # An srun task step: SLURM_STEP_ID tells a task from the batch shell (which sets PROCID too).
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", ""))
        port = int(env.get("MASTER_PORT") or _slurm_port(env.get("SLURM_JOB_ID", "")))
        return LaunchEnv("slurm", need("SLURM_PROCID"), need("SLURM_NTASKS"),
                         need("SLURM_LOCALID"), addr, port)
    return LaunchEnv("single", 0, 1, 0, "127.0.0.1", 0)


def rank_device(local_rank: Optional[int] = None) -> torch.device:
    """This rank's device: ``cuda:<local rank>`` with CUDA, else the CPU. Everything that
    reaches the model goes there (`Batch.to`, `TokenSelection.to`)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank is None:
        local_rank = launch_env().local_rank
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def collective_device(group=None) -> torch.device:
    """Where a collective over ``group`` runs: this rank's device with NCCL (which moves
    only CUDA tensors), the CPU with gloo."""
    if dist.get_backend(group) == "nccl":
        return rank_device()
    return torch.device("cpu")


def summed(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``tensor`` summed over ``group`` (default: the world), returned on the CPU; the
    all-reduce runs on `collective_device`. Collective."""
    out = tensor.to(collective_device(group))
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.cpu()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    seed: int = 1234,
    *,
    store: Optional[dist.Store] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    timeout_s: float = 600.0,
) -> None:
    """Initialise the process group (if needed), Megatron's model-parallel groups and RNG."""
    from megatron.core import parallel_state, tensor_parallel

    from regate_megatron.core.cpu_compat import apply_cpu_compat

    use_cuda = torch.cuda.is_available()
    launch = launch_env()
    if use_cuda:
        torch.cuda.set_device(rank_device(launch.local_rank))
    apply_cpu_compat()  # a no-op with CUDA
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if store is not None:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    timeout=timeout)
        elif launch.launcher != "single":  # torchrun / srun
            dist.init_process_group(
                backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                rank=launch.rank, world_size=launch.world_size, timeout=timeout)
        else:  # a single process
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        current = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size())
        if current != (tensor_model_parallel_size, pipeline_model_parallel_size):
            raise RuntimeError(
                f"model parallelism is already initialised as TP x PP = {current}; call "
                f"destroy_parallel() before re-initialising with "
                f"{(tensor_model_parallel_size, pipeline_model_parallel_size)}"
            )
        return  # already up (a second tool in the same process)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down what `initialize_parallel` set up."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_tool(prog: str, body: Callable[[], Any]) -> int:
    """Run a command-line tool's body: an input error (bad data, store, checkpoint) becomes
    one message naming the tool and exit status 2. The parallel state the body brought up is
    always torn down; one that was up before (a caller's, e.g. a test session's) is left."""
    brought_up = not dist.is_initialized()
    try:
        body()
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except Exception:  # any other failure names the rank, so a multi-node job log says who died
        launch = launch_env()
        print(f"{prog}: rank {launch.rank} of {launch.world_size} (local rank {launch.local_rank} "
              f"on {socket.gethostname()}) failed:", file=sys.stderr, flush=True)
        traceback.print_exc()
        return 1
    finally:
        if brought_up and dist.is_initialized():
            destroy_parallel()
    return 0
