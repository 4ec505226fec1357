"""`regate-demo`: the embedded end-to-end ReGATE run on CPU, no download.

    build digits-VQA (scikit-learn's handwritten digits) -> train a SentencePiece
    tokenizer -> train a small text-only teacher (`regate-train --text-only`) ->
    precompute reference losses (`regate-precompute-ref`) -> train a dense and a
    ReGATE LLaVA student with the same step budget, evaluating held-out answer
    accuracy at intervals -> table, accuracy_vs_tokens.png, reference-loss heat-map
    (`regate-inspect`) and one machine-readable line.

Each stage runs the user-facing command in a subprocess (exactly what a user
would type; the commands are printed) and shows its own progress. Both students
start from the teacher's language-model weights (as LLaVA starts from a
pretrained LLM) and see the same samples in the same order.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from typing import List, Optional

__all__ = ["main"]

# The student (and teacher) architecture: Megatron-LM flags, shared by every stage.
MODEL = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--seq-length", "80", "--img-h", "8", "--img-w", "8", "--patch-dim", "2",
    "--vision-num-layers", "2", "--vision-hidden-size", "64", "--vision-num-attention-heads", "4",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--make-vocab-size-divisible-by", "64",
]
IMAGE = ["--seq-length", "80", "--img-h", "8", "--img-w", "8", "--patch-dim", "2"]


def _stage(title: str, cmd: List[str], cwd: str) -> float:
    """Run one stage's command (inheriting stdout/stderr for its progress bar)."""
    print(f"\n=== {title}\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"regate-demo: stage '{title}' failed with exit code {proc.returncode}")
    return time.perf_counter() - start


def _student(name: str, args, extra: List[str]) -> List[str]:
    return [
        sys.executable, "-m", "regate_megatron.train", *MODEL,
        "--data-path", "data/train.json", "--valid-data-path", "data/valid.json",
        "--tokenizer-model", "tokenizer.model", "--language-model-checkpoint", "teacher",
        "--micro-batch-size", str(args.batch_size), "--train-iters", str(args.steps),
        "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, args.steps // 20)), "--weight-decay", "0.0",
        "--eval-interval", str(args.eval_interval), "--eval-iters", str(args.eval_batches),
        "--eval-max-new-tokens", "40", "--seed", str(args.seed),
        "--metrics-jsonl", f"{name}.jsonl", "--save", f"{name}_ckpt", *extra,
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regate-demo", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--workdir", default="regate_demo", help="everything is written here")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps of each student")
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-interval", type=int, default=40)
    p.add_argument("--eval-batches", type=int, default=4,
                   help="held-out batches (of --batch-size samples) per evaluation")
    p.add_argument("--keep-ratio", type=float, default=0.3, help="ReGATE rho_min")
    p.add_argument("--seed", type=int, default=1234)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    total = time.perf_counter()

    from regate_megatron.demo.digits import build_digits_vqa
    from regate_megatron.tokenizer import train_sentencepiece

    print("=== build digits-VQA and the tokenizer", flush=True)
    data = build_digits_vqa(os.path.join(work, "data"), seed=0)
    train_sentencepiece(data["corpus"], os.path.join(work, "tokenizer"), vocab_size=256)
    print(f"data: {data['train']} / {data['valid']}; tokenizer: {work}/tokenizer.model", flush=True)

    for name in ("teacher", "dense_ckpt", "regate_ckpt", "ref_store", "dense.jsonl", "regate.jsonl"):
        path = os.path.join(work, name)
        if os.path.exists(path):  # a fresh run each time: never mix with an earlier demo
            import shutil

            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    _stage("teacher: a small text-only LM on the answers (regate-train --text-only)", [
        sys.executable, "-m", "regate_megatron.train", *MODEL, "--text-only",
        "--data-path", "data/train.json", "--tokenizer-model", "tokenizer.model",
        "--micro-batch-size", str(args.batch_size), "--train-iters", str(args.teacher_steps),
        "--lr", "2e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "10",
        "--weight-decay", "0.0", "--seed", str(args.seed), "--save", "teacher",
    ], work)
    precompute_s = _stage("reference losses (regate-precompute-ref)", [
        sys.executable, "-m", "regate_megatron.precompute", "--data-path", "data/train.json",
        "--tokenizer-model", "tokenizer.model", "--load", "teacher", "--output", "ref_store",
        *IMAGE, "--micro-batch-size", "64",
    ], work)
    _stage("dense student (stock Megatron-Core LLaVA)", _student("dense", args, []), work)
    _stage("ReGATE student", _student("regate", args, [
        "--regate", "--regate-ref-store", "ref_store", "--regate-keep-ratio", str(args.keep_ratio),
        "--regate-schedule", "cyclic", "--regate-cycle-steps", "10", "--regate-dense-steps", "1",
    ]), work)

    from regate_megatron.demo.report import (
        format_table, load_metrics, plot_accuracy_vs_tokens, summary_line, time_to_accuracy,
    )
    from regate_megatron.inspect_refs import main as inspect_main

    dense = load_metrics(os.path.join(work, "dense.jsonl"))
    regate = load_metrics(os.path.join(work, "regate.jsonl"))
    png = plot_accuracy_vs_tokens(dense, regate, os.path.join(work, "accuracy_vs_tokens.png"))
    inspect_main(["--data-path", os.path.join(work, "data/train.json"),
                  "--tokenizer-model", os.path.join(work, "tokenizer.model"),
                  "--store", os.path.join(work, "ref_store"), *IMAGE, "--samples", "6",
                  "--output", os.path.join(work, "inspect")])
    result = time_to_accuracy(dense, regate)
    print("\n" + format_table(result))
    print(f"plot: {png}\nprecompute stage: {precompute_s:.1f} s; whole demo: "
          f"{time.perf_counter() - total:.0f} s")
    print(summary_line(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
