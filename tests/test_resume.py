"""Unit tier of issue 9: the resume rule (`resume.reconcile`), the data position, strict
metrics rows and named input errors (no process group, no model)."""

import json

import numpy as np
import pytest

from regate_megatron.data.sampler import batch_positions, global_batch_positions
from regate_megatron.training.arguments import parse_args
from regate_megatron.training.guard import json_safe
from regate_megatron.training.metrics import check_metrics_file, read_metrics_rows
from regate_megatron.training.resume import reconcile, run_state


@pytest.fixture
def argv(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "t.model").write_text("")
    return ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4",
            "--seq-length", "32", "--lr", "1e-3", "--lr-decay-style", "linear",
            "--micro-batch-size", "1", "--data-path", str(tmp_path / "d.json"),
            "--tokenizer-model", str(tmp_path / "t.model")]


def _args(argv, *extra, world=1, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    args = parse_args(argv + list(extra))
    args.vocab_size = 128
    return args


def _checkpoint(args, iteration):
    from regate_megatron.training.model_config import model_args_dict

    return {"iteration": iteration, "args": model_args_dict(args), "run_state": run_state(args),
            "consumed_samples": iteration * args.global_batch_size}


def test_longer_train_iters_extends_the_horizon_and_global_batch_is_the_runs(argv, monkeypatch):
    saved = _checkpoint(_args(argv, "--train-iters", "4", world=4, monkeypatch=monkeypatch), 4)
    args = _args(argv, "--train-iters", "8", world=2, monkeypatch=monkeypatch)
    assert args.global_batch_size == 2  # micro x DP, as a fresh run would derive
    notes = reconcile(args, saved, "ck")
    assert (args.global_batch_size, args.num_microbatches) == (4, 2)  # the checkpoint's
    assert any("4 -> 8" in n for n in notes)
    # an explicit horizon that differs is a schedule change: refused, or taken either way
    args = _args(argv, "--train-iters", "8", "--lr-decay-iters", "6", world=4,
                 monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match=r"--lr-decay-iters 6 \(checkpoint 4\)"):
        reconcile(args, saved, "ck")
    args = _args(argv, "--train-iters", "8", "--lr", "5e-3", "--use-checkpoint-opt_param-scheduler",
                 world=4, monkeypatch=monkeypatch)
    reconcile(args, saved, "ck")
    assert (args.lr, args.lr_decay_iters) == (1e-3, 4)
    args = _args(argv, "--train-iters", "8", "--lr", "5e-3", "--override-opt_param-scheduler",
                 world=4, monkeypatch=monkeypatch)
    reconcile(args, saved, "ck")
    assert args.lr == 5e-3


def test_fixed_flags_and_regate_config_are_refused_with_both_values(argv, monkeypatch):
    saved = _checkpoint(_args(argv, "--train-iters", "4", "--regate", "--regate-ref-store", "s",
                              monkeypatch=monkeypatch), 2)
    args = _args(argv, "--train-iters", "8", "--regate", "--regate-ref-store", "elsewhere",
                 "--regate-keep-ratio", "0.3", "--adam-beta2", "0.95", "--ffn-hidden-size", "48",
                 monkeypatch=monkeypatch)
    with pytest.raises(ValueError) as info:
        reconcile(args, saved, "ck")
    text = str(info.value)
    assert "--regate-keep-ratio 0.3 (checkpoint 0.5)" in text
    assert "--adam-beta2 0.95 (checkpoint 0.999)" in text
    assert "--ffn-hidden-size 48 (checkpoint 64)" in text
    assert "ref-store" not in text  # where the store lives may change
    # a global batch the new micro-batch x DP cannot divide: named, with the fix
    args = _args(argv, "--train-iters", "8", "--micro-batch-size", "3", monkeypatch=monkeypatch,
                 world=1)
    saved = _checkpoint(_args(argv, "--train-iters", "4", world=4, monkeypatch=monkeypatch), 4)
    with pytest.raises(ValueError, match="global batch size 4 is not a multiple"):
        reconcile(args, saved, "ck")


def test_data_position_is_the_consumed_samples():
    n, g = 10, 4
    stream = [i for t in range(5) for i in global_batch_positions(t, n, g, seed=3)]
    # any split of the stream into global batches of any size continues at the next sample
    assert batch_positions(6, n, 3, seed=3) == stream[6:9]
    assert batch_positions(12, n, 8, seed=3) == stream[12:20]


def test_metrics_rows_are_strict_and_a_torn_last_line_is_dropped(tmp_path, capsys):
    assert json_safe({"a": float("nan"), "b": [float("inf"), 1.0], "c": None}) == {
        "a": None, "b": [None, 1.0], "c": None}
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lm_lo')
    assert [r["step"] for r in read_metrics_rows(str(path))] == [1, 2]
    assert "m.jsonl:3: dropping a torn last line" in capsys.readouterr().err
    path.write_text('{"step": 1}\nNaN garbage\n{"step": 3}\n')
    with pytest.raises(ValueError, match="m.jsonl:2: not a metrics row"):
        read_metrics_rows(str(path))
    with pytest.raises(ValueError, match="already holds another run's metrics"):
        check_metrics_file(str(path), resuming=False)
    path.write_text("")
    check_metrics_file(str(path), resuming=False)  # an empty file is no run's


def test_non_finite_image_and_non_utf8_data_are_named(tmp_path):
    from regate_megatron.data.llava import load_image, read_json_records

    np.save(tmp_path / "x.npy", np.array([[0.5, np.inf], [0.1, 0.2]], dtype=np.float32))
    with pytest.raises(ValueError, match=r"x.npy.*1 non-finite pixel value"):
        load_image(str(tmp_path / "x.npy"), (4, 4))
    (tmp_path / "d.json").write_bytes(b'[{"id": 1},\n{"id": "\xff"}]')
    with pytest.raises(ValueError, match=r"d.json:2: not UTF-8 text \(byte 0xff"):
        read_json_records(str(tmp_path / "d.json"))
    (tmp_path / "ok.json").write_text(json.dumps([{"id": 1}]))
    assert read_json_records(str(tmp_path / "ok.json")) == [{"id": 1}]
