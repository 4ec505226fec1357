"""ReGateConfig and its flags: frozen CLI, one flag per field, errors name the flag."""

import argparse
import dataclasses

import pytest

from regate_megatron.config import CHOICES, ReGateConfig, add_regate_args, flag_for

FROZEN_FLAGS = [
    "--regate",
    "--regate-keep-ratio",
    "--regate-layers",
    "--regate-pad-multiple",
    "--regate-ema-decay",
    "--regate-selector",
    "--regate-lambda",
    "--regate-score-norm",
    "--regate-select-scope",
    "--regate-schedule",
    "--regate-warmup-steps",
    "--regate-cycle-steps",
    "--regate-dense-steps",
    "--regate-teacher-visual",
    "--regate-ref-store",
    # the online teacher (issue 12)
    "--regate-teacher-ranks",
    "--regate-teacher-load",
    "--regate-teacher-tensor-model-parallel-size",
    "--regate-teacher-pipeline-model-parallel-size",
    "--regate-teacher-micro-batch-size",
    "--regate-teacher-timeout",
]


def _parse(*argv):
    return add_regate_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_flags_are_frozen_and_one_to_one_with_fields():
    parser = add_regate_args(argparse.ArgumentParser())
    regate = [a for a in parser._actions
              if a.option_strings and a.option_strings[0].startswith("--regate")]
    flags = [a.option_strings[0] for a in regate]
    assert flags == FROZEN_FLAGS
    assert [flag_for(f.name) for f in dataclasses.fields(ReGateConfig)] == FROZEN_FLAGS
    assert all(a.help for a in regate)


def test_defaults_and_parsing():
    assert ReGateConfig.from_args(_parse()) == ReGateConfig()
    cfg = ReGateConfig.from_args(
        _parse("--regate", "--regate-keep-ratio", "0.25", "--regate-layers", "2:6"))
    assert cfg == ReGateConfig(enabled=True, keep_ratio=0.25, layers=(2, 6))
    assert cfg.layer_span(8) == (2, 6)
    assert ReGateConfig(layers=(None, 3)).layer_span(8) == (0, 3)
    assert ReGateConfig(layers=(5, None)).layer_span(8) == (5, 8)
    assert ReGateConfig().layer_span(8) == (0, 8)


def test_usable_as_megatron_extra_args_provider():
    parser = argparse.ArgumentParser()
    assert add_regate_args(parser) is parser  # Megatron-LM: parser = extra_args_provider(parser)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_keep_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match="--regate-keep-ratio must be in"):
        ReGateConfig(keep_ratio=ratio)


@pytest.mark.parametrize("text", ["3", "a:b", "1:2:3"])
def test_bad_layer_span_text(text):
    with pytest.raises((ValueError, SystemExit)):
        _parse("--regate-layers", text)
    with pytest.raises(ValueError, match="--regate-layers"):
        ReGateConfig(layers=text)


@pytest.mark.parametrize("span,num_layers",
                         [((4, 2), 8), ((0, 9), 8), ((-1, 3), 8), ((8, None), 8)])
def test_span_outside_model(span, num_layers):
    with pytest.raises(ValueError, match="--regate-layers"):
        ReGateConfig(layers=span).layer_span(num_layers)


def test_trailing_underscore_field_maps_to_plain_flag():
    assert flag_for("lambda_") == "--regate-lambda"
    args = _parse("--regate-lambda", "0.25")
    assert args.regate_lambda == 0.25 and not hasattr(args, "regate_lambda_")
    assert ReGateConfig.from_args(args).lambda_ == 0.25


def test_new_flags_parse_to_typed_fields():
    cfg = ReGateConfig.from_args(_parse(
        "--regate-ema-decay", "0.75", "--regate-score-norm", "zscore",
        "--regate-select-scope", "batch", "--regate-schedule", "cosine",
        "--regate-warmup-steps", "3", "--regate-cycle-steps", "5", "--regate-dense-steps", "2",
        "--regate-teacher-visual", "drop", "--regate-ref-store", "/data/ref",
    ))
    assert cfg == ReGateConfig(
        ema_decay=0.75, score_norm="zscore", select_scope="batch", schedule="cosine",
        warmup_steps=3, cycle_steps=5, dense_steps=2, teacher_visual="drop", ref_store="/data/ref",
    )
    assert type(cfg.warmup_steps) is int and type(cfg.ema_decay) is float
    defaults = ReGateConfig.from_args(_parse())
    assert defaults.ref_store is None and defaults.schedule == "cyclic" and defaults.lambda_ == 0.5


def test_choices_come_from_one_table():
    parser = add_regate_args(argparse.ArgumentParser())
    by_flag = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    assert {name: tuple(by_flag[flag_for(name)].choices) for name in CHOICES} == CHOICES
    assert CHOICES["schedule"] == ("constant", "cyclic", "cosine")
    assert by_flag["--regate-ref-store"].metavar == "PATH"
    for name, allowed in CHOICES.items():
        with pytest.raises(SystemExit):  # argparse refuses a value outside the choices
            _parse(flag_for(name), "bogus")
        message = f"{flag_for(name)} must be one of {', '.join(allowed)}"
        with pytest.raises(ValueError, match=message):
            ReGateConfig(**{name: "bogus"})


@pytest.mark.parametrize("fields,message", [
    (dict(ema_decay=1.0), "--regate-ema-decay must be in \\[0, 1\\)"),
    (dict(ema_decay=-0.1), "--regate-ema-decay must be in"),
    (dict(ema_decay=float("nan")), "--regate-ema-decay must be in"),
    (dict(lambda_=1.5), "--regate-lambda must be in \\[0, 1\\]"),
    (dict(lambda_=-0.5), "--regate-lambda must be in"),
    (dict(warmup_steps=-1), "--regate-warmup-steps must be an integer >= 0"),
    (dict(cycle_steps=0), "--regate-cycle-steps must be an integer >= 1"),
    (dict(dense_steps=-1), "--regate-dense-steps must be an integer >= 0"),
    (dict(cycle_steps=4, dense_steps=4),
     "--regate-dense-steps must be < --regate-cycle-steps \\(4\\)"),
    (dict(cycle_steps=2.5), "--regate-cycle-steps must be an integer"),
    (dict(ref_store=""), "--regate-ref-store must be a non-empty path"),
    (dict(teacher_ranks=-1), "--regate-teacher-ranks must be an integer >= 0"),
    (dict(teacher_ranks=1), "--regate-teacher-ranks needs --regate-teacher-load"),
    (dict(teacher_ranks=1, teacher_load="t", ref_store="s"), "pass one"),
    (dict(teacher_tensor_model_parallel_size=0),
     "--regate-teacher-tensor-model-parallel-size must be an integer >= 1"),
    (dict(teacher_timeout=0.0), "--regate-teacher-timeout must be > 0"),
])
def test_invalid_values_name_the_flag(fields, message):
    with pytest.raises(ValueError, match=message):
        ReGateConfig(**fields)


def test_boundary_values_are_accepted():
    ReGateConfig(ema_decay=0.0, lambda_=0.0)
    ReGateConfig(lambda_=1.0, cycle_steps=1, dense_steps=0, warmup_steps=0)
