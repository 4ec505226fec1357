"""`slurm/*.sh` on a real SLURM cluster: a controller and two logical nodes (2 CPUs each)
on this machine, brought up and torn down by `tests/slurm_local.sh` (Debian's slurm-wlm
and munge; `.ci/run` installs them). Nothing is mocked: sbatch, srun, signals, requeue.

One module-scoped workspace: tokenizer, records, a text-only teacher, its reference
store built by `slurm/precompute_ref.sh` (4 data-parallel ranks on 2 nodes). Then, with
examples/tiny.sh and ReGATE on, 2 nodes x 2 tasks:
  - TP2xDP2 and PP2xDP2 jobs match torchrun on one node (4 processes) step by step;
  - USR1 to the batch script mid-run -> checkpoint, exit 0, requeue -> the resumed run
    equals the uninterrupted TP2xDP2 job (metrics and final weights);
  - a rank killed -> the job fails within 60 s, naming the rank.
"""

import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from fixtures_data import mixed_records, synthetic_corpus, write_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 8  # examples/tiny.sh
TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]
STEP_KEYS = ("lm_loss", "keep_ratio", "target_tokens", "kept_target_tokens", "layer_tokens")


def _free_port_base() -> int:
    """A port P with P, P+1, P+2 free (controller, node n1, node n2)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 2 > 65000:
            continue
        try:
            for p in (base + 1, base + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no three consecutive free ports")


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge; .ci/run does it)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root")
    # munged wants every directory above its socket world-executable (pytest's are 0700),
    # and a socket path is limited to ~100 characters: a short directory of its own.
    lab = pathlib.Path(tempfile.mkdtemp(prefix="regate-slurm-"))
    lab.chmod(0o755)
    # Jobs derive MASTER_PORT from the job id: ids of their own keep two sessions apart.
    env = dict(os.environ, SLURMLAB=str(lab), SLURMLAB_PORT=str(_free_port_base()),
               SLURMLAB_FIRST_JOB_ID=str(random.randrange(1000, 19000)))
    script = os.path.join(REPO, "tests", "slurm_local.sh")
    subprocess.run(["bash", script, "up"], env=env, check=True, timeout=120)
    env["SLURM_CONF"] = str(lab / "etc" / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", script, "down"], env=env, timeout=120)
        shutil.rmtree(lab, ignore_errors=True)


def _job_env(cluster, ws, ckpt, **extra):
    env = dict(cluster, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHON=sys.executable,
               DATA_PATH="train.json", TOKENIZER_MODEL="tok.model", REF_STORE="store",
               TEACHER_CHECKPOINT="teacher", LM_CHECKPOINT="teacher",
               CHECKPOINT_DIR=str(ws / ckpt))
    # The jobs import this checkout (on a user's cluster the package is installed).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def sbatch(cluster, ws, script, *flags, ckpt="ckpt", wait=True, **env):
    """Submit `slurm/<script>` with examples/tiny.sh on 2 nodes x 2 tasks, no GPU request."""
    out = ws / f"{ckpt}.out"
    cmd = ["sbatch", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0",
           f"--output={out}", "--parsable"] + (["--wait"] if wait else []) + [
           os.path.join(REPO, "slurm", script), os.path.join(REPO, "examples", "tiny.sh"),
           *flags]
    proc = subprocess.Popen(cmd, cwd=ws, env=_job_env(cluster, ws, ckpt, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


def finish(proc, out, timeout=400, expect_ok=True):
    stdout, stderr = proc.communicate(timeout=timeout)
    log = out.read_text() if out.exists() else ""
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"job failed ({proc.returncode}):\n{stderr[-3000:]}\n{log[-8000:]}")
    return log


def torchrun(ws, *flags, metrics):
    """The same flags as examples/tiny.sh under torchrun on one node (4 processes)."""
    args = subprocess.run(
        ["bash", "-c", 'source "$1"; printf "%s\\0" "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" '
         '"${MODEL_PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}" '
         '"${REGATE_ARGS[@]}"', "-", os.path.join(REPO, "examples", "tiny.sh")],
        env=dict(os.environ, DATA_PATH="train.json", TOKENIZER_MODEL="tok.model",
                 REF_STORE="store"), capture_output=True, text=True, check=True,
    ).stdout.split("\0")[:-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-port", str(port), "-m", "regate_megatron.training.train", *args,
           "--language-model-checkpoint", "teacher", "--metrics-jsonl", metrics, *flags]
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-6000:]


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_same_steps(got, want):
    """Equal per-step losses, keep ratios and token counts; the gradient norm to 1e-6 (gloo's
    reduction order over the model-parallel group may differ in the last bits)."""
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want, strict=True):
        for key in STEP_KEYS:
            assert a[key] == b[key], (key, a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), (a, b)


@pytest.fixture(scope="module")
def ws(cluster, tmp_path_factory):
    from regate_megatron.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("slurm_ws")
    train_sentencepiece(synthetic_corpus(), str(root / "tok"), vocab_size=128)
    records = mixed_records(str(root))
    write_records(root / "train.json", records * 6)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    teacher = subprocess.run(
        [sys.executable, "-m", "regate_megatron.training.train", "--text-only", "--num-layers", "2",
         "--hidden-size", "16", "--num-attention-heads", "4", "--seq-length", "48",
         "--img-h", "8", "--img-w", "8", "--patch-dim", "4", "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--swiglu", "--hidden-dropout", "0",
         "--attention-dropout", "0", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--lr", "3e-3", "--make-vocab-size-divisible-by", "64", "--no-progress", "--seed", "7",
         "--train-iters", "3", "--data-path", "train.json", "--tokenizer-model", "tok.model",
         "--save", "teacher"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert teacher.returncode == 0, teacher.stderr[-4000:]
    # The reference store, built data-parallel by 4 srun tasks on 2 nodes.
    proc, out = sbatch(cluster, root, "precompute_ref.sh", "--micro-batch-size", "3",
                       "--shard-size", "5", ckpt="precompute")
    log = finish(proc, out)
    assert "4 data-parallel ranks" in log and "wrote store" in log
    return root


@pytest.fixture(scope="module")
def tp2_job(cluster, ws):
    """The uninterrupted TP2xDP2 job: the reference of the torchrun and requeue tests."""
    proc, out = sbatch(cluster, ws, "train_regate.sh", *TP2, ckpt="tp2")
    return finish(proc, out)


def test_tp2_job_matches_torchrun(ws, tp2_job):
    log = tp2_job
    assert "layout: 2 nodes x 2 ranks = 4 ranks = TP 2 x PP 1 x DP 2" in log
    assert "command: " in log and "-m regate_megatron.training.train" in log
    assert "no checkpoint in" in log  # --load = --save: the first run starts from scratch
    rows = metrics(ws / "tp2" / "metrics.jsonl")
    assert [m["step"] for m in rows] == list(range(1, ITERS + 1))
    assert (ws / "tp2" / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    assert any(m["kept_target_tokens"] < m["target_tokens"] for m in rows)  # ReGATE elides
    torchrun(ws, *TP2, metrics="tp2_torchrun.jsonl")
    assert_same_steps(rows, metrics(ws / "tp2_torchrun.jsonl"))


def test_pp2_job_matches_torchrun(cluster, ws):
    proc, out = sbatch(cluster, ws, "train_regate.sh", *PP2, ckpt="pp2")
    log = finish(proc, out)
    assert "TP 1 x PP 2 x DP 2" in log
    torchrun(ws, *PP2, metrics="pp2_torchrun.jsonl")
    assert_same_steps(metrics(ws / "pp2" / "metrics.jsonl"), metrics(ws / "pp2_torchrun.jsonl"))


def _wait_for(path, pattern, proc, timeout=180):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended before {pattern!r}:\n{path.read_text()[-6000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {path} after {timeout} s")


def _job_id(out):
    return re.search(r"\[train_regate.sh\] job (\d+)", out.read_text()).group(1)


def test_online_teacher_on_its_own_node(cluster, ws, tp2_job):
    """TEACHER_NODES=1: the second node's 2 ranks run the teacher (TP2), the first node's are
    the TP2 students; the same kept tokens per step as the offline TP2 job."""
    proc, out = sbatch(cluster, ws, "train_regate.sh", *TP2,
                       "--regate-teacher-tensor-model-parallel-size", "2", ckpt="online",
                       TEACHER_NODES="1")
    log = finish(proc, out)
    assert "= 4 ranks = TP 2 x PP 1 x DP 1 students + 2 teacher ranks" in log
    assert "--regate-teacher-ranks 2" in log and "--regate-ref-store" not in log
    rows, offline = metrics(ws / "online" / "metrics.jsonl"), metrics(ws / "tp2" / "metrics.jsonl")
    assert [m["step"] for m in rows] == list(range(1, ITERS + 1))
    for a, b in zip(rows, offline, strict=True):
        assert a["kept_target_tokens"] == b["kept_target_tokens"] and a["teacher_wait_s"] >= 0


def test_usr1_requeue_resumes_like_uninterrupted(cluster, ws, tp2_job):
    from test_cli import _final_weights

    proc, out = sbatch(cluster, ws, "train_regate.sh", *TP2, ckpt="requeue")
    # The plan line comes after the signal handler is installed, right before step 1.
    _wait_for(out, r"\[regate-train\] world 4", proc)
    # As `#SBATCH --signal=B:USR1@N` does: the batch shell only; its trap forwards to srun.
    subprocess.run(["scancel", "--batch", "-s", "USR1", _job_id(out)], env=cluster, check=True)
    log = finish(proc, out)
    stopped = re.search(r"stopped early \(signal SIGUSR1\) after iteration (\d+)", log)
    assert stopped, log[-6000:]
    assert 0 < int(stopped.group(1)) < ITERS
    assert "requeueing job" in log and "(restart 1)" in log
    assert f"resumed from {ws / 'requeue'} at iteration {stopped.group(1)}" in log
    # The resumed run is the uninterrupted one: per-step metrics and final weights.
    assert_same_steps(metrics(ws / "requeue" / "metrics.jsonl"),
                      metrics(ws / "tp2" / "metrics.jsonl"))
    want, got = _final_weights(ws, "tp2"), _final_weights(ws, "requeue")
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not (ws / "requeue" / "stopped_early").exists()


def _rank_pid(job_id, rank):
    """The pid of task `rank` of job `job_id` (from the processes' SLURM environment)."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode(), b"SLURM_STEP_ID=0"}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if want <= env and b"regate_megatron.training.train" in cmd:
            return int(pid)
    return None


def test_killed_rank_fails_the_job_fast(cluster, ws):
    proc, out = sbatch(cluster, ws, "train_regate.sh", *PP2, "--train-iters", "10000",
                       ckpt="killed")
    _wait_for(out, r"\] step 1 ", proc)
    pid = _rank_pid(_job_id(out), 3)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    log = finish(proc, out, timeout=120, expect_ok=False)
    assert time.monotonic() - killed < 60
    assert proc.returncode != 0
    assert re.search(r"task 3: Killed", log), log[-4000:]
    assert "regate-train failed" in log
