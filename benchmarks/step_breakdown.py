"""What a training step costs, phase by phase: dense vs ReGATE, side by side in one run.

    python benchmarks/step_breakdown.py [--workdir regate_bench] [--steps 20] [--warmup 3]

Builds (or reuses) a digits-VQA workspace (data, tokenizer, a short text-only teacher and
its reference-loss store; any `regate-demo` / `regate-ablate` workdir will do), then sets up
two `regate-train` runs in this process with the demo's student flags: dense, and ReGATE
(cyclic schedule, rho_min 0.3, 1 dense step per 10). It advances them in alternation, one
step each, so load drift on a shared machine hits both alike, and times every phase of
`Run.train_step` by calling the Run's own pieces in the same order:

    data        global batch positions, dataset reads and collate   (Run.micro_batches)
    lookup      the EMA lookup for the global batch                 (ReGateScorer.begin_step)
    selection   scores + top-k per micro-batch                      (ReGateScorer.select)
    broadcast   selections to the model-parallel group              (broadcast_selections)
    fwd/bwd     Megatron-Core's forward/backward schedule           (incl. the router)
    ema         record + the EMA update exchange                    (record, end_step)
    optimizer   optimizer step + LR schedule
    metrics     the step's metrics reduction                        (Run._step_metrics)

Prints the mean milliseconds per phase over ``--steps`` measured steps (after ``--warmup``)
for both runs, the ratio ReGATE/dense per phase, and ReGATE's bookkeeping (lookup +
selection + broadcast + ema) as a share of its step; the last line is machine-readable.
``--steps`` should cover whole schedule cycles (10 steps) so dense and sparse ReGATE steps
are weighed as in training.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("data", "lookup", "selection", "broadcast", "fwd/bwd", "ema", "optimizer", "metrics")
BOOKKEEPING = ("lookup", "selection", "broadcast", "ema")


class PhaseTimer:
    """Wall seconds per named phase, summed over steps."""

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


def timed_train_step(run, timer: PhaseTimer) -> dict:
    """`Run.train_step`, phase by phase (the same calls, in the same order)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from regate_megatron.core.selection import broadcast_selections

    args, step = run.args, run.iteration
    start = time.perf_counter()
    with timer("data"):
        batches, global_ids = run.micro_batches(step)
    if run.scorer is None:
        selections = [None] * len(batches)
    else:
        with timer("lookup"):
            run.scorer.begin_step(step, global_ids)
        with timer("selection"):
            selections = None
            if ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage():
                selections = [run.scorer.select(b.sample_ids, b.labels, b.loss_mask)
                              for b in batches]
        with timer("broadcast"):
            selections = broadcast_selections(selections, ps.get_model_parallel_group())
    records: list = []
    with timer("fwd/bwd"):
        for chunk in run.model:
            chunk.zero_grad_buffer()
        run.optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=partial(run.forward_step, records=records),
            data_iterator=iter(list(zip(batches, selections, strict=True))), model=run.model,
            num_microbatches=args.num_microbatches, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False,
        )
    if run.scorer is not None:
        with timer("ema"):
            if run.scorer_records_losses:
                for batch, loss, computed in records:
                    run.scorer.record(batch.sample_ids, batch.labels, batch.loss_mask, loss,
                                      computed)
            run.scorer.end_step()
    with timer("optimizer"):
        ok, grad_norm, _ = run.optimizer.step()
        if ok:
            run.scheduler.step(increment=1)
    run.iteration += 1
    with timer("metrics"):
        return run._step_metrics(batches, selections, records, grad_norm,
                                 time.perf_counter() - start)


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
            start = time.perf_counter()
            timed_train_step(run, timer)
            if i >= args.warmup:
                totals[name] += time.perf_counter() - start

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
