"""The online teacher (`--regate-teacher-ranks`): real launches, students vs the offline store.

One module-scoped workspace: tokenizer, records, a tiny text-only teacher and its offline
store built at micro-batch size 1 (so its float32 sums are composed exactly as the online
teacher's at --regate-teacher-micro-batch-size 1: the stored float16 values are then
bitwise equal, and so is everything the students do).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from fixtures_data import mixed_records, synthetic_corpus, write_records
from test_cli import REGATE, SEQ, TINY, _free_port, _run, metrics, train

ONLINE = ["--regate-teacher-load", "teacher", "--regate-teacher-micro-batch-size", "1"]
COMMON = [*REGATE, "--language-model-checkpoint", "teacher"]
SAME = ("lm_loss", "keep_ratio", "target_tokens", "kept_target_tokens", "layer_tokens",
        "grad_norm")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from regate_megatron.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("online")
    train_sentencepiece(synthetic_corpus(), str(root / "tok"), vocab_size=128)
    write_records(root / "train.json", mixed_records(str(root)) * 6)
    train(root, "--text-only", "--train-iters", "3", "--save", "teacher")
    _run(["regate_megatron.tools.precompute", "--data-path", "train.json", "--tokenizer-model",
          "tok.model", "--load", "teacher", "--output", "store", "--seq-length", str(SEQ),
          "--img-h", "8", "--img-w", "8", "--patch-dim", "4", "--no-progress",
          "--micro-batch-size", "1"], root)
    # the offline reference: two data-parallel students, 4 steps
    train(root, *COMMON, "--regate-ref-store", "store", "--train-iters", "4",
          "--metrics-jsonl", "offline.jsonl", nproc=2)
    return root


def test_two_students_one_teacher_equal_offline(ws):
    """3 ranks: 2 data-parallel students + 1 teacher rank == 2 students with the store."""
    proc = train(ws, *COMMON, *ONLINE, "--regate-teacher-ranks", "1", "--train-iters", "4",
                 "--metrics-jsonl", "online.jsonl", nproc=3)
    assert "world 2 = TP 1 x PP 1 x DP 2" in proc.stdout  # the students' world only
    offline, online = metrics(ws / "offline.jsonl"), metrics(ws / "online.jsonl")
    assert [m["step"] for m in online] == [1, 2, 3, 4]
    for a, b in zip(offline, online, strict=True):
        for key in SAME:
            assert a[key] == b[key], (key, a, b)
        assert b["teacher_wait_s"] >= 0.0
    assert online[1]["kept_target_tokens"] < online[1]["target_tokens"]  # it did select


def test_tp2_students_and_tp2_teacher(ws):
    """4 ranks: TP2 students + a TP2 teacher; the same kept tokens, losses within 1e-5."""
    train(ws, *COMMON, *ONLINE, "--regate-teacher-ranks", "2", "--train-iters", "4",
          "--regate-teacher-tensor-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
          "--metrics-jsonl", "online_tp2.jsonl", nproc=4)
    offline, online = metrics(ws / "offline.jsonl"), metrics(ws / "online_tp2.jsonl")
    for a, b in zip(offline, online, strict=True):
        for key in ("keep_ratio", "target_tokens", "kept_target_tokens", "layer_tokens"):
            assert a[key] == b[key], (key, a, b)
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5)


def test_two_students_and_a_pp2_teacher_equal_offline(ws):
    """4 ranks: 2 data-parallel students + a PP2 teacher (forward-only pipeline schedule in its
    own world): bitwise the offline run (micro-batches of 1 keep the teacher's sums alike)."""
    proc = train(ws, *COMMON, *ONLINE, "--regate-teacher-ranks", "2", "--train-iters", "4",
                 "--regate-teacher-pipeline-model-parallel-size", "2",
                 "--metrics-jsonl", "online_pp2.jsonl", nproc=4)
    assert "online teacher on 2 more ranks = TP 1 x PP 2 x DP 1" in proc.stdout
    offline, online = metrics(ws / "offline.jsonl"), metrics(ws / "online_pp2.jsonl")
    for a, b in zip(offline, online, strict=True):
        for key in SAME:
            assert a[key] == b[key], (key, a, b)


def test_resume_recomputes_the_in_flight_batch(ws):
    """Online, stopped after step 2 (--exit-interval: the teacher, a step ahead, is told to
    stop) and resumed online to step 4 == offline straight through; the resumed run's teacher
    has two data-parallel replicas (the teacher's size may change)."""
    online = [*COMMON, *ONLINE]
    train(ws, *online, "--regate-teacher-ranks", "1", "--train-iters", "4", "--exit-interval",
          "2", "--save", "online_ckpt", nproc=3)
    assert (ws / "online_ckpt" / "latest_checkpointed_iteration.txt").read_text() == "2"
    proc = train(ws, *online, "--regate-teacher-ranks", "2", "--train-iters", "4", "--load",
                 "online_ckpt", "--metrics-jsonl", "online_resumed.jsonl", nproc=4)
    assert "online teacher on 2 more ranks = TP 1 x PP 1 x DP 2" in proc.stdout
    offline, resumed = metrics(ws / "offline.jsonl"), metrics(ws / "online_resumed.jsonl")
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(offline[2:], resumed, strict=True):
        for key in SAME:
            assert a[key] == b[key], (key, a, b)


def _by_hand(ws, *flags, jsonl):
    """2 students + 1 teacher rank started without torchrun (nothing tears the job down for
    them); returns the processes once the students have logged two steps."""
    port = _free_port()
    cmd = [sys.executable, "-m", "regate_megatron.training.train", *TINY, "--data-path",
           "train.json",
           "--tokenizer-model", "tok.model", *COMMON, *ONLINE, "--regate-teacher-ranks", "1",
           "--train-iters", "400", "--metrics-jsonl", jsonl, *flags]
    procs = []
    for rank in range(3):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONWARNINGS="ignore",
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 180
    try:
        while not (ws / jsonl).exists() or len(metrics(ws / jsonl)) < 2:
            assert time.monotonic() < deadline, "the online run made no progress"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.2)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return procs


def test_usr1_stops_students_and_teacher_cleanly(ws):
    """SIGUSR1 to every rank (as srun forwards it): the students finish the step, save and exit
    0; the teacher ignores the signal and exits 0 when the students tell it to."""
    procs = _by_hand(ws, "--exit-signal-handler", "--save", "usr1_ckpt", jsonl="usr1.jsonl")
    try:
        for p in procs:
            p.send_signal(signal.SIGUSR1)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    saved = int((ws / "usr1_ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert saved == len(metrics(ws / "usr1.jsonl")) >= 2


def test_bad_online_flags(ws):
    proc = train(ws, *COMMON, "--regate-teacher-ranks", "1", "--train-iters", "1",
                 expect_ok=False)
    assert proc.returncode == 2 and "--regate-teacher-load" in proc.stderr
    proc = train(ws, *COMMON, *ONLINE, "--regate-teacher-ranks", "1", "--regate-ref-store",
                 "store", "--train-iters", "1", expect_ok=False)
    assert proc.returncode == 2 and "pass one" in proc.stderr
    proc = train(ws, *COMMON, *ONLINE, "--regate-teacher-ranks", "1", "--train-iters", "1",
                 expect_ok=False)  # one process: no student left
    assert proc.returncode != 0
    assert "--regate-teacher-ranks 1 must leave student ranks" in proc.stderr
    # refused before step 1, on every rank: a teacher of another tokenizer, a LLaVA checkpoint
    from regate_megatron.data.tokenizer import train_sentencepiece

    train_sentencepiece([line.upper() for line in synthetic_corpus()], str(ws / "other_tok"),
                        vocab_size=100)
    proc = _run(["regate_megatron.training.train", *TINY, "--data-path", "train.json",
                 "--tokenizer-model", "other_tok.model", *COMMON, *ONLINE,
                 "--regate-teacher-ranks", "1", "--train-iters", "1", "--metrics-jsonl",
                 "bad_tok.jsonl"], ws, nproc=2, expect_ok=False)
    assert proc.returncode != 0 and "share the tokenizer" in proc.stderr
    assert not (ws / "bad_tok.jsonl").exists()
    train(ws, "--train-iters", "1", "--save", "llava")
    proc = train(ws, *COMMON, "--regate-teacher-ranks", "1", "--regate-teacher-load", "llava",
                 "--train-iters", "1", "--metrics-jsonl", "bad_arch.jsonl", nproc=2,
                 expect_ok=False)
    assert proc.returncode != 0 and "not a text-only teacher" in proc.stderr
    assert not (ws / "bad_arch.jsonl").exists()


def test_dead_teacher_ends_the_students_naming_it(ws):
    """The teacher rank is killed mid-run (no launcher to end the job): both students stop
    within --regate-teacher-timeout, naming teacher rank 2."""
    procs = _by_hand(ws, "--regate-teacher-timeout", "5", jsonl="dead.jsonl")
    try:
        procs[2].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        outs = [p.communicate(timeout=60) for p in procs[:2]]
        took = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert took < 60
    for p, (_, err) in zip(procs[:2], outs, strict=True):
        assert p.returncode == 1, err[-2000:]
        assert "teacher rank 2 sent no heartbeat" in err, err[-2000:]
    print(f"students stopped {took:.1f} s after the teacher was killed")
