"""Per-step metrics: `--metrics-jsonl`, TensorBoard and a progress bar, all on rank 0.

On resume the JSONL file is cut back to the resumed iteration first, so a run that
crashed after its last checkpoint does not leave duplicate steps behind.
"""

from __future__ import annotations

import json
import os

import torch.distributed as dist

__all__ = ["MetricsLogger"]


class MetricsLogger:
    def __init__(self, args, start: int = 0):
        self.args = args
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
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
        with open(path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)

    def log(self, metrics: dict) -> None:
        if not self.rank0:
            return
        step = metrics["step"]
        if self.jsonl:
            self.jsonl.write(json.dumps(metrics) + "\n")
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
            extra = (f" eval_acc {metrics['eval_accuracy']:.4f} eval_loss {metrics['eval_loss']:.4f}"
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
