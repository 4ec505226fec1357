"""Early stops (regate_megatron.training.preemption): a signal, a time budget or an exit interval
end the run after a whole step with a checkpoint, exit status 0 and a marker naming why.
Multi-rank agreement and requeue on SLURM: tests/test_slurm.py."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from fixtures_data import mixed_records, synthetic_corpus, write_records

from regate_megatron.training.preemption import MARKER, EarlyStop, read_marker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(tmp_path, **kw):
    base = dict(exit_signal_handler=True, exit_signal="SIGTERM", exit_duration_in_mins=None,
                exit_interval=None, save=str(tmp_path))
    base.update(kw)
    return argparse.Namespace(**base)


def test_signal_sets_a_flag_acted_on_at_the_step_boundary(tmp_path):
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        (tmp_path / MARKER).write_text("{}")  # a stale marker of the run this one resumes
        stop = EarlyStop(_args(tmp_path))
        assert not (tmp_path / MARKER).exists()
        assert not stop.requested(1)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal wins
        assert stop.requested(2)
        stop.finish(2)
        assert read_marker(str(tmp_path)) == dict(reason="signal", signal="SIGUSR1", iteration=2)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_duration_and_interval(tmp_path):
    stop = EarlyStop(_args(tmp_path, exit_signal_handler=False, exit_duration_in_mins=1e-6))
    time.sleep(0.01)
    assert stop.requested(1) and stop.reason == "duration"
    stop = EarlyStop(_args(tmp_path, exit_signal_handler=False, exit_interval=3))
    assert [stop.requested(i) for i in (1, 2, 3)] == [False, False, True]
    assert stop.reason == "interval"
    assert not stop.signals and read_marker(str(tmp_path / "none")) is None


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    """regate-train --exit-signal-handler, SIGTERM mid-run: a checkpoint at the step it
    stopped after, exit 0, the marker; --load = --save started from scratch."""
    from regate_megatron.data.tokenizer import train_sentencepiece

    train_sentencepiece(synthetic_corpus(), str(tmp_path / "tok"), vocab_size=128)
    write_records(tmp_path / "train.json", mixed_records(str(tmp_path)) * 3)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-u", "-m", "regate_megatron.training.train", "--num-layers", "2",
           "--hidden-size", "16", "--num-attention-heads", "4", "--seq-length", "48",
           "--img-h", "8", "--img-w", "8", "--patch-dim", "4", "--micro-batch-size", "2",
           "--lr", "1e-3", "--train-iters", "100000", "--data-path", "train.json",
           "--tokenizer-model", "tok.model", "--no-progress", "--log-interval", "1",
           "--save", "ckpt", "--load", "ckpt", "--exit-signal-handler"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # the first step's log line: the handler is in place
        lines.append(line)
        if "] step 1 " in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    log = "".join(lines) + out
    assert proc.returncode == 0, err[-4000:]
    assert "no checkpoint in ckpt yet" in log
    marker = json.loads((tmp_path / "ckpt" / MARKER).read_text())
    assert marker["reason"] == "signal" and marker["signal"] == "SIGTERM"
    assert 1 <= marker["iteration"] < 100000
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == \
        str(marker["iteration"])
    assert f"stopped early (signal SIGTERM) after iteration {marker['iteration']}" in log
