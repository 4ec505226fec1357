"""Megatron-LM's multimodal launch-script flags in `regate-train`: one table, one status each.

Megatron-LM's `examples/multimodal` training scripts (tag ``core_v0.16.1``, the
Megatron-Core this package pins; the flag set is stored in
``docs/megatron_lm_multimodal_flags.txt``) pass flags that `regate-train` may not define.
Tags core_v0.17.0 to core_v0.19.0 add one flag to those scripts
(``--no-use-tokenizer-model-from-checkpoint-args``), which the table covers too.
Every one of them is in `FLAGS` with a status:

    honoured   it means what it means in Megatron-LM: a `regate-train` flag of the same
               name, or mapped here onto one (`apply_megatron_lm_flags`)
    no-op      accepted and ignored, because it cannot change what is trained (logging,
               data-loader workers, a kernel choice made automatically); a note is printed
    refused    a clear error naming the flag and why (a feature or a semantics
               `regate-train` does not implement), never silently ignored

Some flags are honoured for certain values only (``--ckpt-format torch_dist``,
``--vision-model-type clip``); other values are refused with the reason.
`docs/megatron_lm_flags.md` is generated from this table (`markdown_table`) and a test
keeps the two equal.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["Flag", "FLAGS", "PINNED_TAG", "add_megatron_lm_flags", "apply_megatron_lm_flags",
           "markdown_table"]

PINNED_TAG = "core_v0.16.1"

HONOURED, NOOP, REFUSED = "honoured", "no-op", "refused"


@dataclass(frozen=True)
class Flag:
    status: str
    reason: str
    # "native": a regate-train flag already defines it; "switch": no value; "value": one
    # value; "values": one or more values.
    kind: str = "native"
    honoured_values: Tuple[str, ...] = ()  # for value flags honoured only for these values


_N, _S, _V = "native", "switch", "value"

FLAGS: Dict[str, Flag] = {
    # ---- model architecture
    "--num-layers": Flag(HONOURED, "language-model layers"),
    "--hidden-size": Flag(HONOURED, "language-model hidden size"),
    "--ffn-hidden-size": Flag(HONOURED, "language-model MLP size"),
    "--num-attention-heads": Flag(HONOURED, "attention heads"),
    "--group-query-attention": Flag(HONOURED, "grouped-query attention"),
    "--num-query-groups": Flag(HONOURED, "key/value groups with --group-query-attention"),
    "--seq-length": Flag(HONOURED, "the language model's sequence length; with "
                         "--decoder-seq-length (Megatron-LM's multimodal meaning) the vision "
                         "encoder's, which must equal the image tokens (img/patch)^2"),
    "--decoder-seq-length": Flag(HONOURED, "the language model's (combined text + image) sequence "
                                 "length: becomes regate-train's --seq-length", _V),
    "--max-position-embeddings": Flag(HONOURED, "position table size"),
    "--position-embedding-type": Flag(HONOURED, "rope or learned_absolute"),
    "--rotary-base": Flag(HONOURED, "RoPE base"),
    "--rotary-percent": Flag(HONOURED, "RoPE on the whole head (1.0) only; partial rotary is not "
                             "implemented in the routed layers", _V, ("1.0", "1")),
    "--normalization": Flag(HONOURED, "LayerNorm or RMSNorm"),
    "--norm-epsilon": Flag(HONOURED, "norm epsilon"),
    "--swiglu": Flag(HONOURED, "SwiGLU MLP"),
    "--disable-bias-linear": Flag(HONOURED, "no linear biases: regate-train's --swiglu layers have "
                                  "none; refused without --swiglu (biased layers)", _S),
    "--untie-embeddings-and-output-weights": Flag(HONOURED, "separate output layer"),
    "--init-method-std": Flag(HONOURED, "weight initialisation std"),
    "--attention-dropout": Flag(HONOURED, "attention dropout"),
    "--hidden-dropout": Flag(HONOURED, "hidden dropout"),
    "--bf16": Flag(HONOURED, "bf16 parameters (Float16Module), fp32 gradient reduction"),
    "--transformer-impl": Flag(HONOURED, "layer backend (local / transformer_engine)"),
    "--use-te": Flag(HONOURED, "same as --transformer-impl transformer_engine", _S),
    "--no-masked-softmax-fusion": Flag(HONOURED, "regate-train never uses the masked-softmax "
                                       "fusion (attention is TE or torch SDPA)", _S),
    "--attention-softmax-in-fp32": Flag(NOOP, "only affects Megatron's unfused local softmax; TE "
                                        "and torch SDPA attention accumulate the softmax in fp32",
                                        _S),
    "--use-flash-attn": Flag(NOOP, "the attention kernel follows --transformer-impl: TE fused "
                             "attention, or torch SDPA (flash kernels on GPU)", _S),
    "--apply-layernorm-1p": Flag(REFUSED, "zero-centred norm weights (1 + gamma) are not "
                                 "implemented; the norm weights would mean something else", _S),
    "--add-qkv-bias": Flag(REFUSED, "QKV biases without other linear biases are not "
                           "implemented", _S),
    "--language-model-type": Flag(REFUSED, "a preset of Megatron-LM's examples/multimodal that "
                                  "overrides architecture flags; regate-train builds the language "
                                  "model from explicit flags (see examples/llava15_7b.sh)", _V),
    "--use-rope-scaling": Flag(REFUSED, "Llama-3.1 RoPE scaling is not implemented", _S),
    "--vocab-size": Flag(REFUSED, "the vocabulary comes from --tokenizer-model (padded by "
                         "--make-vocab-size-divisible-by)", _V),
    "--make-vocab-size-divisible-by": Flag(HONOURED, "vocabulary padding multiple (x TP)"),
    # ---- vision encoder
    "--vision-model-type": Flag(HONOURED, "CLIP ViT only; SigLIP / InternViT encoders are not "
                                "built by regate-train", _V, ("clip",)),
    "--img-h": Flag(HONOURED, "image height"),
    "--img-w": Flag(HONOURED, "image width"),
    "--patch-dim": Flag(HONOURED, "ViT patch size"),
    "--disable-vision-class-token": Flag(HONOURED, "drop the class token from the image tokens "
                                         "(Megatron-LM's drop_vision_class_token); regate-train "
                                         "always drops it", _S),
    "--freeze-LM": Flag(HONOURED, "freeze the language model"),
    "--freeze-ViT": Flag(HONOURED, "freeze the vision encoder"),
    "--pixel-shuffle": Flag(REFUSED, "InternViT pixel shuffle is not implemented", _S),
    "--use-tiling": Flag(REFUSED, "image tiling is not implemented (one tile per image)", _S),
    "--max-num-tiles": Flag(REFUSED, "image tiling is not implemented (one tile per image)", _V),
    "--use-thumbnail": Flag(REFUSED, "image tiling is not implemented (one tile per image)", _S),
    "--use-tile-tags": Flag(REFUSED, "image tiling is not implemented (one tile per image)", _S),
    "--use-area-weighted-aspect-ratio": Flag(REFUSED, "image tiling is not implemented", _S),
    "--num-frames": Flag(REFUSED, "video files are not decoded: give a video as its frames, one "
                         "<image> per frame in the record (examples/video_7b.sh)", _V),
    # ---- parallelism, memory
    "--tensor-model-parallel-size": Flag(HONOURED, "TP"),
    "--pipeline-model-parallel-size": Flag(HONOURED, "PP"),
    "--use-distributed-optimizer": Flag(HONOURED, "distributed optimizer (reshardable "
                                        "checkpoints)"),
    "--distributed-timeout-minutes": Flag(HONOURED, "collective timeout of the process group", _V),
    "--recompute-granularity": Flag(HONOURED, "activation recomputation, full (routed spans "
                                    "re-run with their selection) or selective"),
    "--recompute-method": Flag(HONOURED, "uniform or block chunks of full recomputation"),
    "--recompute-num-layers": Flag(HONOURED, "layers per chunk (uniform) or recomputed layers "
                                   "per stage (block)"),
    "--recompute-vision": Flag(HONOURED, "the vision encoder recomputes too (all its layers)"),
    # ---- training
    "--micro-batch-size": Flag(HONOURED, "micro-batch size"),
    "--global-batch-size": Flag(HONOURED, "global batch size"),
    "--train-iters": Flag(HONOURED, "optimizer steps"),
    "--train-samples": Flag(HONOURED, "becomes --train-iters = samples / global batch (must "
                            "divide)", _V),
    "--lr": Flag(HONOURED, "peak learning rate"),
    "--min-lr": Flag(HONOURED, "final learning rate"),
    "--lr-decay-style": Flag(HONOURED, "constant, linear, cosine, inverse-square-root"),
    "--lr-decay-iters": Flag(HONOURED, "decay length in steps"),
    "--lr-decay-samples": Flag(HONOURED, "becomes --lr-decay-iters = samples / global batch", _V),
    "--lr-warmup-fraction": Flag(HONOURED, "warmup steps = fraction x decay steps (as "
                                 "Megatron-LM), rounded down to whole steps", _V),
    "--lr-warmup-samples": Flag(HONOURED, "becomes --lr-warmup-iters = samples / global batch", _V),
    "--clip-grad": Flag(HONOURED, "gradient-norm clipping"),
    "--weight-decay": Flag(HONOURED, "weight decay"),
    "--adam-beta1": Flag(HONOURED, "Adam beta1"),
    "--adam-beta2": Flag(HONOURED, "Adam beta2"),
    "--use-loss-scaling": Flag(REFUSED, "per-sample loss rescaling changes the loss normalisation "
                               "(regate-train normalises per computed target token)", _S),
    "--eod-mask-loss": Flag(NOOP, "the loss mask comes from the conversation (assistant turns); "
                            "Megatron-LM's examples/multimodal/train.py ignores it too", _S),
    "--exit-duration-in-mins": Flag(HONOURED, "save a checkpoint and exit 0 after this many "
                                    "minutes (regate_megatron.training.preemption)"),
    "--exit-signal-handler": Flag(HONOURED, "on SIGTERM (--exit-signal) or SIGUSR1: finish the "
                                  "step, save, exit 0 (regate_megatron.training.preemption)"),
    "--exit-interval": Flag(HONOURED, "save and exit 0 after iterations divisible by this"),
    # ---- data and tokenizer
    "--data-path": Flag(HONOURED, "training data: LLaVA-format JSON/JSONL records (not an "
                        "Energon dataset YAML)"),
    "--tokenizer-type": Flag(HONOURED, "SentencePieceTokenizer only (MultimodalTokenizer and HF "
                             "tokenizers are refused by the flag's choices)", _N,
                             ("SentencePieceTokenizer",)),
    "--tokenizer-model": Flag(HONOURED, "SentencePiece model file"),
    "--tokenizer-prompt-format": Flag(REFUSED, "the prompt format is LLaVA's USER:/ASSISTANT: "
                                      "turns, built into the data pipeline", _V),
    "--special-tokens": Flag(REFUSED, "special tokens come from the SentencePiece model", "values"),
    "--force-system-message": Flag(REFUSED, "system messages are not part of the built-in prompt "
                                   "format", _S),
    "--image-tag-type": Flag(REFUSED, "image tags are not implemented (images are <image> "
                             "placeholders)", _V),
    "--prompt-path": Flag(REFUSED, "prompts come from the records' conversations", _V),
    "--dataloader-type": Flag(NOOP, "regate-train has its own deterministic, resumable sampler",
                              _V),
    "--dataloader-seq-length": Flag(HONOURED, "must equal the language model's sequence length "
                                    "(records are padded / truncated to it)", _V),
    "--packing-seq-length": Flag(REFUSED, "sequence packing is not supported with token routing",
                                 _V),
    "--split": Flag(HONOURED, "100,0,0 only (all records train; held-out data comes from "
                    "--valid-data-path)", _V, ("100,0,0",)),
    "--num-workers": Flag(NOOP, "records are read in the training process (no DataLoader "
                          "workers); only speed could differ", _V),
    # ---- checkpoints, logging
    "--save": Flag(HONOURED, "checkpoint directory"),
    "--load": Flag(HONOURED, "resume directory; = --save resumes in place and starts from scratch "
                   "while it holds no checkpoint"),
    "--save-interval": Flag(HONOURED, "steps between checkpoints"),
    "--ckpt-format": Flag(HONOURED, "torch_dist only (regate-train writes dist_checkpointing "
                          "torch_dist checkpoints)", _V, ("torch_dist",)),
    "--pretrained-checkpoint": Flag(HONOURED, "initial weights of the language model and vision "
                                    "encoder (= --language-model-checkpoint and "
                                    "--vision-model-checkpoint); a checkpoint in --load wins", _V),
    "--allow-missing-vision-projection-checkpoint": Flag(HONOURED, "the projector always starts "
                                                         "from initialisation", _S),
    "--no-use-tokenizer-model-from-checkpoint-args": Flag(NOOP, "the tokenizer is always "
                                                          "--tokenizer-model (added to "
                                                          "pretrain_mistral_clip.sh in "
                                                          "core_v0.17.0)", _S),
    "--use-checkpoint-args": Flag(REFUSED, "regate-train builds the model from its flags; pass the "
                                  "architecture explicitly", _S),
    "--dataloader-save": Flag(NOOP, "the data position is part of every checkpoint (iteration x "
                              "global batch)", _V),
    "--log-interval": Flag(HONOURED, "steps between log lines"),
    "--tensorboard-dir": Flag(HONOURED, "TensorBoard event directory"),
    "--eval-interval": Flag(HONOURED, "steps between evaluations (needs --valid-data-path)"),
    "--eval-iters": Flag(HONOURED, "held-out micro-batches per evaluation"),
    "--log-params-norm": Flag(NOOP, "logging only: the parameter norm is not logged", _S),
    "--log-num-zeros-in-grad": Flag(NOOP, "logging only: zero-gradient counts are not logged", _S),
    "--inference-max-seq-length": Flag(NOOP, "inference only; Megatron-LM's training ignores it "
                                       "too", _V),
}


class _Record(argparse.Action):
    """Stores the value (or True) and remembers that the flag was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True if self.nargs == 0 else values)
        given = dict(getattr(namespace, "megatron_lm_given", None) or {})
        given[option_string] = values
        namespace.megatron_lm_given = given


class _Refuse(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} (a Megatron-LM flag) is not supported: "
                     f"{FLAGS[option_string].reason}")


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def add_megatron_lm_flags(parser: argparse.ArgumentParser) -> None:
    """Define the table's flags that `regate-train` does not define itself."""
    known = {o for a in parser._actions for o in a.option_strings}
    g = parser.add_argument_group("Megatron-LM launch-script flags (docs/megatron_lm_flags.md)")
    for flag, spec in FLAGS.items():
        if spec.kind == _N or flag in known:
            continue
        nargs = {_S: 0, _V: None, "values": "+"}[spec.kind]
        action = _Refuse if spec.status == REFUSED else _Record
        g.add_argument(flag, dest=_dest(flag), nargs=nargs, action=action, default=None,
                       help=f"[Megatron-LM, {spec.status}] {spec.reason}")


def _fail(flag: str, why: str):
    raise SystemExit(f"regate-train: {flag}: {why}")


def _iters(args, flag: str, samples: str) -> int:
    gbs = args.global_batch_size
    if gbs is None:
        _fail(flag, "needs --global-batch-size to convert samples to steps")
    n = int(samples)
    if n % gbs:
        _fail(flag, f"{n} samples is not a whole number of steps of --global-batch-size {gbs}")
    return n // gbs


def apply_megatron_lm_flags(args: argparse.Namespace, num_image_tokens: Optional[int] = None,
                            rank0: Optional[bool] = None) -> None:
    """Map the honoured flags onto regate-train's own, check value-dependent ones, and print
    one note per no-op flag (rank 0). Called first thing by `validate_args`."""
    given = getattr(args, "megatron_lm_given", None) or {}
    for flag, value in given.items():
        spec = FLAGS[flag]
        if spec.honoured_values and str(value) not in spec.honoured_values:
            try:
                ok = float(value) == float(spec.honoured_values[0])
            except ValueError:
                ok = False
            if not ok:
                _fail(flag, f"{value!r} is not supported: {spec.reason}")
    if "--distributed-timeout-minutes" in given:
        try:
            args.distributed_timeout_minutes = float(given["--distributed-timeout-minutes"])
        except ValueError:
            _fail("--distributed-timeout-minutes", "expects a number of minutes")
    if "--use-te" in given:
        args.transformer_impl = "transformer_engine"
    if "--disable-bias-linear" in given and not args.swiglu:
        _fail("--disable-bias-linear", "without --swiglu regate-train's layers have linear "
              "biases; add --swiglu or drop the flag")
    if "--decoder-seq-length" in given:
        encoder = args.seq_length
        args.seq_length = int(given["--decoder-seq-length"])
        if encoder is not None and num_image_tokens is not None and encoder != num_image_tokens:
            _fail("--seq-length", f"with --decoder-seq-length it is the vision encoder's sequence "
                  f"length, which must be the image tokens (img-h/patch-dim x img-w/patch-dim = "
                  f"{num_image_tokens}), got {encoder}")
    loader_length = given.get("--dataloader-seq-length")
    if loader_length is not None and int(loader_length) != args.seq_length:
        _fail("--dataloader-seq-length", f"must equal the language model's sequence length "
              f"{args.seq_length} (records are padded / truncated to it)")
    if "--train-samples" in given:
        args.train_iters = _iters(args, "--train-samples", given["--train-samples"])
    if "--lr-decay-samples" in given:
        args.lr_decay_iters = _iters(args, "--lr-decay-samples", given["--lr-decay-samples"])
    if "--lr-warmup-samples" in given:
        args.lr_warmup_iters = _iters(args, "--lr-warmup-samples", given["--lr-warmup-samples"])
    if "--lr-warmup-fraction" in given:
        if args.lr_warmup_iters:
            _fail("--lr-warmup-fraction", "give it or --lr-warmup-iters/--lr-warmup-samples, "
                  "not both")
        decay = args.lr_decay_iters or args.train_iters
        if decay is not None:
            args.lr_warmup_iters = int(float(given["--lr-warmup-fraction"]) * decay)
    if "--pretrained-checkpoint" in given:
        path = given["--pretrained-checkpoint"]
        args.language_model_checkpoint = args.language_model_checkpoint or path
        args.vision_model_checkpoint = args.vision_model_checkpoint or path
    if rank0 is None:
        rank0 = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
    if rank0:
        for flag in given:
            if FLAGS[flag].status == NOOP:
                print(f"regate-train: note: {flag} accepted, no effect: {FLAGS[flag].reason}",
                      file=sys.stderr)


def markdown_table() -> str:
    """The docs table (docs/megatron_lm_flags.md), generated from `FLAGS`."""
    counts = {s: sum(f.status == s for f in FLAGS.values()) for s in (HONOURED, NOOP, REFUSED)}
    lines = [
        "# Megatron-LM launch-script flags in `regate-train`",
        "",
        f"Generated from `regate_megatron/training/megatron_lm_flags.py` (`markdown_table()`); "
        f"`tests/test_megatron_lm_flags.py` keeps it equal. The flags are those of Megatron-LM's "
        f"`examples/multimodal` training scripts at tag `{PINNED_TAG}` "
        f"(`docs/megatron_lm_multimodal_flags.txt`), the one flag tags core_v0.17.0 to "
        f"core_v0.19.0 add to them, and Megatron-LM's exit flags.",
        "",
        f"{len(FLAGS)} flags: {counts[HONOURED]} honoured, {counts[NOOP]} accepted as no-ops "
        f"(a note is printed), {counts[REFUSED]} refused (an error naming the flag and the "
        f"reason).",
        "",
        "| flag | status | what regate-train does |",
        "|---|---|---|",
    ]
    for flag in sorted(FLAGS, key=str.lower):
        spec = FLAGS[flag]
        status = spec.status
        if spec.honoured_values:
            status += f" ({' / '.join(spec.honoured_values[:1])} only)"
        lines.append(f"| `{flag}` | {status} | {spec.reason} |")
    return "\n".join(lines) + "\n"
