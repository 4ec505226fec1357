"""Megatron-LM-style command-line flags for `regate-train` and `regate-precompute-ref`.

Flag names, meanings and defaults follow Megatron-LM (`megatron/training/arguments.py`)
so an existing MLLM launch script keeps working; the `--regate-*` flags come from
`ReGateConfig` (`add_regate_args`). Unknown flags are errors (plain argparse).

`validate_args` checks everything that can be checked without data or a model,
so a bad launch fails before any process group, model or step exists. The
namespace becomes Megatron-Core configs in `regate_megatron.training.model_config`.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

from regate_megatron.config import ReGateConfig, add_regate_args
from regate_megatron.data.layout import add_layout_args, num_image_tokens
from regate_megatron.training.megatron_lm_flags import (
    add_megatron_lm_flags,
    apply_megatron_lm_flags,
)
from regate_megatron.training.parallel import launch_env
from regate_megatron.training.preemption import add_exit_args

__all__ = [
    "build_parser",
    "parse_args",
    "validate_args",
    "add_model_args",
    "fill_model_defaults",
]


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Language-model, vision-encoder and parallelism flags (Megatron-LM names)."""
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="default: 4 x hidden (8/3 x hidden with --swiglu, as Megatron-LM)")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"],
                   default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine", "auto"],
                   default="auto", help="layer backend: Transformer Engine when installed (auto)")
    g.add_argument("--text-only", action="store_true",
                   help="train a text-only GPT (e.g. the ReGATE teacher): visual positions of the "
                        "data become pad tokens masked from attention (--regate-teacher-visual)")
    add_layout_args(parser)  # --seq-length, --img-h, --img-w, --patch-dim
    v = parser.add_argument_group("vision encoder (CLIP-style ViT) and projector")
    v.add_argument("--vision-num-layers", type=int, default=None, help="default: --num-layers")
    v.add_argument("--vision-hidden-size", type=int, default=None, help="default: --hidden-size")
    v.add_argument("--vision-num-attention-heads", type=int, default=None,
                   help="default: --num-attention-heads")
    v.add_argument("--vision-ffn-hidden-size", type=int, default=None,
                   help="default: 4 x vision hidden")
    v.add_argument("--freeze-ViT", action="store_true", dest="freeze_ViT")
    v.add_argument("--freeze-LM", action="store_true", dest="freeze_LM")
    v.add_argument("--language-model-checkpoint", default=None,
                   help="dist_checkpointing checkpoint of a GPT language model to start from")
    v.add_argument("--vision-model-checkpoint", default=None,
                   help="dist_checkpointing checkpoint of the vision encoder to start from")
    p = parser.add_argument_group("parallelism")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--distrib-optim-sharding-type", default="fully_reshardable",
                   choices=["fully_reshardable", "dp_reshardable"],
                   help="distributed-optimizer checkpoint layout (both reshardable)")
    return parser


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    d = parser.add_argument_group("data")
    d.add_argument("--data-path", default=None, help="LLaVA-format JSON/JSONL training records")
    d.add_argument("--valid-data-path", default=None, help="held-out records for --eval-interval")
    d.add_argument("--image-root", default=None, help="default: the data file's directory")
    d.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=["SentencePieceTokenizer"])
    d.add_argument("--tokenizer-model", default=None)
    d.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP (as Megatron-LM)")
    d.add_argument("--skip-bad-samples", action="store_true",
                   help="skip invalid records (reported) instead of failing")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    t = parser.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, default=1)
    t.add_argument("--global-batch-size", type=int, default=None)
    t.add_argument("--train-iters", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--lr-decay-style",
                   choices=["constant", "linear", "cosine", "inverse-square-root"],
                   default="linear")
    t.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    t.add_argument("--lr-warmup-iters", type=int, default=0)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.999)
    t.add_argument("--adam-eps", type=float, default=1e-8)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="stop at the first step whose loss or gradients hold NaN/inf, on every "
                        "rank, before the optimizer step (as Megatron-LM; on by default)")
    t.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="on --load, take the LR schedule flags from the command line instead "
                        "of refusing ones that differ from the checkpoint (step count kept)")
    t.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="on --load, take the LR schedule from the checkpoint, ignoring the "
                        "command line's LR schedule flags")
    r = parser.add_argument_group("activation recomputation (Megatron-LM's flags)")
    r.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="full: re-run whole layers in the backward pass (routed spans too); "
                   "selective: parts of each layer (--recompute-modules)")
    r.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with full: uniform checkpoints every --recompute-num-layers layers; "
                   "block checkpoints the first --recompute-num-layers of each stage")
    r.add_argument("--recompute-num-layers", type=int, default=None)
    r.add_argument("--recompute-modules", nargs="*", default=None,
                   help="with selective: the submodules to re-run (default: core_attn)")
    r.add_argument("--recompute-activations", action="store_true",
                   help="the same as --recompute-granularity selective")
    r.add_argument("--recompute-vision", action="store_true",
                   help="the vision encoder recomputes as the language model does (all its "
                   "layers); without it the encoder and the projector do not recompute")
    c = parser.add_argument_group("checkpointing, evaluation and logging")
    c.add_argument("--save", default=None)
    c.add_argument("--load", default=None)
    c.add_argument("--save-interval", type=int, default=None)
    c.add_argument("--eval-interval", type=int, default=None)
    c.add_argument("--eval-iters", type=int, default=None,
                   help="held-out micro-batches per evaluation (default: the whole held-out set)")
    c.add_argument("--eval-max-new-tokens", type=int, default=32,
                   help="greedy-decode length limit for answer accuracy")
    c.add_argument("--log-interval", type=int, default=10)
    c.add_argument("--tensorboard-dir", default=None)
    c.add_argument("--metrics-jsonl", default=None,
                   help="one strict-JSON line per step (NaN/inf written as null); with --load the "
                        "file continues after the resumed iteration (later rows are dropped); a "
                        "run without --load refuses an existing non-empty file")
    c.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")


def build_parser(prog: str = "regate-train",
                 description: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    add_model_args(parser)
    _add_data_args(parser)
    _add_training_args(parser)
    add_regate_args(parser)
    add_exit_args(parser)
    add_megatron_lm_flags(parser)  # last: the launch-script flags regate-train lacks
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def _need(args, *names) -> None:
    missing = ["--" + n.replace("_", "-") for n in names if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"regate-train: missing required flag(s): {' '.join(missing)}")


def fill_model_defaults(args: argparse.Namespace) -> None:
    """Derived architecture defaults, as Megatron-LM computes them."""
    if args.ffn_hidden_size is None and args.hidden_size is not None:
        args.ffn_hidden_size = (
            int(8 * args.hidden_size / 3 / 64) * 64 if args.swiglu else 4 * args.hidden_size
        ) or 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    args.vision_num_layers = args.vision_num_layers or args.num_layers
    args.vision_hidden_size = args.vision_hidden_size or args.hidden_size
    args.vision_num_attention_heads = args.vision_num_attention_heads or args.num_attention_heads
    args.vision_ffn_hidden_size = args.vision_ffn_hidden_size or 4 * (args.vision_hidden_size or 0)


def validate_args(args: argparse.Namespace) -> None:
    """Everything checkable before start-up; each error names the flag and the fix."""
    try:
        image_tokens = num_image_tokens(args.img_h, args.img_w, args.patch_dim)
    except ValueError as err:
        raise SystemExit(f"regate-train: {err}") from None
    apply_megatron_lm_flags(args, num_image_tokens=image_tokens)
    _need(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters",
          "lr", "data_path", "tokenizer_model")
    fill_model_defaults(args)
    args.regate = ReGateConfig.from_args(args)
    args.regate.layer_span(args.num_layers)
    _check_training_numbers(args)
    launch = launch_env()  # torchrun's WORLD_SIZE or srun's SLURM_NTASKS
    world = (launch.world_size if launch.launcher != "single"
             else int(os.environ.get("WORLD_SIZE", "1")))
    teachers = args.regate.teacher_ranks  # the last ranks of the launch (online teacher)
    if teachers:
        ttp = args.regate.teacher_tensor_model_parallel_size
        tpp = args.regate.teacher_pipeline_model_parallel_size
        if teachers >= world or teachers % (ttp * tpp):
            raise SystemExit(
                f"regate-train: --regate-teacher-ranks {teachers} must leave student ranks in "
                f"the world of {world} and be a multiple of "
                f"--regate-teacher-tensor-model-parallel-size {ttp} x "
                f"--regate-teacher-pipeline-model-parallel-size {tpp}"
            )
        world -= teachers  # the students' world
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise SystemExit(
            f"regate-train: world size {world} is not divisible by --tensor-model-parallel-size "
            f"{tp} x --pipeline-model-parallel-size {pp}"
        )
    args.data_parallel_size = world // (tp * pp)
    # Not given: micro x DP for a fresh run, the checkpoint's on --load (resume.reconcile).
    args.global_batch_size_given = args.global_batch_size is not None
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % (args.micro_batch_size * args.data_parallel_size):
        raise SystemExit(
            f"regate-train: --global-batch-size {args.global_batch_size} must be a multiple of "
            f"--micro-batch-size {args.micro_batch_size} x data-parallel size "
            f"{args.data_parallel_size}"
        )
    args.num_microbatches = args.global_batch_size // (
        args.micro_batch_size * args.data_parallel_size)
    if args.hidden_size % args.num_attention_heads:
        raise SystemExit("regate-train: --hidden-size must be divisible by --num-attention-heads")
    if args.num_attention_heads % tp or args.num_query_groups % tp:
        raise SystemExit(
            "regate-train: --num-attention-heads and --num-query-groups must be divisible by "
            "--tensor-model-parallel-size"
        )
    if args.num_layers % pp:
        raise SystemExit(
            "regate-train: --num-layers must be divisible by --pipeline-model-parallel-size")
    _check_recompute(args)
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron-LM: SP is meaningless without TP
    if args.sequence_parallel and not args.text_only:
        raise SystemExit(
            "regate-train: --sequence-parallel inside LLaVA needs Transformer Engine attention in "
            "Megatron-Core 0.16.1; drop --sequence-parallel or use --text-only"
        )
    if (args.regate.enabled and args.regate.ref_store is None and not args.regate.teacher_ranks
            and args.regate.selector != "random"):
        raise SystemExit(
            "regate-train: --regate needs --regate-ref-store (build it with "
            "regate-precompute-ref) or an online teacher (--regate-teacher-ranks); only "
            "--regate-selector random runs without either"
        )
    if args.regate.teacher_ranks and not args.regate.enabled:
        raise SystemExit("regate-train: --regate-teacher-ranks needs --regate")
    for flag in ("save_interval", "eval_interval", "log_interval"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"regate-train: --{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.save_interval and not args.save:
        raise SystemExit("regate-train: --save-interval needs --save DIR")
    if args.eval_interval and not args.valid_data_path:
        raise SystemExit("regate-train: --eval-interval needs --valid-data-path (held-out records)")
    for path_flag in ("data_path", "tokenizer_model", "valid_data_path"):
        path = getattr(args, path_flag)
        if path is not None and not os.path.exists(path):
            raise SystemExit(f"regate-train: --{path_flag.replace('_', '-')} {path} does not exist")
    # --load = --save (Megatron-LM's resume-in-place): the first run finds nothing to load.
    if args.load is not None and args.load != args.save and not os.path.isdir(args.load):
        raise SystemExit(f"regate-train: --load {args.load} is not a directory")


def _check_recompute(args: argparse.Namespace) -> None:
    """The recomputation flags, as Megatron-LM and Megatron-Core check them, by flag name."""
    if args.recompute_activations:
        args.recompute_granularity = "selective"  # Megatron-LM's alias
    granularity, method, k = (args.recompute_granularity, args.recompute_method,
                              args.recompute_num_layers)
    if granularity is None:
        for flag in ("recompute_method", "recompute_num_layers", "recompute_modules"):
            if getattr(args, flag) is not None:
                raise SystemExit(f"regate-train: --{flag.replace('_', '-')} needs "
                                 f"--recompute-granularity")
        if args.recompute_vision:
            raise SystemExit("regate-train: --recompute-vision needs --recompute-granularity")
        return
    if granularity == "selective":
        if method is not None or k is not None:
            raise SystemExit("regate-train: --recompute-granularity selective takes no "
                             "--recompute-method / --recompute-num-layers (it re-runs "
                             "--recompute-modules inside every layer)")
        return
    if args.recompute_modules is not None:
        raise SystemExit("regate-train: --recompute-modules is for --recompute-granularity "
                         "selective")
    per_stage = args.num_layers // args.pipeline_model_parallel_size
    if method is None or k is None or k < 1:
        raise SystemExit("regate-train: --recompute-granularity full needs --recompute-method "
                         "uniform|block and --recompute-num-layers >= 1")
    if method == "uniform" and per_stage % k:
        raise SystemExit(f"regate-train: --recompute-method uniform checkpoints every "
                         f"--recompute-num-layers ({k}) layers, which must divide the "
                         f"{per_stage} layers of each pipeline stage; choose a divisor or "
                         f"--recompute-method block")
    if k > per_stage:
        raise SystemExit(f"regate-train: --recompute-num-layers {k} is more than the {per_stage} "
                         f"layers of a pipeline stage")


def _check_training_numbers(args: argparse.Namespace) -> None:
    """Counts and the LR schedule: the errors Megatron would raise as bare asserts."""
    for flag, minimum in (("micro_batch_size", 1), ("global_batch_size", 1), ("train_iters", 1),
                          ("lr_decay_iters", 1), ("lr_warmup_iters", 0)):
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise SystemExit(f"regate-train: --{flag.replace('_', '-')} must be >= {minimum}, "
                             f"got {value}")
    if not (args.lr >= 0 and 0 <= args.min_lr <= args.lr):
        raise SystemExit(f"regate-train: need 0 <= --min-lr ({args.min_lr}) <= --lr ({args.lr})")
    horizon = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= horizon:
        raise SystemExit(
            f"regate-train: --lr-warmup-iters {args.lr_warmup_iters} must be < the LR decay "
            f"horizon {horizon} (--lr-decay-iters, default --train-iters)"
        )
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise SystemExit("regate-train: pass at most one of --override-opt_param-scheduler and "
                         "--use-checkpoint-opt_param-scheduler")
