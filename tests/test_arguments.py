"""`regate-train` flags (frozen), start-up validation, vocabulary padding and the sampler."""

import pytest

from regate_megatron.data.sampler import global_batch_positions, local_microbatch_positions
from regate_megatron.training.arguments import build_parser, parse_args
from regate_megatron.training.train import padded_vocab_size

FROZEN_TRAIN_FLAGS = [
    "--adam-beta1", "--adam-beta2", "--adam-eps", "--attention-dropout", "--bf16",
    "--check-for-nan-in-loss-and-grad", "--no-check-for-nan-in-loss-and-grad",
    "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler", "--clip-grad",
    "--data-path", "--distrib-optim-sharding-type", "--eval-interval", "--eval-iters",
    "--eval-max-new-tokens", "--ffn-hidden-size", "--freeze-LM", "--freeze-ViT",
    "--global-batch-size", "--group-query-attention", "--help", "--hidden-dropout", "--hidden-size",
    "--image-root", "--img-h", "--img-w", "--init-method-std", "--language-model-checkpoint",
    "--load", "--log-interval", "--lr", "--lr-decay-iters", "--lr-decay-style", "--lr-warmup-iters",
    "--make-vocab-size-divisible-by", "--max-position-embeddings", "--metrics-jsonl",
    "--micro-batch-size", "--min-lr", "--no-progress", "--norm-epsilon", "--normalization",
    "--num-attention-heads", "--num-layers", "--num-query-groups", "--patch-dim",
    "--pipeline-model-parallel-size", "--position-embedding-type", "--recompute-activations",
    "--recompute-granularity", "--recompute-method", "--recompute-modules",
    "--recompute-num-layers", "--recompute-vision", "--regate",
    "--regate-cycle-steps", "--regate-dense-steps", "--regate-ema-decay", "--regate-keep-ratio",
    "--regate-lambda", "--regate-layers", "--regate-pad-multiple", "--regate-ref-store",
    "--regate-schedule", "--regate-score-norm", "--regate-select-scope", "--regate-selector",
    "--regate-teacher-visual",
    "--regate-teacher-load", "--regate-teacher-micro-batch-size",
    "--regate-teacher-pipeline-model-parallel-size", "--regate-teacher-ranks",
    "--regate-teacher-tensor-model-parallel-size", "--regate-teacher-timeout",
    "--regate-warmup-steps", "--rotary-base", "--save", "--save-interval", "--seed", "--seq-length",
    "--sequence-parallel", "--skip-bad-samples", "--swiglu", "--tensor-model-parallel-size",
    "--tensorboard-dir", "--text-only", "--tokenizer-model", "--tokenizer-type", "--train-iters",
    "--transformer-impl", "--untie-embeddings-and-output-weights", "--use-distributed-optimizer",
    "--valid-data-path", "--vision-ffn-hidden-size", "--vision-hidden-size",
    "--vision-model-checkpoint", "--vision-num-attention-heads", "--vision-num-layers",
    "--weight-decay",
]


EXIT_FLAGS = ["--exit-duration-in-mins", "--exit-interval", "--exit-signal",
              "--exit-signal-handler"]


def test_train_flags_are_frozen():
    from regate_megatron.training.megatron_lm_flags import FLAGS

    # The Megatron-LM launch-script flags that only the compatibility table defines are
    # frozen by tests/test_megatron_lm_flags.py.
    table_only = {f for f, spec in FLAGS.items() if spec.kind != "native"}
    parser = build_parser()
    flags = sorted(o for a in parser._actions for o in a.option_strings
                   if o.startswith("--") and o not in table_only)
    assert flags == sorted(FROZEN_TRAIN_FLAGS + EXIT_FLAGS)


@pytest.fixture
def base(tmp_path):
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "t.model").write_text("")
    return ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "64", "--train-iters", "2", "--lr", "1e-3",
            "--data-path", str(tmp_path / "d.json"), "--tokenizer-model", str(tmp_path / "t.model")]


def test_valid_flags_derive_megatron_defaults(base, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    args = parse_args(base + ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
                              "--global-batch-size", "16"])
    assert (args.data_parallel_size, args.num_microbatches) == (4, 2)
    assert args.ffn_hidden_size == 128 and args.num_query_groups == 4
    assert args.max_position_embeddings == 64 and args.vision_num_layers == 4
    assert args.regate.enabled is False


@pytest.mark.parametrize("extra, env, needle", [
    (["--no-such-flag"], {}, None),
    (["--global-batch-size", "3", "--micro-batch-size", "2"], {}, "--global-batch-size"),
    (["--tensor-model-parallel-size", "3"], {"WORLD_SIZE": "3"}, "--num-attention-heads"),
    (["--pipeline-model-parallel-size", "2"], {"WORLD_SIZE": "3"}, "world size 3"),
    (["--eval-interval", "5"], {}, "--valid-data-path"),
    (["--save-interval", "5"], {}, "--save"),
    (["--regate"], {}, "--regate-ref-store"),
    (["--regate", "--regate-ref-store", "s", "--regate-layers", "2:9"], {}, "--regate-layers"),
    (["--regate-keep-ratio", "0"], {}, "--regate-keep-ratio"),
    (["--regate-dense-steps", "10"], {}, "--regate-dense-steps"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"], {"WORLD_SIZE": "2"},
     "--sequence-parallel"),
    (["--valid-data-path", "/nonexistent.json"], {}, "--valid-data-path"),
    (["--load", "/nonexistent"], {}, "--load"),
    (["--recompute-granularity", "full"], {}, "--recompute-method uniform|block"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "3"], {}, "(3) layers, which must divide the 4 layers"),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "5"], {}, "--recompute-num-layers 5 is more than the 4"),
    (["--recompute-method", "block"], {}, "--recompute-method needs --recompute-granularity"),
    (["--recompute-activations", "--recompute-num-layers", "1"], {}, "selective takes no"),
    (["--recompute-vision"], {}, "--recompute-vision needs"),
], ids=lambda x: str(x)[:30])
def test_bad_flags_are_named(base, monkeypatch, capsys, extra, env, needle):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises((SystemExit, ValueError)) as info:
        parse_args(base + extra)
    message = str(info.value) + capsys.readouterr().err
    assert (needle or extra[0]) in message


def test_recompute_flags_reach_the_configs_as_megatron_lm_sets_them(base, monkeypatch):
    from regate_megatron.training.model_config import (
        language_config,
        projection_config,
        vision_config,
    )

    monkeypatch.setenv("WORLD_SIZE", "2")
    full = ["--recompute-granularity", "full", "--recompute-method", "uniform",
            "--recompute-num-layers", "1", "--pipeline-model-parallel-size", "2",
            "--vision-num-layers", "3"]
    fields = ("recompute_granularity", "recompute_method", "recompute_num_layers")

    def of(config):
        return tuple(getattr(config, f) for f in fields)

    args = parse_args(base + full)
    assert of(language_config(args)) == ("full", "uniform", 1)
    assert of(vision_config(args)) == of(projection_config(args)) == (None, None, None)
    args = parse_args(base + full + ["--recompute-vision"])
    assert of(vision_config(args)) == ("full", "uniform", 3)  # all the encoder's layers
    assert of(projection_config(args)) == (None, None, None)
    args = parse_args(base + ["--recompute-activations"])
    config = language_config(args)
    assert of(config) == ("selective", None, None) and config.recompute_modules == ["core_attn"]
    assert vision_config(args).recompute_granularity is None
    args = parse_args(base)
    assert of(language_config(args)) == (None, None, None)


def test_missing_required_flags_are_listed(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--num-layers", "2"])
    assert "--hidden-size" in str(info.value) and "--data-path" in str(info.value)


def test_padded_vocab_size_follows_megatron():
    assert padded_vocab_size(128, 1) == 128
    assert padded_vocab_size(129, 1) == 256
    assert padded_vocab_size(128, 2) == 256
    assert padded_vocab_size(128, 2, divisible_by=64) == 128
    assert padded_vocab_size(32000, 8) == 32768


def test_sampler_is_a_pure_function_of_seed_and_step():
    n, g = 10, 4
    steps = [global_batch_positions(t, n, g, seed=3) for t in range(5)]
    assert steps == [global_batch_positions(t, n, g, seed=3) for t in range(5)]
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10))  # epoch 0 is a permutation
    assert sorted(flat[10:20]) == list(range(10))  # so is epoch 1 (step 2 straddles both)
    assert flat[:10] != flat[10:20]
    assert global_batch_positions(0, n, g, seed=4) != steps[0]
    # data-parallel ranks take contiguous slices, split into micro-batches in order
    parts = [local_microbatch_positions(steps[1], r, 2, 1) for r in range(2)]
    assert parts == [[[steps[1][0]], [steps[1][1]]], [[steps[1][2]], [steps[1][3]]]]
