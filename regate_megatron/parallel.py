"""Bring up torch.distributed and Megatron-Core's parallel state: the one place that
does it, for the benchmark, the trainer and the tests.

On a machine without CUDA this applies the CPU compatibility layer and uses gloo;
with CUDA it uses NCCL and binds the local GPU. Under torchrun the world comes
from the environment; otherwise (or given a `store`) it is built here.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

__all__ = ["initialize_parallel", "destroy_parallel", "run_tool"]


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

    from regate_megatron.cpu_compat import apply_cpu_compat

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    apply_cpu_compat()  # a no-op with CUDA
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if store is not None:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    timeout=timeout)
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / SLURM launcher
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
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
    one message naming the tool and exit status 2; parallel state is always torn down."""
    try:
        body()
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            destroy_parallel()
    return 0
