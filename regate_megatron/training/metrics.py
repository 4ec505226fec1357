"""Per-step metrics: `--metrics-jsonl`, TensorBoard and a progress bar, all on rank 0.

The JSONL file is strict JSON (a non-finite value is written as null). A run with
`--load` continues it: rows after the resumed iteration (trained after the last checkpoint,
about to be retrained) are dropped first, so no step appears twice. A run without `--load`
refuses an existing non-empty file rather than cutting or mixing another run's rows
(`check_metrics_file`, before step 1). A torn last line (a kill mid-write) is dropped with
a warning; a bad line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List

from regate_megatron.core.roles import is_logging_rank
from regate_megatron.training.guard import json_safe

__all__ = ["MetricsLogger", "check_metrics_file", "read_metrics_rows"]


def read_metrics_rows(path: str, warn: bool = True) -> List[dict]:
    """The rows of a metrics JSONL file; a torn last line is dropped (with a warning), any
    other unreadable line is a ValueError naming `path:line`."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows, last = [], max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as err:
            if i == last:
                if warn:
                    print(f"[regate-train] warning: {path}:{i + 1}: dropping a torn last line "
                          f"(a run killed mid-write)", file=sys.stderr, flush=True)
                break
            raise ValueError(
                f"--metrics-jsonl {path}:{i + 1}: not a metrics row ({err}); the file is "
                f"corrupt before its last line: move it away or pass another --metrics-jsonl"
            ) from None
        rows.append(row)
    return rows


def check_metrics_file(path: str, resuming: bool) -> None:
    """Before step 1: a fresh run does not take over another run's metrics; a resumed run's
    file must be readable (see the module docstring)."""
    if not path or not os.path.exists(path):
        return
    if os.path.isdir(path):
        raise ValueError(f"--metrics-jsonl {path} is a directory; pass a file path")
    if not resuming and os.path.getsize(path) > 0:
        raise ValueError(
            f"--metrics-jsonl {path} already holds another run's metrics and this run starts "
            f"from scratch (no --load); pass --load to continue that run, or move the file away "
            f"/ choose another --metrics-jsonl"
        )
    read_metrics_rows(path, warn=False)  # the logger drops a torn last line, with a warning


class MetricsLogger:
    def __init__(self, args, start: int = 0):
        self.args = args
        self.rank0 = is_logging_rank()
        self.jsonl = None
        self.writer = None
        self.bar = None
        if not self.rank0:
            return
        if args.metrics_jsonl:
            self._truncate(args.metrics_jsonl, start)
            self.jsonl = open(args.metrics_jsonl, "a")
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(args.tensorboard_dir)
        if not args.no_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=args.train_iters, initial=start, desc="train", unit="step",
                            dynamic_ncols=True)

    @staticmethod
    def _truncate(path: str, start: int) -> None:
        if not os.path.exists(path):
            return
        keep = [row for row in read_metrics_rows(path) if row["step"] <= start]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(json_safe(row), allow_nan=False) + "\n" for row in keep)
        os.replace(path + ".tmp", path)

    def log(self, metrics: dict) -> None:
        if not self.rank0:
            return
        step = metrics["step"]
        if self.jsonl:
            self.jsonl.write(json.dumps(json_safe(metrics), allow_nan=False) + "\n")
            self.jsonl.flush()
        if self.writer:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            post = {"loss": f"{metrics['lm_loss']:.3f}", "rho": f"{metrics['keep_ratio']:.2f}"}
            if "eval_accuracy" in metrics:
                post["acc"] = f"{metrics['eval_accuracy']:.3f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif step % self.args.log_interval == 0 or "eval_accuracy" in metrics:
            extra = (f" eval_acc {metrics['eval_accuracy']:.4f}"
                     f" eval_loss {metrics['eval_loss']:.4f}"
                     if "eval_accuracy" in metrics else "")
            print(f"[regate-train] step {step} loss {metrics['lm_loss']:.4f} rho "
                  f"{metrics['keep_ratio']:.3f} kept {metrics['kept_target_tokens']:.0f}/"
                  f"{metrics['target_tokens']:.0f} {metrics['tokens_per_s']:.0f} tok/s{extra}",
                  flush=True)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.writer:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
