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
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["ReGateConfig", "add_regate_args", "flag_for", "parse_layer_span"]

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
    """ReGATE settings. Each field is the flag ``--regate-<field>`` (``enabled`` is ``--regate``)."""

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


def flag_for(field_name: str) -> str:
    """The CLI flag of a config field: ``enabled`` -> ``--regate``, ``x_y`` -> ``--regate-x-y``."""
    if field_name == "enabled":
        return "--regate"
    return "--regate-" + field_name.replace("_", "-")


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
    group = parser.add_argument_group(title="ReGATE (reference-guided adaptive token elision)")
    for f in dataclasses.fields(ReGateConfig):
        flag, help_text = flag_for(f.name), docs[f.name]
        if f.name == "enabled":
            group.add_argument(flag, action="store_true", dest=_dest(f.name), help=help_text)
        elif f.name == "layers":
            group.add_argument(
                flag, type=parse_layer_span, default=f.default, dest=_dest(f.name),
                metavar="A:B", help=help_text,
            )
        else:
            group.add_argument(
                flag, type=type(f.default), default=f.default, dest=_dest(f.name), help=help_text
            )
    return parser
