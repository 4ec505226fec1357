"""ReGATE's flags in a Megatron-LM script, and the Megatron-LM settings it refuses.

`extra_args_provider(script_provider)` composes with the script's own provider (pass it
to ``pretrain(extra_args_provider=...)`` or rebind the script's name to it);
`check_args(args)` refuses, naming the flag, what routing cannot do.
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

from regate_megatron.config import ReGateConfig, add_regate_args
from regate_megatron.core.recompute import check_recompute

__all__ = ["extra_args_provider", "add_script_args", "check_args", "regate_config_of"]


def extra_args_provider(script_provider: Optional[Callable] = None) -> Callable:
    """A provider that runs ``script_provider`` (if any), then adds every ``--regate-*``."""
    if getattr(script_provider, "_regate_flags", False):
        return script_provider  # idempotent

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if script_provider is not None:
            parser = script_provider(parser) or parser
        return add_script_args(add_regate_args(parser))

    provider._regate_flags = True
    return provider


def add_script_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags only a Megatron-LM script has: the reference store built in the script
    (`regate_megatron.megatron_lm.reference`)."""
    group = parser.add_argument_group(title="ReGATE in a Megatron-LM script")
    group.add_argument(
        "--regate-build-ref-store", action="store_true",
        help="When --regate-ref-store holds no store yet, build it before the first step with "
             "the script's language model as loaded (the frozen text-only teacher, reading "
             "the --regate-teacher-visual view; any TP, PP and DP), then train. A build stopped "
             "before the end (preemption; the --exit-signal-handler signal) resumes from the "
             "chunks it wrote beside the store.")
    group.add_argument(
        "--regate-build-ref-store-exit", action="store_true",
        help="Exit (status 0) once --regate-ref-store holds a store, built now or before, "
             "instead of training (e.g. build with another layout than training's).")
    return parser


def regate_config_of(args: argparse.Namespace) -> ReGateConfig:
    """The `ReGateConfig` of Megatron-LM's parsed args (validated by the dataclass)."""
    return ReGateConfig.from_args(args)


def check_args(args: argparse.Namespace) -> ReGateConfig:
    """Refuse Megatron-LM settings ReGATE routing does not support (only with ``--regate``)."""
    config = regate_config_of(args)
    if not config.enabled:
        return config
    refused = [
        (getattr(args, "context_parallel_size", 1) > 1, "--context-parallel-size > 1",
         "context parallelism shards the combined sequence; selections are per full sequence"),
        (getattr(args, "use_packed_sequence", False), "--use-packed-sequence",
         "packed sequences (THD) cannot be routed"),
        ((getattr(args, "packing_buffer_size", None) or 0) > 0, "--packing-buffer-size",
         "examples/multimodal packs samples into THD rows, which cannot be routed"),
        (getattr(args, "sequence_parallel", False), "--sequence-parallel",
         "the multimodal scripts pack sequences under sequence parallelism (packed_seq_params)"),
        (getattr(args, "apply_rope_fusion", False), "--apply-rope-fusion (the default; pass "
         "--no-rope-fusion)", "routed layers need per-token rotary tables"),
        (getattr(args, "virtual_pipeline_model_parallel_size", None) not in (None, 1),
         "--num-layers-per-virtual-pipeline-stage", "the interleaved schedule is not wrapped"),
        (getattr(args, "mtp_num_layers", None), "--mtp-num-layers", "multi-token prediction"),
        (getattr(args, "teacher_ranks", 0) or config.teacher_ranks, "--regate-teacher-ranks",
         "the online teacher runs with regate-train only; use --regate-ref-store"),
    ]
    for bad, flag, why in refused:
        if bad:
            raise ValueError(f"--regate cannot be combined with {flag}: {why}")
    check_recompute(args)  # the fields Megatron-LM's args share with TransformerConfig
    build = getattr(args, "regate_build_ref_store", False)
    if getattr(args, "regate_build_ref_store_exit", False) and not build:
        raise ValueError("--regate-build-ref-store-exit needs --regate-build-ref-store")
    if build and config.ref_store is None:
        raise ValueError("--regate-build-ref-store needs --regate-ref-store PATH (where the "
                         "store is built)")
    if config.ref_store is None and config.selector != "random":
        raise ValueError(f"--regate-selector {config.selector} needs --regate-ref-store (build "
                         f"it with --regate-build-ref-store, or regate-precompute-ref); only "
                         f"--regate-selector random runs without one")
    return config
