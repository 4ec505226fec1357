"""What a resumed run may change, and what it must keep (the resume rule, README "Resuming").

Every checkpoint stores the flags that shape training (`run_state`) next to the
architecture (`model_config.model_args_dict`). On `--load`, before any tensor is read,
`reconcile` compares them with the command line:

- architecture, `--seed`, `--global-batch-size`, the Adam hyper-parameters, `--bf16`,
  `--freeze-ViT` / `--freeze-LM` and the ReGATE configuration must be equal; a
  `--global-batch-size` not given is taken from the checkpoint (the global batch is a
  property of the run, not of the data-parallel size);
- the LR schedule (`--lr`, `--min-lr`, `--lr-warmup-iters`, `--lr-decay-style`, the decay
  horizon, `--weight-decay`) must be equal unless `--override-opt_param-scheduler` (the
  command line wins, the step count is kept) or `--use-checkpoint-opt_param-scheduler`
  (the checkpoint wins) is passed, as in Megatron-LM. The decay horizon is
  `--lr-decay-iters`, or `--train-iters` when that is not given: a run trained and resumed
  without `--lr-decay-iters` follows `--train-iters`, so a longer one extends the decay to
  the new end (logged);
- `--train-iters` may change but must exceed the checkpoint's iteration.

Other flags (micro-batch size, TP / PP / DP sizes, `--clip-grad`, logging, evaluation) may
change freely. A refusal is one error naming every differing flag, its value and the
checkpoint's, and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, List

from regate_megatron.training.model_config import MODEL_ARG_NAMES

__all__ = ["run_state", "reconcile", "decay_horizon", "SCHEDULE_ARG_NAMES", "FIXED_ARG_NAMES"]

# The LR schedule: equal, or --override-opt_param-scheduler / --use-checkpoint-...
SCHEDULE_ARG_NAMES = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "weight_decay")
# Fixed for the life of a run (besides the architecture and the ReGATE configuration).
FIXED_ARG_NAMES = ("seed", "global_batch_size", "adam_beta1", "adam_beta2", "adam_eps", "bf16",
                   "freeze_ViT", "freeze_LM")
# ReGATE fields that do not shape training: where the reference losses come from (a store, or
# an online teacher of the same checkpoint, at any size) may change.
_REGATE_FREE = ("ref_store", "teacher_ranks", "teacher_load", "teacher_tensor_model_parallel_size",
                "teacher_pipeline_model_parallel_size", "teacher_micro_batch_size",
                "teacher_timeout")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def decay_horizon(args: argparse.Namespace) -> int:
    """Iterations of the LR decay: --lr-decay-iters, else --train-iters (Megatron-LM's rule)."""
    return args.lr_decay_iters or args.train_iters


def _regate_state(args: argparse.Namespace) -> Dict[str, Any]:
    state = dataclasses.asdict(args.regate)
    for name in _REGATE_FREE:
        state.pop(name, None)
    if state.get("layers") is not None:
        state["layers"] = list(state["layers"])
    return state


def run_state(args: argparse.Namespace) -> Dict[str, Any]:
    """The training-shaping flags of a run, stored in every checkpoint's common state."""
    state = {name: getattr(args, name) for name in SCHEDULE_ARG_NAMES + FIXED_ARG_NAMES}
    state.update(train_iters=args.train_iters, lr_decay_iters=args.lr_decay_iters,
                 decay_horizon=decay_horizon(args), regate=_regate_state(args))
    return state


def reconcile(args: argparse.Namespace, common: Dict[str, Any], path: str) -> List[str]:
    """Check the command line against checkpoint `path`'s common state; adjust `args` where
    the rule says the checkpoint decides. Returns lines to log; raises ValueError naming every
    mismatch (flag, command-line value, checkpoint value) and the fix."""
    notes: List[str] = []
    saved_model = common.get("args", {})
    saved = common.get("run_state")
    iteration = int(common.get("iteration", 0))
    wrong: List[str] = []
    refused_schedule = False

    for name in MODEL_ARG_NAMES:
        if name in saved_model and getattr(args, name, None) != saved_model[name]:
            if name == "vocab_size":
                wrong.append(f"padded vocabulary {args.vocab_size} (checkpoint {saved_model[name]}"
                             f"; --tokenizer-model / --make-vocab-size-divisible-by / TP size)")
            else:
                wrong.append(f"{_flag(name)} {getattr(args, name, None)} "
                             f"(checkpoint {saved_model[name]})")
    if saved is None:  # written before run states were stored: only the architecture is known
        if wrong:
            raise ValueError(_refusal(path, wrong, schedule=False))
        return notes

    if not args.global_batch_size_given:
        # The global batch belongs to the run: resuming at another DP size keeps it.
        _set_global_batch_size(args, int(saved["global_batch_size"]))
        notes.append(f"global batch size {args.global_batch_size} from the checkpoint "
                     f"({args.num_microbatches} micro-batches of {args.micro_batch_size} x "
                     f"DP {args.data_parallel_size})")
    for name in FIXED_ARG_NAMES:
        if name in saved and getattr(args, name) != saved[name]:
            wrong.append(f"{_flag(name)} {getattr(args, name)} (checkpoint {saved[name]})")
    from regate_megatron.config import ReGateConfig, flag_for

    # A field the checkpoint does not know (added later) had its default there.
    theirs = {f.name: f.default for f in dataclasses.fields(ReGateConfig)}
    theirs.update(saved["regate"])
    mine = _regate_state(args)
    for key in sorted(mine):
        if mine[key] != theirs.get(key):
            wrong.append(f"{flag_for(key)} {mine[key]} (checkpoint {theirs.get(key)})")

    schedule = [(n, getattr(args, n), saved[n]) for n in SCHEDULE_ARG_NAMES
                if getattr(args, n) != saved[n]]
    horizon, saved_horizon = decay_horizon(args), int(saved["decay_horizon"])
    follows_train_iters = args.lr_decay_iters is None and saved["lr_decay_iters"] is None
    if horizon != saved_horizon and not follows_train_iters:
        schedule.append(("lr_decay_iters", horizon, saved_horizon))
    if args.use_checkpoint_opt_param_scheduler:
        for name in SCHEDULE_ARG_NAMES:
            setattr(args, name, saved[name])
        args.lr_decay_iters = saved_horizon
        if schedule:
            notes.append("LR schedule from the checkpoint (--use-checkpoint-opt_param-scheduler): "
                         + ", ".join(f"{_flag(n)} {s}" for n, _, s in schedule))
    elif args.override_opt_param_scheduler:
        if schedule:
            notes.append("LR schedule from the command line (--override-opt_param-scheduler): "
                         + ", ".join(f"{_flag(n)} {c} (was {s})" for n, c, s in schedule))
    else:
        wrong += [f"{_flag(n)} {c} (checkpoint {s})" for n, c, s in schedule]
        refused_schedule = bool(schedule)
    from_checkpoint = args.use_checkpoint_opt_param_scheduler
    if follows_train_iters and horizon != saved_horizon and not from_checkpoint:
        notes.append(f"LR decay horizon follows --train-iters: {saved_horizon} -> {horizon} "
                     f"iterations (pass --lr-decay-iters {saved_horizon} to keep the old one)")

    if wrong:
        raise ValueError(_refusal(path, wrong, schedule=refused_schedule))
    if args.train_iters <= iteration:
        raise ValueError(
            f"--train-iters {args.train_iters}: checkpoint {path} is already at iteration "
            f"{iteration}; pass --train-iters > {iteration} to train on"
        )
    consumed = common.get("consumed_samples")
    if consumed is not None and consumed != iteration * args.global_batch_size:
        raise ValueError(
            f"checkpoint {path}: consumed_samples {consumed} is not iteration {iteration} x "
            f"global batch {args.global_batch_size}; the checkpoint is inconsistent"
        )
    return notes


def _refusal(path: str, wrong: List[str], schedule: bool) -> str:
    hint = (" (for LR-schedule flags: --override-opt_param-scheduler takes the command line's, "
            "--use-checkpoint-opt_param-scheduler the checkpoint's)" if schedule else "")
    return (
        f"--load {path}: the command line differs from what the checkpoint was trained with: "
        f"{'; '.join(wrong)}; resume with the checkpoint's values{hint}, or start a new run "
        f"without --load"
    )


def _set_global_batch_size(args: argparse.Namespace, global_batch_size: int) -> None:
    per_step = args.micro_batch_size * args.data_parallel_size
    if global_batch_size % per_step:
        raise ValueError(
            f"the checkpoint's global batch size {global_batch_size} is not a multiple of "
            f"--micro-batch-size {args.micro_batch_size} x data-parallel size "
            f"{args.data_parallel_size}; pick a --micro-batch-size that divides "
            f"{global_batch_size // args.data_parallel_size or global_batch_size}"
        )
    args.global_batch_size = global_batch_size
    args.num_microbatches = global_batch_size // per_step
