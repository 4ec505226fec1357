"""examples/*.sh: bash arrays of regate-train flags grouped by concern. Every flag of every
example is accepted and validated by regate-train's parser (paths point at stand-ins)."""

import glob
import os
import subprocess

import pytest

from regate_megatron.data.layout import num_image_tokens
from regate_megatron.training.arguments import parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.sh")))
GROUPS = ("MODEL_ARGS", "TRAINING_ARGS", "MODEL_PARALLEL_ARGS", "DATA_ARGS",
          "EVAL_AND_LOGGING_ARGS", "REGATE_ARGS")


def example_flags(path, env):
    script = 'source "$1"; printf "%s\\0" ' + " ".join(f'"${{{g}[@]}}"' for g in GROUPS)
    out = subprocess.run(["bash", "-c", "set -u; " + script, "-", path], env=env,
                         capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


def test_the_examples_are_there():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"tiny.sh", "llava15_7b.sh", "video_7b.sh"} <= names
    with open(os.path.join(REPO, "examples", "README.md")) as f:
        readme = f.read()
    assert all(name in readme for name in names)


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
@pytest.mark.parametrize("valid", [False, True])
def test_example_flags_parse(path, valid, tmp_path, monkeypatch):
    for name in ("train.json", "valid.json", "tok.model"):
        (tmp_path / name).write_text("")
    env = dict(os.environ, DATA_PATH=str(tmp_path / "train.json"),
               TOKENIZER_MODEL=str(tmp_path / "tok.model"), REF_STORE=str(tmp_path / "store"))
    if valid:
        env["VALID_DATA_PATH"] = str(tmp_path / "valid.json")
    flags = example_flags(path, env)
    # what slurm/train_regate.sh adds to every config
    flags += ["--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"),
              "--exit-signal-handler", "--metrics-jsonl", str(tmp_path / "m.jsonl")]
    if valid:
        flags += ["--valid-data-path", env["VALID_DATA_PATH"]]
    monkeypatch.delenv("RANK", raising=False)
    # the tests' 2 nodes x 2 CPU tasks for tiny.sh, else 2 nodes x 8 GPUs
    monkeypatch.setenv("WORLD_SIZE", "4" if path.endswith("tiny.sh") else "16")
    args = parse_args(flags)
    assert args.regate.enabled and args.regate.lambda_ == 0.5 and args.regate.schedule == "cyclic"
    assert 0.3 <= args.regate.keep_ratio <= 0.4
    if os.path.basename(path) == "llava15_7b.sh":
        assert (args.num_layers, args.hidden_size, args.num_attention_heads,
                args.ffn_hidden_size) == (32, 4096, 32, 11008)
        assert num_image_tokens(args.img_h, args.img_w, args.patch_dim) == 576
        assert args.tensor_model_parallel_size * args.pipeline_model_parallel_size <= 8
