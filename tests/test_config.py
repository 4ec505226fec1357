"""ReGateConfig and its flags: frozen CLI, one flag per field, errors name the flag."""

import argparse
import dataclasses

import pytest

from regate_megatron.config import ReGateConfig, add_regate_args, flag_for

FROZEN_FLAGS = ["--regate", "--regate-keep-ratio", "--regate-layers", "--regate-pad-multiple"]


def _parse(*argv):
    return add_regate_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_flags_are_frozen_and_one_to_one_with_fields():
    parser = add_regate_args(argparse.ArgumentParser())
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.option_strings[0].startswith("--regate")]
    assert flags == FROZEN_FLAGS
    assert [flag_for(f.name) for f in dataclasses.fields(ReGateConfig)] == FROZEN_FLAGS
    assert all(a.help for a in parser._actions if a.option_strings and a.option_strings[0].startswith("--regate"))


def test_defaults_and_parsing():
    assert ReGateConfig.from_args(_parse()) == ReGateConfig()
    cfg = ReGateConfig.from_args(_parse("--regate", "--regate-keep-ratio", "0.25", "--regate-layers", "2:6"))
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


@pytest.mark.parametrize("span,num_layers", [((4, 2), 8), ((0, 9), 8), ((-1, 3), 8), ((8, None), 8)])
def test_span_outside_model(span, num_layers):
    with pytest.raises(ValueError, match="--regate-layers"):
        ReGateConfig(layers=span).layer_span(num_layers)
