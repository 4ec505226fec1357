"""What a training step costs, phase by phase: dense vs ReGATE, side by side in one run.

    python benchmarks/step_breakdown.py [--workdir regate_bench] [--steps 20] [--warmup 3]

Builds (or reuses) a digits-VQA workspace (data, tokenizer, a short text-only teacher and
its reference-loss store; any `regate-demo` / `regate-ablate` workdir will do), then sets up
two `regate-train` runs in this process with the demo's student flags: dense, and ReGATE
(cyclic schedule, rho_min 0.3, 1 dense step per 10). It advances them in alternation, one
step each, so load drift on a shared machine hits both alike. Each step is the real
`Run.train_step` (with --regate: its `ReGateForwardBackward`); for the duration of that call
only, the methods the step calls are wrapped with timers (and restored afterwards), and each
phase gets its own time minus any timed phase nested inside it:

    data        global batch positions, dataset reads and collate   (Run.micro_batches)
    lookup      the global batch's sample ids (one all-reduce) and
                the EMA lookup                                      (ReGateForwardBackward
                                                                     ._global_ids,
                                                                     ReGateScorer.begin_step)
    selection   combined-sequence targets, scores + top-k per
                micro-batch                                         (the wrapper's view,
                                                                     expand_targets,
                                                                     ReGateScorer.select)
    broadcast   selections to the model-parallel group              (broadcast_selections as
                                                                     megatron_lm.step calls it)
    fwd/bwd     Megatron-Core's forward/backward schedule, incl.   (the inner schedule
                the routed forward and `regate_loss`                 function)
    ema         record + the EMA update exchange                    (ReGateScorer.record,
                                                                     end_step)
    optimizer   optimizer step + LR schedule                        (optimizer.step,
                                                                     scheduler.step)
    metrics     the step's metrics reduction                        (Run._step_metrics)
    other       the rest of `Run.train_step`: gradient zeroing, the NaN/inf guard hook,
                the wrapper's own glue

Prints the mean milliseconds per phase over ``--steps`` measured steps (after ``--warmup``)
for both runs, the ratio ReGATE/dense per phase, and ReGATE's bookkeeping (lookup +
selection + broadcast + ema) as a share of its step (the whole `Run.train_step` call); the
last line is machine-readable. ``--steps`` should cover whole schedule cycles (10 steps) so
dense and sparse ReGATE steps are weighed as in training.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from functools import wraps
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("data", "lookup", "selection", "broadcast", "fwd/bwd", "ema", "optimizer", "metrics",
          "other")
BOOKKEEPING = ("lookup", "selection", "broadcast", "ema")


class PhaseTimer:
    """Exclusive wall seconds per named phase, summed over steps: a phase nested inside
    another (timed) phase is charged to itself only, not to its parent too."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._stack: list = []  # [phase, start, seconds of timed phases nested inside]

    @contextmanager
    def __call__(self, phase: str):
        frame = [phase, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[1]
            self.seconds[phase] += elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed


@contextmanager
def _patched(owner, name: str, phase: str, timer: PhaseTimer):
    """``owner.name`` timed as ``phase`` until exit, then exactly as it was (an instance
    attribute put back or removed, a module attribute put back)."""
    original = getattr(owner, name)
    had_own = name in vars(owner)
    own = vars(owner).get(name)

    @wraps(original)
    def timed(*args, **kwargs):
        with timer(phase):
            return original(*args, **kwargs)

    setattr(owner, name, timed)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, own)
        else:
            delattr(owner, name)


@contextmanager
def instrumented(run, timer: PhaseTimer):
    """Wrap, for one `Run.train_step` call, the methods it reaches with phase timers."""
    import regate_megatron.megatron_lm.step as step_module

    with ExitStack() as stack:
        def patch(owner, name, phase):
            stack.enter_context(_patched(owner, name, phase, timer))

        patch(run, "micro_batches", "data")
        patch(run, "_step_metrics", "metrics")
        patch(run.optimizer, "step", "optimizer")
        patch(run.scheduler, "step", "optimizer")
        wrapper = run.forward_backward
        if run.scorer is None:  # dense: the schedule is Megatron-Core's function itself
            patch(run, "forward_backward", "fwd/bwd")
        else:  # ReGATE: the `ReGateForwardBackward` around it
            if not isinstance(wrapper, step_module.ReGateForwardBackward):
                raise TypeError(f"expected ReGateForwardBackward, got {type(wrapper)!r}")
            patch(wrapper, "inner", "fwd/bwd")
            patch(wrapper, "_global_ids", "lookup")
            patch(wrapper, "view", "selection")
            patch(step_module, "expand_targets", "selection")
            patch(step_module, "broadcast_selections", "broadcast")
            scorer = run.scorer
            patch(scorer, "begin_step", "lookup")
            patch(scorer, "select", "selection")
            patch(scorer, "record", "ema")
            patch(scorer, "end_step", "ema")
        yield


def timed_train_step(run, timer: PhaseTimer) -> float:
    """One real `Run.train_step`, phases timed; returns its wall seconds (untimed phases of
    the step go to "other")."""
    with instrumented(run, timer):
        before = sum(timer.seconds.values())
        start = time.perf_counter()
        run.train_step()
        seconds = time.perf_counter() - start
    timer.seconds["other"] += seconds - (sum(timer.seconds.values()) - before)
    return seconds


def ensure_workspace(work: str, teacher_steps: int) -> None:
    from regate_megatron.tools.demo import run as demo

    os.makedirs(work, exist_ok=True)
    if not os.path.exists(os.path.join(work, "tokenizer.model")):
        demo.build_inputs(work)
    if not os.path.exists(os.path.join(work, "teacher", "latest_checkpointed_iteration.txt")):
        demo.train_teacher(work, steps=teacher_steps, batch_size=32, seed=1234, quiet=True)
    if not os.path.exists(os.path.join(work, "ref_store", "meta.json")):
        demo.precompute_refs(work, "teacher", "ref_store", quiet=True)


def build_run(work: str, batch_size: int, regate: bool):
    from regate_megatron.tools.demo.run import MODEL
    from regate_megatron.training.arguments import parse_args
    from regate_megatron.training.train import Run

    flags = [*MODEL, "--data-path", os.path.join(work, "data/train.json"),
             "--tokenizer-model", os.path.join(work, "tokenizer.model"),
             "--language-model-checkpoint", os.path.join(work, "teacher"),
             "--micro-batch-size", str(batch_size), "--train-iters", "100000", "--lr", "1e-3",
             "--weight-decay", "0.0", "--seed", "1234", "--no-progress"]
    if regate:
        flags += ["--regate", "--regate-ref-store", os.path.join(work, "ref_store"),
                  "--regate-keep-ratio", "0.3", "--regate-schedule", "cyclic",
                  "--regate-cycle-steps", "10", "--regate-dense-steps", "1"]
    return Run(parse_args(flags)).setup()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="regate_bench")
    p.add_argument("--steps", type=int, default=20, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per run first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher-steps", type=int, default=50,
                   help="if the workspace has no teacher yet (its quality does not matter here)")
    args = p.parse_args(argv)
    work = os.path.abspath(args.workdir)
    ensure_workspace(work, args.teacher_steps)

    import torch

    runs = {"dense": build_run(work, args.batch_size, False),
            "regate": build_run(work, args.batch_size, True)}
    timers = {name: PhaseTimer() for name in runs}
    totals = defaultdict(float)
    for i in range(args.warmup + args.steps):
        for name, run in runs.items():  # alternate: drift hits both alike
            timer = timers[name] if i >= args.warmup else PhaseTimer()
            seconds = timed_train_step(run, timer)
            if i >= args.warmup:
                totals[name] += seconds

    n = args.steps
    ms = {name: {ph: 1e3 * timers[name].seconds.get(ph, 0.0) / n for ph in PHASES}
          for name in runs}
    step_ms = {name: 1e3 * totals[name] / n for name in runs}
    print(f"\nstep breakdown, demo size (4 layers, hidden 128, seq 80, batch {args.batch_size}), "
          f"mean over {n} steps after {args.warmup} warm-up, torch threads "
          f"{torch.get_num_threads()}\n")
    print(f"{'phase':<11}{'dense ms':>10}{'ReGATE ms':>11}{'ReGATE/dense':>14}{'% of ReGATE':>13}")
    for ph in PHASES:
        d, r = ms["dense"][ph], ms["regate"][ph]
        ratio = f"{r / d:.2f}" if d > 1e-6 else "-"
        print(f"{ph:<11}{d:>10.2f}{r:>11.2f}{ratio:>14}{100 * r / step_ms['regate']:>12.1f}%")
    d, r = step_ms["dense"], step_ms["regate"]
    print(f"{'step':<11}{d:>10.2f}{r:>11.2f}{r / d:>14.2f}{100.0:>12.1f}%")
    book = sum(ms["regate"][ph] for ph in BOOKKEEPING)
    print(f"\nReGATE bookkeeping (lookup + selection + broadcast + ema): {book:.2f} ms = "
          f"{100 * book / r:.1f}% of a ReGATE step (goal <= 3%)")
    print(f"bookkeeping_share={book / r:.4f} step_ratio={r / d:.3f} "
          f"dense_step_ms={d:.2f} regate_step_ms={r:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
