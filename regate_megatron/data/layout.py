"""The sequence layout every tool agrees on: sequence length, image size and patch size.

A sample's combined sequence is `--seq-length` tokens; each image occupies
`num_image_tokens(img_h, img_w, patch_dim)` consecutive slots of it (the ViT's
patch grid, class token dropped). `regate-train`, `regate-precompute-ref` and
`regate-inspect` take the same four flags (`add_layout_args`) so target positions
line up between the teacher's store and the student.
"""

from __future__ import annotations

import argparse
from typing import Collection

__all__ = ["LAYOUT_FLAGS", "add_layout_args", "num_image_tokens"]

LAYOUT_FLAGS = ("--seq-length", "--img-h", "--img-w", "--patch-dim")
"""The layout flags, in the order `add_layout_args` defines them."""

_DEFAULTS = {"--seq-length": None, "--img-h": 336, "--img-w": 336, "--patch-dim": 14}
_HELP = {
    "--seq-length": "combined sequence length (text + image tokens) of the language model",
    "--img-h": "image height in pixels (a multiple of --patch-dim)",
    "--img-w": "image width in pixels (a multiple of --patch-dim)",
    "--patch-dim": "ViT patch size: each image becomes (img-h/patch-dim) x (img-w/patch-dim) "
                   "tokens",
}


def add_layout_args(parser: argparse.ArgumentParser, *, required: Collection[str] = (),
                    seq_length_help: str = _HELP["--seq-length"]) -> argparse.ArgumentParser:
    """Add `--seq-length`, `--img-h`, `--img-w`, `--patch-dim` (Megatron-LM's names) in a
    "sequence layout" group. Flags named in `required` must be given; the others default to
    `--seq-length` None, images 336 x 336 in 14-pixel patches (CLIP ViT-L/14-336)."""
    unknown = set(required) - set(LAYOUT_FLAGS)
    if unknown:
        raise ValueError(f"add_layout_args: required={sorted(unknown)} are not layout flags "
                         f"{LAYOUT_FLAGS}")
    group = parser.add_argument_group("sequence layout (text + image tokens)")
    for flag in LAYOUT_FLAGS:
        text = seq_length_help if flag == "--seq-length" else _HELP[flag]
        if flag in required:
            group.add_argument(flag, type=int, required=True, help=text)
        else:
            group.add_argument(flag, type=int, default=_DEFAULTS[flag], help=text)
    return parser


def num_image_tokens(img_h: int, img_w: int, patch_dim: int) -> int:
    """Tokens one image becomes in the combined sequence (its patch grid, class token dropped).

    Raises ValueError naming --img-h/--img-w/--patch-dim when the image is not a whole
    number of patches."""
    if patch_dim <= 0 or img_h <= 0 or img_w <= 0 or img_h % patch_dim or img_w % patch_dim:
        raise ValueError(
            f"--img-h {img_h} and --img-w {img_w} must be positive multiples of --patch-dim "
            f"{patch_dim} (a whole number of ViT patches)"
        )
    return (img_h // patch_dim) * (img_w // patch_dim)
