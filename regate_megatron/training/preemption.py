"""Stopping a run early and cleanly: signals, wall-clock budget and exit interval.

Megatron-LM's flags, with its meanings:

    --exit-signal-handler      on SIGTERM (or --exit-signal) and SIGUSR1: finish the current
                               step, save a checkpoint, exit 0
    --exit-duration-in-mins M  the same once M minutes of training have passed
    --exit-interval N          the same after every iteration divisible by N

A signal handler only sets a flag: Python runs handlers between bytecodes, so a rank
inside a collective reacts late, and signals reach ranks at different times. At each
step boundary every rank contributes its flag to one all-reduce (MAX) over the world,
so all ranks stop after the same step and save one consistent checkpoint. (Each rank
contributes the number of the signal it caught; where ranks caught different ones the
higher number wins, so SIGTERM (15), a cancellation, overrides SIGUSR1 (10), a requeue.)

The exit status is 0 on every rank, because srun's ``--kill-on-bad-exit`` turns a
non-zero exit of one rank into a kill of the others mid-save. What stopped the run is
left in a marker file, ``<save>/stopped_early`` (one JSON object: reason, signal,
iteration), which ``slurm/train_regate.sh`` reads to requeue the job (on SIGUSR1: the
time-limit / preemption warning of ``#SBATCH --signal=B:USR1@N``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from regate_megatron.core.roles import is_logging_rank

__all__ = ["EarlyStop", "MARKER", "read_marker", "add_exit_args"]

MARKER = "stopped_early"

# Signals the handler understands; SIGUSR1 is always handled next to --exit-signal: it is
# what `#SBATCH --signal=B:USR1@N` (forwarded by the batch script) and preemption send.
_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


def add_exit_args(parser) -> None:
    """Megatron-LM's exit flags (same names and meanings)."""
    g = parser.add_argument_group("exit (preemption, time limits)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal or SIGUSR1: finish the step, save a checkpoint, exit 0 "
                        "(every rank stops after the same step)")
    g.add_argument("--exit-signal", choices=_SIGNALS, default="SIGTERM",
                   help="the signal handled besides SIGUSR1 (default SIGTERM)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit 0 once this many minutes of training have passed")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit 0 after an iteration divisible by this")


def read_marker(save_dir: str) -> Optional[dict]:
    """What stopped the run that saved to `save_dir` early, or None if it ran to the end."""
    path = os.path.join(save_dir, MARKER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class EarlyStop:
    """The stop conditions of one run; `requested` is called once per step on every rank."""

    def __init__(self, args):
        self.args = args
        self.start = time.monotonic()
        self.received: Optional[str] = None
        self.reason: Optional[str] = None
        self.signals = []
        if getattr(args, "exit_signal_handler", False):
            for name in dict.fromkeys((args.exit_signal, "SIGUSR1")):
                signal.signal(getattr(signal, name), self._on_signal)
                self.signals.append(name)
        # Clear a marker left by the run this one resumes (the batch script removes it too).
        save = getattr(args, "save", None)
        if save and is_logging_rank():
            try:
                os.remove(os.path.join(save, MARKER))
            except OSError:  # none there; a --save that is no directory is named in setup
                pass

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:  # the first one wins; acted on at the next step boundary
            self.received = signal.Signals(signum).name

    def requested(self, iteration: int) -> bool:
        """True on every rank, after the same step, when the run should save and exit."""
        args = self.args
        interval = getattr(args, "exit_interval", None)
        duration = getattr(args, "exit_duration_in_mins", None)
        # One number per rank: the signal's number, 1 for an exhausted time budget, else 0.
        code = 0
        if self.received is not None:
            code = int(getattr(signal, self.received))
        elif duration is not None and (time.monotonic() - self.start) / 60.0 > duration:
            code = 1
        if self.signals or duration is not None:
            from regate_megatron.training.parallel import collective_device

            if dist.is_initialized():
                flag = torch.tensor([code], dtype=torch.int32, device=collective_device())
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # sync point: all ranks agree
                code = int(flag.item())
        if code > 1:
            self.reason, self.received = "signal", signal.Signals(code).name
        elif code == 1:
            self.reason = "duration"
        elif interval and iteration % interval == 0:
            self.reason = "interval"
        return self.reason is not None

    def finish(self, iteration: int) -> None:
        """After the final checkpoint: leave the marker (rank 0) if the run stopped early."""
        save = getattr(self.args, "save", None)
        train_iters = getattr(self.args, "train_iters", None)
        if self.reason is None or not save or (train_iters and iteration >= train_iters):
            return  # ran to the end (a stop requested after the last step changes nothing)
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        marker = dict(reason=self.reason, signal=self.received, iteration=iteration)
        path = os.path.join(save, MARKER)
        with open(path + ".tmp", "w") as f:
            json.dump(marker, f)
        os.replace(path + ".tmp", path)
        what = f"signal {self.received}" if self.reason == "signal" else self.reason
        print(f"[regate-train] stopped early ({what}) after iteration {iteration}; checkpoint "
              f"saved to {save}", flush=True)
