"""ReGATE configuration: one dataclass, one flag per field.

`ReGateConfig` is the single source of truth. `add_regate_args` derives the
``--regate-*`` flags from its fields (help text from the field docstrings), so
the CLI and the dataclass cannot drift apart; it has the signature of
Megatron-LM's ``extra_args_provider``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["CHOICES", "TEACHER_VISUAL_MODES", "ReGateConfig", "add_regate_args", "flag_for",
           "parse_layer_span"]

TEACHER_VISUAL_MODES = ("pad", "drop")
"""How the text-only teacher sees image slots (`--regate-teacher-visual`, the store's
``teacher_visual``): replaced by its pad token, or removed."""

CHOICES = {
    "selector": ("regate", "random", "excess"),
    "score_norm": ("rank", "zscore", "none"),
    "select_scope": ("sample", "batch"),
    "schedule": ("constant", "cyclic", "cosine"),
    "teacher_visual": TEACHER_VISUAL_MODES,
}
"""The allowed values of the string-valued fields (argparse ``choices`` and validation)."""

_METAVARS = {"layers": "A:B", "ref_store": "PATH", "teacher_load": "PATH"}


def parse_layer_span(text: str) -> Tuple[Optional[int], Optional[int]]:
    """Parse ``--regate-layers`` text ``a:b`` (either end may be empty) into ints."""
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(
            f"--regate-layers expects 'a:b' (routed decoder layers a..b-1, 0-based; "
            f"either end may be left empty), got {text!r}"
        )
    try:
        return tuple(int(p) if p.strip() else None for p in parts)  # type: ignore[return-value]
    except ValueError:
        raise ValueError(f"--regate-layers expects integers in 'a:b', got {text!r}") from None


@dataclass
class ReGateConfig:
    """ReGATE settings. Each field is the flag ``--regate-<field>`` (``enabled`` is
    ``--regate``)."""

    enabled: bool = False
    """Turn ReGATE token elision on. Off, the model is stock Megatron-Core."""

    keep_ratio: float = 0.5
    """Keep ratio rho in (0, 1]: the fraction of each sample's target tokens computed in the
    routed layers (rho_min of the schedule). 1.0 computes every token (dense)."""

    layers: Optional[Tuple[Optional[int], Optional[int]]] = None
    """Routed span of decoder layers 'a:b' (0-based, b exclusive; empty end = first/last
    layer). Default: all layers."""

    pad_multiple: int = 0
    """Round the kept length of a micro-batch up to this multiple (0 = automatic: 16 on GPU,
    1 on CPU; always also a multiple of the TP size under sequence parallelism)."""

    ema_decay: float = 0.9
    """Decay beta in [0, 1) of the student-loss EMA per (sample, target token):
    e <- beta*e + (1-beta)*loss (the first observation sets e = loss). 0 keeps the last loss."""

    selector: str = "regate"
    """Which targets the schedule's keep ratio keeps (only the kept set differs): 'regate' (the
    fused score below), 'random' (a fresh uniform choice per step, seeded from --seed, the step
    and the sample id; needs no --regate-ref-store) or 'excess' (Rho-1's reducible loss: the
    student EMA minus the reference loss)."""

    lambda_: float = 0.5
    """Weight lambda in [0, 1] of the reference loss in the importance score
    lambda*N(ref) + (1-lambda)*N(student EMA); 1 = teacher only, 0 = student EMA only."""

    score_norm: str = "rank"
    """Normalisation N of reference loss and student difficulty before fusing: 'rank'
    (average rank mapped to [0, 1]), 'zscore' or 'none'."""

    select_scope: str = "sample"
    """Where the top-k is taken: 'sample' (k = ceil(rho*|T|) per sample) or 'batch' (k over
    all targets of the micro-batch jointly, scores normalised over the micro-batch)."""

    schedule: str = "cyclic"
    """Keep-ratio schedule rho_t after warmup: 'constant' (--regate-keep-ratio always),
    'cyclic' (each cycle: --regate-dense-steps dense steps, then --regate-keep-ratio) or
    'cosine' (dense steps, then a cosine from 1 down to --regate-keep-ratio at the cycle's
    last step). See regate_megatron.scoring.schedule."""

    warmup_steps: int = 0
    """Dense optimizer steps (rho = 1) before the schedule starts."""

    cycle_steps: int = 10
    """Length in optimizer steps of one schedule cycle (>= 1)."""

    dense_steps: int = 1
    """Dense steps (rho = 1) at the start of every cycle, in [0, --regate-cycle-steps); they
    refresh every target token's student EMA."""

    teacher_visual: str = "pad"
    """How the text-only teacher sees visual positions: 'pad' (replaced by the teacher's pad
    token, positions line up) or 'drop' (removed from the teacher's sequence)."""

    ref_store: Optional[str] = None
    """Path of the reference-loss store (per-target teacher losses, built by
    regate-precompute-ref) that the trainer reads."""

    teacher_ranks: int = 0
    """Online teacher: the last N ranks of the launch run the frozen teacher one global batch
    ahead of the students and stream its reference losses to them (regate_megatron.
    online_teacher); the students' parallel state covers the other ranks. 0 = offline
    (--regate-ref-store)."""

    teacher_load: Optional[str] = None
    """The online teacher's dist_checkpointing checkpoint (a regate-train --text-only run,
    saved at any TP/PP)."""

    teacher_tensor_model_parallel_size: int = 1
    """The online teacher's tensor-parallel size."""

    teacher_pipeline_model_parallel_size: int = 1
    """The online teacher's pipeline-parallel size."""

    teacher_micro_batch_size: int = 0
    """The online teacher's micro-batch size (0 = --micro-batch-size)."""

    teacher_timeout: float = 30.0
    """Seconds a teacher rank may go without a heartbeat before the students stop with an
    error naming it (a dead or hung teacher never hangs the students)."""

    def __post_init__(self):
        if isinstance(self.layers, str):
            self.layers = parse_layer_span(self.layers)
        if not (isinstance(self.keep_ratio, (int, float)) and 0.0 < self.keep_ratio <= 1.0):
            raise ValueError(
                f"--regate-keep-ratio must be in (0, 1], got {self.keep_ratio!r}; "
                f"use 1.0 for dense training"
            )
        if math.isnan(float(self.keep_ratio)):
            raise ValueError("--regate-keep-ratio must be in (0, 1], got nan")
        if self.layers is not None:
            start, end = self.layers
            if (start is not None and start < 0) or (end is not None and end < 0):
                raise ValueError(f"--regate-layers ends must be >= 0, got {self.layers}")
            if start is not None and end is not None and start >= end:
                raise ValueError(
                    f"--regate-layers 'a:b' needs a < b (a non-empty span), got {start}:{end}"
                )
        if self.pad_multiple < 0:
            raise ValueError(f"--regate-pad-multiple must be >= 0, got {self.pad_multiple}")
        if not (_is_real(self.ema_decay) and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(
                f"--regate-ema-decay must be in [0, 1), got {self.ema_decay!r}; "
                f"0 keeps only the last observed loss"
            )
        if not (_is_real(self.lambda_) and 0.0 <= self.lambda_ <= 1.0):
            raise ValueError(
                f"--regate-lambda must be in [0, 1], got {self.lambda_!r}; "
                f"1 scores by the reference loss only, 0 by the student EMA only"
            )
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{flag_for(name)} must be one of {', '.join(allowed)}; "
                    f"got {getattr(self, name)!r}"
                )
        for name, minimum in (("warmup_steps", 0), ("cycle_steps", 1), ("dense_steps", 0)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
                raise ValueError(f"{flag_for(name)} must be an integer >= {minimum}, got {value!r}")
        if self.dense_steps >= self.cycle_steps:
            raise ValueError(
                f"--regate-dense-steps must be < --regate-cycle-steps ({self.cycle_steps}), got "
                f"{self.dense_steps}; raise --regate-cycle-steps, or use --regate-keep-ratio 1.0 "
                f"for dense training"
            )
        if self.ref_store is not None and not (isinstance(self.ref_store, str) and self.ref_store):
            raise ValueError(
                f"--regate-ref-store must be a non-empty path, got {self.ref_store!r}"
            )
        self._check_teacher()

    def _check_teacher(self) -> None:
        for name, minimum in (("teacher_ranks", 0), ("teacher_tensor_model_parallel_size", 1),
                              ("teacher_pipeline_model_parallel_size", 1),
                              ("teacher_micro_batch_size", 0)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
                raise ValueError(f"{flag_for(name)} must be an integer >= {minimum}, got {value!r}")
        if not (_is_real(self.teacher_timeout) and self.teacher_timeout > 0):
            raise ValueError(f"--regate-teacher-timeout must be > 0 seconds, got "
                             f"{self.teacher_timeout!r}")
        if self.teacher_ranks and self.ref_store is not None:
            raise ValueError("--regate-teacher-ranks (online teacher) and --regate-ref-store "
                             "(offline store) are two sources of reference losses; pass one")
        if self.teacher_ranks and not self.teacher_load:
            raise ValueError("--regate-teacher-ranks needs --regate-teacher-load (the teacher's "
                             "checkpoint)")

    def layer_span(self, num_layers: int) -> Tuple[int, int]:
        """The routed span ``[a, b)`` resolved against the model depth, validated."""
        start, end = self.layers if self.layers is not None else (None, None)
        start = 0 if start is None else start
        end = num_layers if end is None else end
        if not (0 <= start < end <= num_layers):
            raise ValueError(
                f"--regate-layers {start}:{end} is outside the model's decoder layers "
                f"[0, {num_layers}]; pick 0 <= a < b <= --num-layers"
            )
        return start, end

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ReGateConfig":
        """Build from a namespace produced by a parser extended with `add_regate_args`."""
        return cls(**{f.name: getattr(args, _dest(f.name)) for f in dataclasses.fields(cls)})


def _is_real(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flag_for(field_name: str) -> str:
    """The CLI flag of a config field: ``enabled`` -> ``--regate``, ``x_y`` -> ``--regate-x-y``;
    a trailing underscore (a field named after a Python keyword) is dropped:
    ``lambda_`` -> ``--regate-lambda``."""
    if field_name == "enabled":
        return "--regate"
    return "--regate-" + field_name.rstrip("_").replace("_", "-")


def _dest(field_name: str) -> str:
    return flag_for(field_name)[2:].replace("-", "_")


def _field_docs(cls) -> dict:
    """Attribute docstrings (the string literal after each field) of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_regate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every ``--regate-*`` flag; usable as Megatron-LM's ``extra_args_provider``."""
    docs = _field_docs(ReGateConfig)
    hints = typing.get_type_hints(ReGateConfig)
    group = parser.add_argument_group(title="ReGATE (reference-guided adaptive token elision)")
    for f in dataclasses.fields(ReGateConfig):
        flag, help_text = flag_for(f.name), docs[f.name]
        if f.name == "enabled":
            group.add_argument(flag, action="store_true", dest=_dest(f.name), help=help_text)
            continue
        if f.name == "layers":
            arg_type = parse_layer_span
        else:
            # Optional[X] -> X; a plain annotation is its own type.
            arg_type = next(
                (t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name]
            )
        group.add_argument(
            flag, type=arg_type, default=f.default, dest=_dest(f.name),
            choices=CHOICES.get(f.name), metavar=_METAVARS.get(f.name), help=help_text,
        )
    return parser
