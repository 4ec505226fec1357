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

from regate_megatron.tools.demo.digits import DIGITS_LAYOUT

__all__ = ["main", "build_inputs", "train_teacher", "precompute_refs", "student_command",
           "run_stage"]

# The student (and teacher) architecture: Megatron-LM flags, shared by every stage.
MODEL = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    *DIGITS_LAYOUT,
    "--vision-num-layers", "2", "--vision-hidden-size", "64", "--vision-num-attention-heads", "4",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--make-vocab-size-divisible-by", "64",
]


def run_stage(title: str, cmd: List[str], cwd: str, *, quiet: bool = False) -> float:
    """Run one stage's command; returns its wall seconds. It inherits stdout/stderr (its own
    progress bar), or with ``quiet`` writes them to ``<cwd>/logs/<first word of title>.log``."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    if quiet:
        os.makedirs(os.path.join(cwd, "logs"), exist_ok=True)
        log_path = os.path.join(cwd, "logs", title.split()[0].strip(":") + ".log")
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        where = f"; see {log_path}"
    else:
        print(f"\n=== {title}\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=cwd, env=env)
        where = ""
    if proc.returncode != 0:
        raise SystemExit(f"stage '{title}' failed with exit code {proc.returncode}{where}")
    return time.perf_counter() - start


def build_inputs(work: str) -> dict:
    """digits-VQA under ``work/data`` and a SentencePiece tokenizer ``work/tokenizer.model``:
    `build_digits_vqa`'s dict plus ``tokenizer`` (the model's path). The demo, the ablation
    and the benchmarks start here."""
    from regate_megatron.data.tokenizer import train_sentencepiece
    from regate_megatron.tools.demo.digits import build_digits_vqa

    data = build_digits_vqa(os.path.join(work, "data"), seed=0)
    data["tokenizer"] = train_sentencepiece(data["corpus"], os.path.join(work, "tokenizer"),
                                            vocab_size=256)
    return data


def train_teacher(work: str, *, steps: int, batch_size: int, seed: int, out: str = "teacher",
                  quiet: bool = False) -> float:
    """A small text-only teacher LM on the answers (`regate-train --text-only`) -> ``out``."""
    return run_stage(f"{out}: a small text-only LM on the answers (regate-train --text-only)", [
        sys.executable, "-m", "regate_megatron.training.train", *MODEL, "--text-only",
        "--data-path", "data/train.json", "--tokenizer-model", "tokenizer.model",
        "--micro-batch-size", str(batch_size), "--train-iters", str(steps),
        "--lr", "2e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "10",
        "--weight-decay", "0.0", "--seed", str(seed), "--save", out,
        *(["--no-progress"] if quiet else []),
    ], work, quiet=quiet)


def precompute_refs(work: str, teacher: str, out: str, *, data_path: str = "data/train.json",
                    tokenizer: str = "tokenizer.model", layout: Optional[List[str]] = None,
                    quiet: bool = False) -> float:
    """Reference losses of ``teacher`` on the training records (`regate-precompute-ref`);
    ``layout``: the sequence/image flags (default: the demo's)."""
    return run_stage(f"{os.path.basename(out)}: reference losses (regate-precompute-ref)", [
        sys.executable, "-m", "regate_megatron.tools.precompute", "--data-path", data_path,
        "--tokenizer-model", tokenizer, "--load", teacher, "--output", out,
        *(DIGITS_LAYOUT if layout is None else layout), "--micro-batch-size", "64",
        *(["--no-progress"] if quiet else []),
    ], work, quiet=quiet)


def student_command(name: str, args, extra: List[str], *, data_path: str = "data/train.json",
                    valid_data_path: str = "data/valid.json",
                    tokenizer: str = "tokenizer.model", init: Optional[str] = "teacher",
                    model: Optional[List[str]] = None, save: bool = True) -> List[str]:
    """The `regate-train` command of one student: ``args`` gives batch_size, steps,
    eval_interval, eval_batches and seed; it writes ``<name>.jsonl`` and (``save``) the final
    checkpoint ``<name>_ckpt``."""
    return [
        sys.executable, "-m", "regate_megatron.training.train",
        *(MODEL if model is None else model),
        "--data-path", data_path, "--valid-data-path", valid_data_path,
        "--tokenizer-model", tokenizer,
        *(["--language-model-checkpoint", init] if init else []),
        "--micro-batch-size", str(args.batch_size), "--train-iters", str(args.steps),
        "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, args.steps // 20)), "--weight-decay", "0.0",
        "--eval-interval", str(args.eval_interval), "--eval-iters", str(args.eval_batches),
        "--eval-max-new-tokens", "40", "--seed", str(args.seed),
        "--metrics-jsonl", f"{name}.jsonl", *(["--save", f"{name}_ckpt"] if save else []),
        *extra,
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

    print("=== build digits-VQA and the tokenizer", flush=True)
    data = build_inputs(work)
    print(f"data: {data['train']} / {data['valid']}; tokenizer: {work}/tokenizer.model", flush=True)

    for name in ("teacher", "dense_ckpt", "regate_ckpt", "ref_store", "dense.jsonl",
                 "regate.jsonl"):
        path = os.path.join(work, name)
        if os.path.exists(path):  # a fresh run each time: never mix with an earlier demo
            import shutil

            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    train_teacher(work, steps=args.teacher_steps, batch_size=args.batch_size, seed=args.seed)
    precompute_s = precompute_refs(work, "teacher", "ref_store")
    run_stage("dense student (stock Megatron-Core LLaVA)", student_command("dense", args, []), work)
    run_stage("ReGATE student", student_command("regate", args, [
        "--regate", "--regate-ref-store", "ref_store", "--regate-keep-ratio", str(args.keep_ratio),
        "--regate-schedule", "cyclic", "--regate-cycle-steps", "10", "--regate-dense-steps", "1",
    ]), work)

    from regate_megatron.tools.demo.report import (
        format_table,
        load_metrics,
        plot_accuracy_vs_tokens,
        summary_line,
        time_to_accuracy,
    )
    from regate_megatron.tools.inspect_refs import main as inspect_main

    dense = load_metrics(os.path.join(work, "dense.jsonl"))
    regate = load_metrics(os.path.join(work, "regate.jsonl"))
    png = plot_accuracy_vs_tokens(dense, regate, os.path.join(work, "accuracy_vs_tokens.png"))
    inspect_main(["--data-path", os.path.join(work, "data/train.json"),
                  "--tokenizer-model", os.path.join(work, "tokenizer.model"),
                  "--store", os.path.join(work, "ref_store"), *DIGITS_LAYOUT, "--samples", "6",
                  "--output", os.path.join(work, "inspect")])
    result = time_to_accuracy(dense, regate)
    print("\n" + format_table(result))
    print(f"plot: {png}\nprecompute stage: {precompute_s:.1f} s; whole demo: "
          f"{time.perf_counter() - total:.0f} s")
    print(summary_line(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
