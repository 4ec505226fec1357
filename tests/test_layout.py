"""The sequence layout (`regate_megatron.data.layout`): one image-token formula, one set of layout
flags that regate-train, regate-precompute-ref and regate-inspect all take, one teacher-visual
choice list, one digits layout."""

import argparse

import pytest

from regate_megatron.config import CHOICES, TEACHER_VISUAL_MODES, ReGateConfig
from regate_megatron.data.layout import LAYOUT_FLAGS, add_layout_args, num_image_tokens
from regate_megatron.tools.demo.digits import DIGITS_LAYOUT
from regate_megatron.tools.inspect_refs import _parser as inspect_parser
from regate_megatron.tools.precompute import build_parser as precompute_parser
from regate_megatron.training.arguments import build_parser as train_parser
from regate_megatron.training.arguments import parse_args

# What each CLI requires besides the layout flags.
CLIS = {
    "regate-train": (train_parser, []),
    "regate-precompute-ref": (precompute_parser, ["--data-path", "d", "--tokenizer-model", "t",
                                                  "--load", "l", "--output", "o"]),
    "regate-inspect": (inspect_parser, ["--data-path", "d", "--tokenizer-model", "t",
                                        "--store", "s", "--output", "o"]),
}


@pytest.mark.parametrize("img_h, img_w, patch_dim, tokens", [
    (336, 336, 14, 576),  # LLaVA-1.5: CLIP ViT-L/14-336
    (224, 224, 14, 256),
    (8, 8, 2, 16),        # digits-VQA
    (8, 16, 4, 8),        # not square
])
def test_num_image_tokens(img_h, img_w, patch_dim, tokens):
    assert num_image_tokens(img_h, img_w, patch_dim) == tokens


@pytest.mark.parametrize("img_h, img_w, patch_dim", [(10, 8, 4), (8, 10, 4), (8, 8, 3),
                                                     (8, 8, 0), (0, 8, 4), (8, 8, -2)])
def test_num_image_tokens_names_the_flags_when_patches_do_not_tile(img_h, img_w, patch_dim):
    with pytest.raises(ValueError, match=rf"--img-h {img_h} and --img-w {img_w} .*--patch-dim "
                                         rf"{patch_dim}"):
        num_image_tokens(img_h, img_w, patch_dim)


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_every_cli_takes_the_same_layout_flags(cli):
    make, others = CLIS[cli]
    parser = make()
    for flag in LAYOUT_FLAGS:
        action = parser._option_string_actions[flag]
        assert action.type is int and action.dest == flag[2:].replace("-", "_")
    args = parser.parse_args(others + DIGITS_LAYOUT)
    assert (args.seq_length, args.img_h, args.img_w, args.patch_dim) == (80, 8, 8, 2)
    assert num_image_tokens(args.img_h, args.img_w, args.patch_dim) == 16


def test_each_cli_keeps_its_required_flags_and_defaults(capsys):
    train = train_parser().parse_args([])
    assert (train.seq_length, train.img_h, train.img_w, train.patch_dim) == (None, 336, 336, 14)
    _, others = CLIS["regate-precompute-ref"]
    pre = precompute_parser().parse_args(others + ["--seq-length", "64"])
    assert (pre.img_h, pre.img_w, pre.patch_dim) == (336, 336, 14)
    with pytest.raises(SystemExit):
        precompute_parser().parse_args(others)  # --seq-length: the student's, always given
    assert "--seq-length" in capsys.readouterr().err
    _, others = CLIS["regate-inspect"]
    for flag in LAYOUT_FLAGS:  # the store's layout: every flag given
        given = [a for f in LAYOUT_FLAGS if f != flag
                 for a in (f, DIGITS_LAYOUT[DIGITS_LAYOUT.index(f) + 1])]
        with pytest.raises(SystemExit):
            inspect_parser().parse_args(others + given)
        assert flag in capsys.readouterr().err


def test_add_layout_args_refuses_a_non_layout_flag():
    with pytest.raises(ValueError, match="--image-root"):
        add_layout_args(argparse.ArgumentParser(), required=("--image-root",))


def test_regate_train_refuses_an_image_that_is_not_whole_patches(tmp_path, capsys):
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "t.model").write_text("")
    argv = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4",
            "--seq-length", "64", "--train-iters", "2", "--lr", "1e-3",
            "--data-path", str(tmp_path / "d.json"), "--tokenizer-model", str(tmp_path / "t.model"),
            "--img-h", "10", "--img-w", "8", "--patch-dim", "4"]
    for extra in ([], ["--text-only"]):  # the teacher keeps the student's image slots too
        with pytest.raises(SystemExit, match="--img-h 10 and --img-w 8 .*--patch-dim 4"):
            parse_args(argv + extra)


def test_one_teacher_visual_choice_list():
    assert CHOICES["teacher_visual"] is TEACHER_VISUAL_MODES
    action = precompute_parser()._option_string_actions["--regate-teacher-visual"]
    assert tuple(action.choices) == TEACHER_VISUAL_MODES
    assert action.default == ReGateConfig().teacher_visual
    train = train_parser()._option_string_actions["--regate-teacher-visual"]
    assert tuple(train.choices) == TEACHER_VISUAL_MODES and train.default == action.default
