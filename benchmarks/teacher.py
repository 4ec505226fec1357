"""Student step time with the online teacher vs with the offline store, side by side.

    python benchmarks/teacher.py [--students 1] [--teacher-ranks 1] [--iters 12]

Builds digits-VQA and a tokenizer, trains a small text-only teacher (`regate-train
--text-only`), precomputes its store (`regate-precompute-ref`), then runs the same ReGATE
student twice under torchrun: reading the store (offline) and with `--regate-teacher-ranks`
(online, the teacher one global batch ahead on its own ranks). Prints the mean student step
time of each (the first two steps are warm-up) and the online run's mean `teacher_wait_s`
as a fraction of its step; the goal, where the two groups do not share cores, is <= 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from regate_megatron.tools.demo.digits import DIGITS_LAYOUT  # noqa: E402

MODEL = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
         "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--transformer-impl", "local",
         "--make-vocab-size-divisible-by", "64", "--lr", "1e-3", "--lr-decay-style", "constant",
         "--micro-batch-size", "8", "--no-progress", "--seed", "1", *DIGITS_LAYOUT]
REGATE = ["--regate", "--regate-keep-ratio", "0.5", "--regate-cycle-steps", "4"]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(module: str, args, cwd: str, nproc: int = 1) -> None:
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_port()), "-m", module] if nproc > 1
              else [sys.executable, "-m", module])
    proc = subprocess.run([*launch, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{module} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _steps(path: str):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[2:]  # warm-up: the first steps pay start-up costs


def main() -> None:
    from regate_megatron.tools.demo.run import build_inputs

    cli = argparse.ArgumentParser()
    cli.add_argument("--students", type=int, default=1)
    cli.add_argument("--teacher-ranks", type=int, default=1)
    cli.add_argument("--iters", type=int, default=12)
    opts = cli.parse_args()

    work = tempfile.mkdtemp(prefix="regate-bench-teacher-")
    data = build_inputs(work)
    tok = data["tokenizer"]
    common = ["--data-path", data["train"], "--tokenizer-model", tok, *MODEL]
    _run("regate_megatron.training.train",
         [*common, "--text-only", "--train-iters", "2", "--save", "teacher"], work)
    _run("regate_megatron.tools.precompute",
         ["--data-path", data["train"], "--tokenizer-model", tok, "--load", "teacher",
          "--output", "store", *DIGITS_LAYOUT, "--no-progress"], work)
    student = [*common, *REGATE, "--train-iters", str(opts.iters),
               "--global-batch-size", str(8 * opts.students)]
    _run("regate_megatron.training.train",
         [*student, "--regate-ref-store", "store", "--metrics-jsonl", "offline.jsonl"],
         work, opts.students)
    _run("regate_megatron.training.train",
         [*student, "--regate-teacher-ranks", str(opts.teacher_ranks),
          "--regate-teacher-load", "teacher", "--metrics-jsonl", "online.jsonl"],
         work, opts.students + opts.teacher_ranks)
    offline, online = _steps(os.path.join(work, "offline.jsonl")), _steps(
        os.path.join(work, "online.jsonl"))
    off_step = statistics.mean(m["step_seconds"] for m in offline)
    on_step = statistics.mean(m["step_seconds"] for m in online)
    wait = statistics.mean(m["teacher_wait_s"] for m in online)
    print(f"students={opts.students} teacher_ranks={opts.teacher_ranks} steps={len(online)} "
          f"(after 2 warm-up) cores={os.cpu_count()}")
    print(f"offline_step_s={off_step:.4f} online_step_s={on_step:.4f} "
          f"online_over_offline={on_step / off_step:.3f}")
    print(f"mean_teacher_wait_s={wait:.4f} wait_fraction_of_step={wait / on_step:.3f}")


if __name__ == "__main__":
    main()
