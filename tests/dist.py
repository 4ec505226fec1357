"""A small harness for real multi-process gloo worlds (no mocking).

``run_world(fn, world_size, tp=..., pp=...)`` spawns ``world_size`` processes;
each initialises torch.distributed (gloo), applies the CPU compatibility
layer, initialises Megatron's model-parallel state and RNG, runs
``fn(rank, **kwargs)`` and sends its (picklable) result back. The parent gets
the results ordered by rank, or an exception carrying the failing rank and its
traceback.

Each process pays ~3 s to import torch + megatron, so a test should run many
checks inside one world rather than start one world per check.
"""

import os
import pickle
import queue as queue_lib
import signal
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp

from regate_megatron.training.parallel import destroy_parallel, initialize_parallel

__all__ = ["WorldError", "run_world"]

_HOST = "127.0.0.1"


class WorldError(RuntimeError):
    """A rank of a spawned world failed, died, or the world timed out."""


def _child(
    rank: int,
    world_size: int,
    port: int,
    tp: int,
    pp: int,
    vpp: Optional[int],
    seed: int,
    timeout_s: float,
    fn: Callable,
    kwargs: dict,
    results: Any,
) -> None:
    import torch.distributed as dist

    # Own process group, so the parent can also kill what this rank starts
    # (dist_checkpointing.save leaves a multiprocessing Manager process running).
    os.setpgid(0, 0)
    # One device per rank, as torchrun gives it: rank_device() reads LOCAL_RANK (cuda:<rank>
    # with GPUs; a world larger than the GPU count wraps around, which NCCL refuses).
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        # The ranks share the machine's cores; one thread each unless there is room.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        store = dist.TCPStore(
            _HOST, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s)
        )
        initialize_parallel(tp, pp, vpp, seed, store=store, rank=rank, world_size=world_size,
                            timeout_s=timeout_s)

        result = fn(rank, **kwargs)
        # Plain pickle bytes: torch's queue would share tensors through file
        # descriptors that vanish when this process exits before the parent reads.
        results.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 -- every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            destroy_parallel()
        except Exception:  # noqa: BLE001 -- never mask the real outcome
            pass


def _kill_process_group(proc: Any) -> None:
    """SIGKILL a rank's process group (itself and its children), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # group already gone (or the rank died before creating it)
    if proc.is_alive():
        proc.kill()
    proc.join()


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    seed: int = 1234,
    timeout: float = 180.0,
    **kwargs: Any,
) -> list:
    """Run ``fn(rank, **kwargs)`` on every rank of a fresh gloo world; return results by rank.

    ``fn`` must be a module-level function (the spawned children import it by
    name) and return something picklable. ``tp``/``pp``/``vpp`` are passed to
    ``parallel_state.initialize_model_parallel``; ``seed`` to
    ``model_parallel_cuda_manual_seed``. A failing rank raises :class:`WorldError`
    with its rank and traceback; if the world has not finished after ``timeout``
    seconds every child is killed and :class:`WorldError` is raised.
    """
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    # The parent hosts the rendezvous store on a port the OS picks (port 0), so
    # there is no window in which another process can take the port.
    store = dist.TCPStore(_HOST, 0, world_size, is_master=True, wait_for_workers=False)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, world_size, store.port, tp, pp, vpp, seed, timeout, fn, kwargs, results),
            # Not daemonic: dist_checkpointing.save starts a child process of its own.
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    deadline = time.monotonic() + timeout
    outcome: dict[int, tuple[bool, Any]] = {}
    try:
        while len(outcome) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_lib.Empty:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(outcome))
                    raise WorldError(
                        f"{fn.__name__}: world of {world_size} timed out after {timeout:.0f} s; "
                        f"ranks {missing} did not finish"
                    ) from None
                for rank, proc in enumerate(procs):
                    if rank not in outcome and proc.exitcode is not None:
                        # Died without reporting (e.g. killed); give the queue a moment.
                        try:
                            r, ok, payload = results.get(timeout=1.0)
                            outcome[r] = (ok, pickle.loads(payload) if ok else payload)
                        except queue_lib.Empty:
                            raise WorldError(
                                f"{fn.__name__}: rank {rank} exited with code {proc.exitcode} "
                                f"without reporting a result"
                            ) from None
                        break
                continue
            outcome[rank] = (ok, pickle.loads(payload) if ok else payload)
            if not ok:
                raise WorldError(f"{fn.__name__}: rank {rank} of {world_size} failed:\n{payload}")
    finally:
        # Ranks that finished get a moment to exit cleanly; then every rank and
        # anything it started is killed.
        for proc in procs:
            proc.join(timeout=10.0 if len(outcome) == world_size else 0.0)
        for proc in procs:
            _kill_process_group(proc)
        results.close()
        del store
    return [outcome[rank][1] for rank in range(world_size)]
