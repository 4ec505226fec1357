"""`regate-train` and `regate-precompute-ref` end to end, as users run them (subprocesses,
torchrun on gloo for multi-rank).

One module-scoped workspace: tokenizer, LLaVA-format records with 0/1/2 images, a text-only
teacher trained by `regate-train --text-only`, its reference-loss store, and a ReGATE
student checkpoint at iteration 2. Every later run continues from that checkpoint, so
TP2 / PP2 / DP2 runs can be compared with the one-rank run step by step.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from fixtures_data import mixed_records, synthetic_corpus, write_records

SEQ = 48
TINY = [
    "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4",
    "--seq-length", str(SEQ), "--img-h", "8", "--img-w", "8", "--patch-dim", "4",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--lr", "3e-3", "--lr-decay-style", "constant",
    "--no-progress", "--log-interval", "1", "--seed", "7",
    "--make-vocab-size-divisible-by", "64",  # 128 tokens: the same padded vocabulary at TP1 and TP2
]
EVAL = ["--valid-data-path", "valid.json", "--eval-interval", "4", "--eval-max-new-tokens", "6"]
REGATE = ["--regate", "--regate-keep-ratio", "0.4", "--regate-cycle-steps", "3",
          "--regate-dense-steps", "1"]


def _run(cmd, cwd, nproc=1, expect_ok=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), "-m"] + cmd
    else:
        cmd = [sys.executable, "-m"] + cmd
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(ws, *flags, nproc=1, expect_ok=True):
    return _run(["regate_megatron.training.train", *TINY, "--data-path", "train.json",
                 "--tokenizer-model",
                 "tok.model", *flags], ws, nproc, expect_ok)


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from regate_megatron.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("cli")
    train_sentencepiece(synthetic_corpus(), str(root / "tok"), vocab_size=128)
    records = mixed_records(str(root))
    write_records(root / "train.json", records * 6)
    write_records(root / "valid.json", records)
    train(root, "--text-only", "--train-iters", "3", "--save", "teacher")
    _run(["regate_megatron.tools.precompute", "--data-path", "train.json", "--tokenizer-model",
          "tok.model", "--load", "teacher", "--output", "store", "--seq-length", str(SEQ),
          "--img-h", "8", "--img-w", "8", "--patch-dim", "4", "--no-progress",
          "--micro-batch-size", "3", "--shard-size", "5"], root)
    train(root, *REGATE, "--regate-ref-store", "store", "--train-iters", "2", "--save", "ckpt2",
          "--language-model-checkpoint", "teacher")
    # The uninterrupted reference: 4 steps straight.
    train(root, *REGATE, "--regate-ref-store", "store", "--train-iters", "4", "--save", "full",
          "--language-model-checkpoint", "teacher", "--metrics-jsonl", "full.jsonl", *EVAL)
    return root


def _final_weights(ws, ckpt):
    """Model weights of the latest checkpoint under ws/ckpt (dense numpy arrays by name)."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from regate_megatron.training.checkpoint import iteration_dir, latest_iteration

    path = iteration_dir(str(ws / ckpt), latest_iteration(str(ws / ckpt)))
    meta = FileSystemReader(path).read_metadata()
    names = [k for k, v in meta.state_dict_metadata.items()
             if isinstance(v, TensorStorageMetadata) and not k.startswith("optimizer")
             and not k.startswith("regate") and "_extra_state" not in k]
    state = {k: torch.empty(meta.state_dict_metadata[k].size,
                            dtype=meta.state_dict_metadata[k].properties.dtype) for k in names}
    load(state, checkpoint_id=path, no_dist=True)
    return {k: v.numpy() for k, v in state.items()}


def test_resume_equals_uninterrupted(ws):
    train(ws, *REGATE, "--regate-ref-store", "store", "--train-iters", "4", "--load", "ckpt2",
          "--save", "resumed", "--metrics-jsonl", "resumed.jsonl")
    full = metrics(ws / "full.jsonl")
    resumed = metrics(ws / "resumed.jsonl")
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("lm_loss", "keep_ratio", "target_tokens", "kept_target_tokens",
                    "cum_kept_target_tokens", "layer_tokens", "grad_norm"):
            assert a[key] == b[key], (key, a, b)
    assert [m["keep_ratio"] for m in full] == [1.0, 0.4, 0.4, 1.0]
    assert full[1]["kept_target_tokens"] < full[1]["target_tokens"]
    want, got = _final_weights(ws, "full"), _final_weights(ws, "resumed")
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        np.testing.assert_array_equal(want[name], got[name], err_msg=name)
    # The "latest" pointer names the last iteration; no temporary directory is left.
    assert (ws / "resumed" / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert not [p for p in os.listdir(ws / "resumed") if p.endswith(".tmp")]


def test_recomputed_run_trains_like_the_stored_one(ws):
    """Full recomputation of the routed language model and of the vision encoder: steps 3-4
    resumed from the step-2 checkpoint are the uninterrupted run's, bit for bit."""
    train(ws, *REGATE, "--regate-ref-store", "store", "--train-iters", "4", "--load", "ckpt2",
          "--metrics-jsonl", "recomputed.jsonl", "--recompute-granularity", "full",
          "--recompute-method", "uniform", "--recompute-num-layers", "1", "--recompute-vision")
    full, got = metrics(ws / "full.jsonl")[2:], metrics(ws / "recomputed.jsonl")
    assert [m["step"] for m in got] == [3, 4] and got[0]["keep_ratio"] < 1.0
    for a, b in zip(full, got):
        for key in ("lm_loss", "grad_norm", "kept_target_tokens", "layer_tokens"):
            assert a[key] == b[key], (key, a, b)


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2"],
    ["--pipeline-model-parallel-size", "2"],
    [],  # two ranks of data parallelism: the EMA exchange and DP2 resharding of its state
])
def test_two_ranks_continue_like_one(ws, layout):
    """TP2, PP2 and DP2 resume the one-rank checkpoint and train steps 3-4 like one rank."""
    name = "x".join(layout[::2]).strip("-") or "dp2"
    out = f"{name}.jsonl"
    train(ws, *REGATE, "--regate-ref-store", "store", "--train-iters", "4", "--load", "ckpt2",
          "--metrics-jsonl", out, *EVAL, *layout, nproc=2)
    full, got = metrics(ws / "full.jsonl")[2:], metrics(ws / out)
    assert [m["step"] for m in got] == [3, 4]
    for a, b in zip(full, got):
        assert b["keep_ratio"] == a["keep_ratio"]
        assert b["kept_target_tokens"] == a["kept_target_tokens"]
        assert b["target_tokens"] == a["target_tokens"]
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5)
    # dense held-out evaluation (loss and greedy decode) agrees with one rank too
    assert got[-1]["eval_loss"] == pytest.approx(full[-1]["eval_loss"], rel=1e-5)
    assert got[-1]["eval_accuracy"] == full[-1]["eval_accuracy"]
    assert got[-1]["eval_samples"] == full[-1]["eval_samples"] == 4


def test_dense_two_rank_runs_with_eval(ws):
    """Dense (no --regate) student under PP2 with held-out greedy-decode evaluation."""
    train(ws, "--train-iters", "2", "--pipeline-model-parallel-size", "2", "--valid-data-path",
          "valid.json", "--eval-interval", "2", "--metrics-jsonl", "dense_pp2.jsonl",
          "--eval-max-new-tokens", "4", "--tensorboard-dir", "tb", nproc=2)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(ws / "tb"))
    rows = metrics(ws / "dense_pp2.jsonl")
    assert [m["keep_ratio"] for m in rows] == [1.0, 1.0]
    assert all(m["kept_target_tokens"] == m["target_tokens"] for m in rows)
    assert rows[-1]["eval_samples"] == 4 and 0.0 <= rows[-1]["eval_accuracy"] <= 1.0
    assert np.isfinite(rows[-1]["eval_loss"])


def test_distributed_optimizer_resume(ws):
    """DP2 with the distributed optimizer: stop at 2 and resume to 3 == 3 straight."""
    flags = [*REGATE, "--regate-ref-store", "store", "--use-distributed-optimizer",
             "--language-model-checkpoint", "teacher"]
    train(ws, *flags, "--train-iters", "3", "--metrics-jsonl", "do_full.jsonl", nproc=2)
    train(ws, *flags, "--train-iters", "2", "--save", "do_ckpt", nproc=2)
    train(ws, *flags, "--train-iters", "3", "--load", "do_ckpt", "--metrics-jsonl",
          "do_resumed.jsonl", nproc=2)
    full, resumed = metrics(ws / "do_full.jsonl"), metrics(ws / "do_resumed.jsonl")
    assert [m["step"] for m in resumed] == [3]
    for key in ("lm_loss", "kept_target_tokens", "grad_norm"):
        assert resumed[0][key] == full[2][key], key


def test_precompute_two_ranks_equals_one(ws):
    from regate_megatron.scoring.ref_store import RefLossStore

    _run(["regate_megatron.tools.precompute", "--data-path", "train.json", "--tokenizer-model",
          "tok.model", "--load", "teacher", "--output", "store2", "--seq-length", str(SEQ),
          "--img-h", "8", "--img-w", "8", "--patch-dim", "4", "--no-progress",
          "--micro-batch-size", "2", "--shard-size", "4"], ws, nproc=2)
    one, two = RefLossStore.open(str(ws / "store")), RefLossStore.open(str(ws / "store2"))
    assert one.meta == two.meta
    np.testing.assert_array_equal(np.asarray(one.offsets), np.asarray(two.offsets))
    # float16 storage: equal up to one float16 rounding step of the batch-size-dependent sums
    np.testing.assert_allclose(np.asarray(one.values, dtype=np.float32),
                               np.asarray(two.values, dtype=np.float32), rtol=1e-3, atol=1e-3)


def test_bad_inputs_fail_before_step_one(ws):
    # unknown flag (argparse, exit 2)
    proc = train(ws, "--train-iters", "1", "--no-such-flag", expect_ok=False)
    assert proc.returncode == 2 and "--no-such-flag" in proc.stderr
    # a bad ReGATE value names its flag
    proc = train(ws, "--train-iters", "1", "--regate", "--regate-ref-store", "store",
                 "--regate-keep-ratio", "1.5", expect_ok=False)
    assert proc.returncode == 2 and "--regate-keep-ratio" in proc.stderr
    # --regate without a store
    proc = train(ws, "--train-iters", "1", "--regate", expect_ok=False)
    assert proc.returncode != 0 and "--regate-ref-store" in proc.stderr
    # a store built for other data: named, before any step (no metrics written)
    records = mixed_records(str(ws))
    write_records(ws / "other.json", records * 5)
    proc = _run(["regate_megatron.training.train", *TINY, "--data-path", "other.json",
                 "--tokenizer-model",
                 "tok.model", "--train-iters", "1", "--regate", "--regate-ref-store", "store",
                 "--metrics-jsonl", "bad.jsonl"], ws, expect_ok=False)
    assert proc.returncode == 2 and "regate-precompute-ref" in proc.stderr
    assert not (ws / "bad.jsonl").exists()
    # a bad record: named by its id, with the fix
    bad = records + [{"id": "broken", "image": "missing.png",
                      "conversations": records[0]["conversations"]}]
    write_records(ws / "bad.json", bad)
    proc = _run(["regate_megatron.training.train", *TINY, "--data-path", "bad.json",
                 "--tokenizer-model",
                 "tok.model", "--train-iters", "1", "--metrics-jsonl", "bad.jsonl"], ws,
                expect_ok=False)
    assert proc.returncode == 2 and "broken" in proc.stderr and "--skip-bad-samples" in proc.stderr
    assert not (ws / "bad.jsonl").exists()
    # a teacher trained with another tokenizer: refused before any teacher compute
    from regate_megatron.data.tokenizer import train_sentencepiece

    train_sentencepiece([line.upper() for line in synthetic_corpus()], str(ws / "other_tok"),
                        vocab_size=100)
    proc = _run(["regate_megatron.tools.precompute", "--data-path", "train.json",
                 "--tokenizer-model",
                 "other_tok.model", "--load", "teacher", "--output", "store_bad",
                 "--seq-length", str(SEQ), "--img-h", "8", "--img-w", "8", "--patch-dim", "4"],
                ws, expect_ok=False)
    assert proc.returncode == 2 and "share the tokenizer" in proc.stderr
    assert not (ws / "store_bad").exists()
    # ... and --skip-bad-samples trains on the rest
    train_ok = _run(["regate_megatron.training.train", *TINY, "--data-path", "bad.json",
                     "--tokenizer-model",
                     "tok.model", "--train-iters", "1", "--skip-bad-samples"], ws)
    assert "skipped 1 bad records" in train_ok.stdout


def test_bf16_and_optimizer_layout_guard(ws):
    """--bf16 trains (Float16Module, bf16 images); resuming with another optimizer layout is
    refused with the flag to use."""
    train(ws, *REGATE, "--regate-ref-store", "store", "--train-iters", "2", "--bf16",
          "--language-model-checkpoint", "teacher", "--metrics-jsonl", "bf16.jsonl")
    rows = metrics(ws / "bf16.jsonl")
    assert len(rows) == 2 and all(np.isfinite(m["lm_loss"]) for m in rows)
    assert rows[1]["kept_target_tokens"] < rows[1]["target_tokens"]
    proc = train(ws, *REGATE, "--regate-ref-store", "store", "--train-iters", "3",
                 "--load", "ckpt2", "--use-distributed-optimizer",
                 "--metrics-jsonl", "layout.jsonl", expect_ok=False)
    assert proc.returncode == 2 and "--use-distributed-optimizer" in proc.stderr
    assert not (ws / "layout.jsonl").exists()


def test_keep_ratio_one_is_the_dense_run(ws):
    """--regate at rho = 1 trains exactly like the run without --regate (same losses, norms)."""
    common = ["--train-iters", "3", "--language-model-checkpoint", "teacher"]
    train(ws, *common, "--metrics-jsonl", "plain.jsonl")
    train(ws, *common, "--regate", "--regate-ref-store", "store", "--regate-keep-ratio", "1.0",
          "--metrics-jsonl", "rho1.jsonl")
    plain, rho1 = metrics(ws / "plain.jsonl"), metrics(ws / "rho1.jsonl")
    for a, b in zip(plain, rho1):
        for key in ("lm_loss", "grad_norm", "target_tokens", "kept_target_tokens", "layer_tokens"):
            assert a[key] == b[key], key
    # the ReGATE run's first (dense) step is the plain run's first step as well
    assert metrics(ws / "full.jsonl")[0]["lm_loss"] == plain[0]["lm_loss"]


@pytest.mark.parametrize("selector", ["random", "excess"])
def test_selector_resume_equals_uninterrupted(ws, selector):
    """--regate-selector random (no store) / excess: stop at 2, resume to 4 == 4 straight, with
    the regate run's schedule and keep counts (only the kept targets differ)."""
    import shutil

    from regate_megatron.training.checkpoint import iteration_dir

    flags = [*REGATE, "--regate-selector", selector, "--language-model-checkpoint", "teacher"]
    if selector == "excess":
        flags += ["--regate-ref-store", "store"]
    # 4 straight, saving at 2 and 4; the copy that stops at 2 is resumed to 4.
    train(ws, *flags, "--train-iters", "4", "--save", f"{selector}_full", "--save-interval", "2",
          "--metrics-jsonl", f"{selector}_full.jsonl")
    stopped = ws / f"{selector}_at2"
    shutil.copytree(ws / f"{selector}_full", stopped)
    shutil.rmtree(iteration_dir(str(stopped), 4))
    (stopped / "latest_checkpointed_iteration.txt").write_text("2")
    train(ws, *flags, "--train-iters", "4", "--load", f"{selector}_at2", "--save",
          f"{selector}_resumed", "--metrics-jsonl", f"{selector}_resumed.jsonl")
    full = metrics(ws / f"{selector}_full.jsonl")
    resumed = metrics(ws / f"{selector}_resumed.jsonl")
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed, strict=True):
        for key in ("lm_loss", "keep_ratio", "kept_target_tokens", "cum_kept_target_tokens",
                    "grad_norm"):
            assert a[key] == b[key], (key, a, b)
    want, got = _final_weights(ws, f"{selector}_full"), _final_weights(ws, f"{selector}_resumed")
    for name in want:
        np.testing.assert_array_equal(want[name], got[name], err_msg=name)
    regate = metrics(ws / "full.jsonl")
    for key in ("keep_ratio", "kept_target_tokens", "target_tokens"):
        assert [m[key] for m in full] == [m[key] for m in regate], key


def test_ablate_on_a_llava_dataset(ws):
    """regate-ablate on any LLaVA data set (data, tokenizer, store, teacher, and the model flags
    after --), with a teacher ablation store built from a checkpoint; a second call skips the
    finished runs."""
    model = [f for i, f in enumerate(TINY) if "--seed" not in TINY[max(i - 1, 0):i + 1]]
    cmd = ["regate_megatron.tools.ablate", "--workdir", "abl", "--data-path", "train.json",
           "--valid-data-path", "valid.json", "--tokenizer-model", "tok.model",
           "--ref-store", "store", "--language-model-checkpoint", "teacher",
           "--variants", "random", "excess", "--seeds", "1", "--steps", "2",
           "--eval-interval", "2", "--eval-batches", "1", "--teacher-checkpoints", "teacher",
           "--", *model, "--eval-max-new-tokens", "4"]
    proc = _run(cmd, ws)
    result = json.loads((ws / "abl" / "ablation.json").read_text())
    assert sorted(result["runs"]) == ["dense-s1234", "excess-s1234", "random-s1234",
                                      "teacher-teacher-s1234"]
    assert sorted(result["variants"]) == ["dense", "excess", "random", "teacher-teacher"]
    assert "| random |" in proc.stdout and (ws / "abl" / "ablation.png").stat().st_size > 0
    rows = metrics(ws / "abl" / "runs" / "random-s1234.jsonl")
    assert [m["keep_ratio"] for m in rows] == [1.0, 0.3] and rows[-1]["eval_samples"] == 4
    again = _run(cmd, ws)
    assert "0 runs executed, 4 already finished" in again.stdout
    (ws / "abl" / "runs" / "excess-s1234.jsonl").unlink()  # as if still running
    split = cmd.index("--")
    partial = _run([*cmd[:split], "--report-only", *cmd[split:]], ws)
    assert "over the 3 finished of 4 runs" in partial.stdout and "| excess |" not in partial.stdout
