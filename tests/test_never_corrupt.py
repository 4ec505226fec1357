"""Never corrupt a run (issue 9), as users run `regate-train`.

- a NaN/inf loss or gradient stops every rank at that step, named; nothing non-finite is
  saved or pointed at; the metrics file stays strict JSON;
- a resume honours or refuses changed flags (the resume rule in README "Resuming");
- the global batch and the data position survive a change of data-parallel size;
- a killed trainer leaves no checkpoint-writer process behind; stale iter_*.tmp are removed;
- bad inputs fail before step 1 with one line naming the input and the fix.

One module-scoped workspace: tokenizer, records, and a reference-loss store written
directly (synthetic teacher losses; the store's checks are the real ones). Input errors
that arise before any process group exists run `regate_megatron.training.train.main` in-process
(its exit status and stderr are what the command line gives); everything else is a
subprocess (torchrun on gloo for several ranks).
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fixtures_data import mixed_records, synthetic_corpus, write_records
from test_cli import SEQ, _run, metrics

# test_cli's tiny LLaVA, without --global-batch-size (it comes from micro x DP or the checkpoint)
TINY = [
    "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4",
    "--seq-length", str(SEQ), "--img-h", "8", "--img-w", "8", "--patch-dim", "4",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "3e-3",
    "--lr-decay-style", "constant", "--no-progress", "--log-interval", "1", "--seed", "7",
    "--make-vocab-size-divisible-by", "64",
]
REGATE = ["--regate", "--regate-ref-store", "store", "--regate-keep-ratio", "0.4",
          "--regate-cycle-steps", "3", "--regate-dense-steps", "1"]


def train(ws, *flags, nproc=1, expect_ok=True):
    return _run(["regate_megatron.training.train", *TINY, "--data-path", "train.json",
                 "--tokenizer-model",
                 "tok.model", *flags], ws, nproc, expect_ok)


def train_in_process(ws, monkeypatch, capsys, *flags):
    """`regate-train ...` in this process (for errors before any process group): exit status,
    stderr."""
    from regate_megatron.training.train import main

    monkeypatch.chdir(ws)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        code = main([*TINY, "--data-path", "train.json", "--tokenizer-model", "tok.model",
                     *flags])
    except SystemExit as exit_:  # flag validation (argparse-style)
        code = exit_.code if isinstance(exit_.code, int) else 1
        if not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
    return code, capsys.readouterr().err


def one_error_line(stderr: str) -> str:
    """The error of a failed run: one line, no traceback from the trainer's code (torchrun's
    own report of a failed child is the launcher's)."""
    launcher = ("torch/distributed/run.py", "torch/distributed/launcher/",
                "torch/distributed/elastic/", "<frozen runpy>")
    frames = [line for line in stderr.splitlines() if line.lstrip().startswith('File "')]
    assert not [f for f in frames if not any(part in f for part in launcher)], stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("regate-train:")]
    assert lines, stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from regate_megatron.data.llava import ConversationDataset
    from regate_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from regate_megatron.scoring.ref_store import write_store

    root = tmp_path_factory.mktemp("never_corrupt")
    train_sentencepiece(synthetic_corpus(), str(root / "tok"), vocab_size=128)
    records = mixed_records(str(root))
    write_records(root / "train.json", records * 6)
    tok = SentencePieceTokenizer(str(root / "tok.model"))
    data = ConversationDataset(str(root / "train.json"), tok, seq_length=SEQ, num_image_tokens=4,
                               image_size=(8, 8))
    rng = np.random.default_rng(0)
    write_store(str(root / "store"),
                [rng.uniform(0.5, 4.0, int(n)) for n in data.target_counts()],
                dict(teacher="synthetic", tokenizer_sha256=tok.sha256,
                     dataset_fingerprint=data.fingerprint, teacher_visual="pad"))
    return root


# ----------------------------------------------------------------------------- 1. NaN guard
def _assert_nothing_non_finite_saved(ckpt):
    """Every saved checkpoint holds finite tensors only; returns the pointer's iteration."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from regate_megatron.training.checkpoint import iteration_dir, latest_iteration

    latest = latest_iteration(str(ckpt))
    for name in sorted(os.listdir(ckpt)):
        if not name.startswith("iter_"):
            continue
        assert not name.endswith(".tmp"), name
        path = iteration_dir(str(ckpt), int(name[5:]))
        meta = FileSystemReader(path).read_metadata()
        state = {k: torch.empty(v.size, dtype=v.properties.dtype)
                 for k, v in meta.state_dict_metadata.items()
                 if isinstance(v, TensorStorageMetadata) and v.properties.dtype.is_floating_point
                 and "regate" not in k}  # the EMA table is NaN where never observed, by design
        load(state, checkpoint_id=path, no_dist=True)
        for key, tensor in state.items():
            assert torch.isfinite(tensor).all(), (name, key)
    return latest


def _strict_rows(path):
    def refuse(constant):
        raise AssertionError(f"bare {constant} in {path}")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f if line.strip()]


def test_nan_stops_the_run_at_its_step_dense_and_regate(ws):
    """--lr 1e6 diverges: the run stops at the first non-finite step, naming step, loss, lr
    and samples; no checkpoint after it, the pointer on the last finite one; strict JSON."""
    proc = train(ws, "--micro-batch-size", "2", "--train-iters", "8", "--lr", "1e6",
                 "--save", "nan_dense", "--save-interval", "1", "--metrics-jsonl",
                 "nan_dense.jsonl", expect_ok=False)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-2000:]
    rows = _strict_rows(ws / "nan_dense.jsonl")
    step = len(rows) + 1
    assert f"step {step}:" in line and "lr 1e+06" in line and "samples [" in line, line
    assert "loss nan" in line or "loss inf" in line or "non-finite gradients" in line, line
    assert all(math.isfinite(r["lm_loss"]) for r in rows)
    assert _assert_nothing_non_finite_saved(ws / "nan_dense") == len(rows)
    assert not (ws / "nan_dense" / f"iter_{step:07d}").exists()

    # with the check off (and ReGATE on: the EMA leaves the non-finite steps out) the run
    # trains on, but never saves the NaN weights, and the metrics file stays strict JSON (null)
    proc = train(ws, *REGATE, "--micro-batch-size", "2", "--train-iters", "8", "--lr", "1e6",
                 "--no-check-for-nan-in-loss-and-grad", "--save", "nan_off", "--save-interval",
                 "1", "--metrics-jsonl", "nan_off.jsonl", expect_ok=False)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "refusing to save" in line, proc.stderr[-2000:]
    rows = _strict_rows(ws / "nan_off.jsonl")
    assert rows[-1]["lm_loss"] is None or rows[-1]["grad_norm"] is None, rows[-1]
    assert f"iteration {len(rows)}:" in line, line
    assert _assert_nothing_non_finite_saved(ws / "nan_off") == len(rows) - 1

    # with ReGATE under PP2 (the loss lives on the last stage only): every rank stops at the
    # step, before the EMA update and before any checkpoint of the diverged weights
    proc = train(ws, *REGATE, "--micro-batch-size", "2", "--global-batch-size", "4",
                 "--pipeline-model-parallel-size", "2", "--train-iters", "8", "--lr", "1e6",
                 "--save", "nan_regate", "--save-interval", "1", "--metrics-jsonl",
                 "nan_regate.jsonl", nproc=2, expect_ok=False)
    assert proc.returncode != 0
    line = one_error_line(proc.stderr)
    rows = _strict_rows(ws / "nan_regate.jsonl")
    assert f"step {len(rows) + 1}:" in line and "lr 1e+06" in line, line
    assert _assert_nothing_non_finite_saved(ws / "nan_regate") == len(rows)
    # both ranks reported the same step (no rank hung or went on)
    assert proc.stderr.count(f"error: step {len(rows) + 1}:") == 2, proc.stderr[-3000:]


def test_non_finite_pixels_are_a_data_error(ws, monkeypatch, capsys):
    np.save(ws / "nan.npy", np.full((6, 6), np.nan, dtype=np.float32))
    records = mixed_records(str(ws))
    records[0] = dict(records[0], id="nanimg", image="nan.npy")
    write_records(ws / "nan_img.json", records)
    code, err = train_in_process(ws, monkeypatch, capsys, "--train-iters", "1",
                                 "--data-path", "nan_img.json")
    assert code == 2 and "nanimg" in err and "nan.npy" in err and "non-finite" in err, err


# ------------------------------------------------------------------ 2. the resume rule
def test_resume_extends_refuses_or_overrides_the_schedule(ws, monkeypatch, capsys):
    dense = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr-decay-style", "linear"]
    train(ws, *dense, "--train-iters", "3", "--save", "rr", "--metrics-jsonl", "rr.jsonl")
    assert [r["lr"] for r in metrics(ws / "rr.jsonl")] == pytest.approx([2e-3, 1e-3, 0.0])

    # a longer --train-iters extends the decay (horizon = --train-iters): steps 4-6 run on the
    # 6-step schedule, not at lr 0; a torn last metrics line (a kill mid-write) is dropped
    with open(ws / "rr.jsonl", "a") as f:
        f.write('{"step": 4, "lm_lo')
    proc = train(ws, *dense, "--train-iters", "6", "--load", "rr", "--save", "rr",
                 "--metrics-jsonl", "rr.jsonl")
    assert "LR decay horizon follows --train-iters: 3 -> 6" in proc.stdout
    assert "rr.jsonl:4: dropping a torn last line" in proc.stderr
    rows = _strict_rows(ws / "rr.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in rows[3:]] == pytest.approx([1e-3, 5e-4, 0.0])

    # changed schedule, architecture, seed or global batch: refused before step 1, both values
    # named in one line (before any process group or tensor)
    code, err = train_in_process(ws, monkeypatch, capsys, *dense, "--train-iters", "9",
                                 "--load", "rr", "--lr", "5e-2", "--lr-decay-style", "constant",
                                 "--hidden-size", "32", "--num-layers", "4", "--seed", "8",
                                 "--global-batch-size", "2", "--micro-batch-size", "1")
    line = one_error_line(err)
    assert code == 2, err
    for want in ("--lr 0.05 (checkpoint 0.003)", "--lr-decay-style constant (checkpoint linear)",
                 "--hidden-size 32 (checkpoint 16)", "--num-layers 4 (checkpoint 2)",
                 "--seed 8 (checkpoint 7)", "--global-batch-size 2 (checkpoint 4)",
                 "--override-opt_param-scheduler"):
        assert want in line, (want, line)
    code, err = train_in_process(ws, monkeypatch, capsys, *dense, "--train-iters", "6",
                                 "--load", "rr")
    assert code == 2 and "already at iteration 6" in one_error_line(err), err
    assert len(metrics(ws / "rr.jsonl")) == 6  # refused runs wrote nothing

    # --override-opt_param-scheduler: the command line's schedule, the checkpoint's step count
    proc = train(ws, *dense, "--train-iters", "8", "--load", "rr", "--lr", "5e-2",
                 "--lr-decay-style", "constant", "--override-opt_param-scheduler",
                 "--metrics-jsonl", "rr.jsonl")
    rows = _strict_rows(ws / "rr.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["lr"] for r in rows[6:]] == pytest.approx([5e-2, 5e-2])


# ------------------------------------------------- 3. global batch and data position vs DP
def _common_state(ckpt):
    from regate_megatron.training.checkpoint import read_common_state

    return read_common_state(str(ckpt))


def test_dp_size_changes_keep_global_batch_and_data_position(ws):
    """Without --global-batch-size the global batch (4) is the checkpoint's at any DP size:
    DP4 -> DP2 -> DP1 -> DP2 resumes train steps 3-6 like the uninterrupted run (EMA carried)."""
    train(ws, *REGATE, "--micro-batch-size", "4", "--train-iters", "6", "--metrics-jsonl",
          "dp_full.jsonl")
    full = {r["step"]: r for r in metrics(ws / "dp_full.jsonl")}
    train(ws, *REGATE, "--micro-batch-size", "1", "--train-iters", "2", "--save", "dp4", nproc=4)
    chain = [  # (DP size, micro-batch, from, to, train-iters)
        (2, "1", "dp4", "dp2", "4"),   # DP4 -> DP2
        (1, "2", "dp2", "dp1", "5"),   # DP2 -> DP1
        (2, "1", "dp1", "dp2b", "6"),  # DP1 -> DP2
    ]
    for dp, micro, src, dst, iters in chain:
        proc = train(ws, *REGATE, "--micro-batch-size", micro, "--train-iters", iters,
                     "--load", src, "--save", dst, "--metrics-jsonl", f"{dst}.jsonl", nproc=dp)
        assert "global batch size 4 from the checkpoint" in proc.stdout
        got = metrics(ws / f"{dst}.jsonl")
        start = int(_common_state(ws / src)["iteration"])
        assert [r["step"] for r in got] == list(range(start + 1, int(iters) + 1)), (dst, got)
        for row in got:
            want = full[row["step"]]
            for key in ("keep_ratio", "target_tokens", "kept_target_tokens"):
                assert row[key] == want[key], (dst, key, row, want)
            assert row["lm_loss"] == pytest.approx(want["lm_loss"], rel=1e-5), (dst, row, want)
            assert row["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (dst, row)
        common = _common_state(ws / dst)
        assert common["consumed_samples"] == 4 * int(iters) == 4 * common["iteration"]
        assert common["run_state"]["global_batch_size"] == 4


# ------------------------------------------------------------ 4. no orphan checkpoint writers
def _session_processes(sid):
    """Live (non-zombie) processes of session `sid`: [(pid, state, ppid)]."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid, session = fields[0], int(fields[1]), int(fields[3])
        if session == sid and state not in ("Z", "X"):
            out.append((int(name), state, ppid))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_trainer_leaves_no_writer_and_stale_tmp_is_removed(ws, monkeypatch, capsys):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "regate_megatron.training.train", *TINY, "--data-path",
           "train.json",
           "--tokenizer-model", "tok.model", "--micro-batch-size", "2", "--train-iters", "400",
           "--save", "killed", "--save-interval", "1"]
    proc = subprocess.Popen(cmd, cwd=ws, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # kill -9 mid-save: while a checkpoint writer (a child of the trainer) is alive, or at
        # the latest once two checkpoints were written. A child before --save exists is no
        # writer (importing Megatron-Core 0.19 runs `git rev-parse` for its version string).
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            children = [p for p in _session_processes(proc.pid) if p[2] == proc.pid]
            writing = bool(children) and (ws / "killed").is_dir()
            if writing or (ws / "killed" / "iter_0000003").exists():
                break
            time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _session_processes(proc.pid) == [], "processes outlived the killed trainer"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.stderr.close()
    # the next start (here one that then fails on its data) removes what the kill left
    (ws / "killed" / "iter_0000099.tmp").mkdir(exist_ok=True)
    (ws / "killed" / "iter_0000099.tmp" / "half.distcp").write_bytes(b"x")
    (ws / "latin1.json").write_bytes('[{"id": "é"}]'.encode("latin-1"))
    code, err = train_in_process(ws, monkeypatch, capsys, "--train-iters", "1", "--save",
                                 "killed", "--data-path", "latin1.json")
    assert code == 2 and "latin1.json:1: not UTF-8" in one_error_line(err), err
    assert not [p for p in os.listdir(ws / "killed") if p.endswith(".tmp")]


# -------------------------------------------------------------- 5. bad inputs, named, early
def test_bad_inputs_fail_before_step_one_naming_the_input(ws, monkeypatch, capsys):
    import shutil

    def fails(needles, *flags, code=2):
        got, err = train_in_process(ws, monkeypatch, capsys, "--train-iters", "2", *flags)
        line = one_error_line(err)
        assert got == code, err
        for needle in needles:
            assert needle in line, (needle, line)

    fails(["--micro-batch-size must be >= 1, got 0"], "--micro-batch-size", "0", code=1)
    fails(["--train-iters must be >= 1, got 0"], "--train-iters", "0", code=1)
    (ws / "afile").write_text("not a directory")
    fails(["--save afile is a file"], "--save", "afile")
    fails(["--save afile/ckpt is not writable"], "--save", "afile/ckpt")

    for name, damage, needle in (("trunc_values", "values.npy", "values.npy is truncated"),
                                 ("trunc_offsets", "offsets.npy", "offsets.npy is truncated"),
                                 ("trunc_meta", "meta.json", "meta.json is truncated or corrupt")):
        shutil.copytree(ws / "store", ws / name)
        path = ws / name / damage
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size - 40)])
        fails([f"reference-loss store {ws / name}", needle, "regate-precompute-ref"],
              "--regate", "--regate-ref-store", name)

    # metrics: a run without --load does not cut (or mix into) another run's file; a file
    # corrupt before its last line is named with the line
    (ws / "other.jsonl").write_text('{"step": 1, "lm_loss": 2.0}\n')
    fails(["--metrics-jsonl other.jsonl already holds", "--load"], "--metrics-jsonl", "other.jsonl")
    assert (ws / "other.jsonl").read_text() == '{"step": 1, "lm_loss": 2.0}\n'
    (ws / "broken.jsonl").write_text('{"step": 1}\n{"step": 2, "lm_l\n{"step": 3}\n')
    (ws / "some_ckpt").mkdir(exist_ok=True)
    fails(["--metrics-jsonl broken.jsonl:2: not a metrics row"], "--metrics-jsonl",
          "broken.jsonl", "--load", "some_ckpt")
