"""Megatron-LM's multimodal launch-script flags: the table
(`regate_megatron.training.megatron_lm_flags`)
covers every flag of the pinned scripts, the docs table is generated from it, and each
status is real: honoured flags change what is run, no-ops are accepted with a note,
refused flags fail with the flag and the reason."""

import os

import pytest

from regate_megatron.training.arguments import build_parser, parse_args
from regate_megatron.training.megatron_lm_flags import FLAGS, NOOP, REFUSED, markdown_table

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def script_flags():
    with open(os.path.join(DOCS, "megatron_lm_multimodal_flags.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def test_every_pinned_script_flag_has_a_status():
    flags = script_flags()
    assert len(flags) == 100 and "--decoder-seq-length" in flags
    assert sorted(set(flags) - set(FLAGS)) == []
    # the same scripts at core_v0.17.0 ... core_v0.19.0 add exactly this one
    assert "--no-use-tokenizer-model-from-checkpoint-args" in FLAGS


def test_docs_table_is_generated_from_the_code():
    with open(os.path.join(DOCS, "megatron_lm_flags.md")) as f:
        assert f.read() == markdown_table(), (
            "regenerate: python -c "
            "'from regate_megatron.training.megatron_lm_flags import markdown_table; "
            "open(\"docs/megatron_lm_flags.md\", \"w\").write(markdown_table())'")


def test_every_table_flag_is_a_regate_train_flag():
    options = {o for a in build_parser()._actions for o in a.option_strings}
    assert sorted(set(FLAGS) - options) == []


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "t.model").write_text("")
    return ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4",
            "--seq-length", "64", "--train-iters", "100", "--lr", "1e-3",
            "--global-batch-size", "4", "--data-path", str(tmp_path / "d.json"),
            "--tokenizer-model", str(tmp_path / "t.model"), "--img-h", "8", "--img-w", "8",
            "--patch-dim", "4"]


def _example_value(flag):
    return {"values": ["<image>", "<img>"], "value": ["1"], "switch": []}[FLAGS[flag].kind]


@pytest.mark.parametrize("flag", sorted(f for f, s in FLAGS.items() if s.status == REFUSED))
def test_refused_flags_name_flag_and_reason(base, flag, capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(base + [flag, *_example_value(flag)])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert flag in message and FLAGS[flag].reason in message


@pytest.mark.parametrize("flag", sorted(f for f, s in FLAGS.items() if s.status == NOOP))
def test_noop_flags_are_accepted_with_a_note(base, flag, capsys):
    parse_args(base + [flag, *_example_value(flag)])
    assert f"note: {flag} accepted, no effect" in capsys.readouterr().err


def test_honoured_mappings(base):
    args = parse_args(base + ["--seq-length", "4", "--decoder-seq-length", "96",
                              "--dataloader-seq-length", "96", "--train-samples", "800",
                              "--lr-decay-samples", "400", "--lr-warmup-fraction", "0.25",
                              "--pretrained-checkpoint", "ckpt", "--use-te", "--swiglu",
                              "--disable-bias-linear", "--ckpt-format", "torch_dist",
                              "--vision-model-type", "clip", "--rotary-percent", "1.0",
                              "--split", "100,0,0", "--distributed-timeout-minutes", "3"])
    assert args.seq_length == 96  # the LM's; 4 = (8/4)^2 image tokens is the encoder's
    assert (args.train_iters, args.lr_decay_iters, args.lr_warmup_iters) == (200, 100, 25)
    assert args.language_model_checkpoint == args.vision_model_checkpoint == "ckpt"
    assert args.transformer_impl == "transformer_engine"
    assert args.distributed_timeout_minutes == 3.0
    args = parse_args(base + ["--lr-warmup-samples", "40"])
    assert args.lr_warmup_iters == 10


@pytest.mark.parametrize("extra, flag", [
    (["--ckpt-format", "torch"], "--ckpt-format"),
    (["--vision-model-type", "siglip"], "--vision-model-type"),
    (["--rotary-percent", "0.5"], "--rotary-percent"),
    (["--split", "99,1,0"], "--split"),
    (["--disable-bias-linear"], "--disable-bias-linear"),            # without --swiglu
    (["--decoder-seq-length", "96"], "--seq-length"),               # 64 != 4 image tokens
    (["--train-samples", "10"], "--train-samples"),                 # not a whole number of steps
    (["--seq-length", "4", "--decoder-seq-length", "96", "--dataloader-seq-length", "48"],
     "--dataloader-seq-length"),
    (["--lr-warmup-iters", "5", "--lr-warmup-fraction", "0.1"], "--lr-warmup-fraction"),
])
def test_unsupported_values_are_refused_by_name(base, extra, flag):
    with pytest.raises(SystemExit, match=flag):
        parse_args(base + extra)
